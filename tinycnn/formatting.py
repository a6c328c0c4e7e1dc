"""How numbers read in tables and reports (Markdown, rich), written once: None reads as '-'."""
import math
from typing import Any, Optional, Sequence

__all__ = ["percent", "number", "sci", "count", "dashed", "hms"]


def percent(v: Optional[float], digits: int = 2) -> str:
    """0.4567 -> '45.67%'."""
    return "-" if v is None else f"{v:.{digits}%}"


def number(v: Optional[float], fmt: str = ".4f") -> str:
    """A loss and the like: 1.23456 -> '1.2346'; None, nan and inf read as '-'."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def sci(v: Optional[float]) -> str:
    """Three significant digits: 0.000312 -> '0.000312', 3e-05 -> '3e-05'."""
    return "-" if v is None else f"{v:.3g}"


def count(n: Optional[int]) -> str:
    """1197704 -> '1,197,704'."""
    return "-" if n is None else f"{n:,}"


def dashed(values: Optional[Sequence[Any]]) -> str:
    """Widths or depths: [64, 128, 256] -> '64-128-256'."""
    return "-" if values is None else "-".join(str(int(v)) for v in values)


def hms(seconds: float) -> str:
    """A duration: 4431.2 -> '1:13:51'."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
