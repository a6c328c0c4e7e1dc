"""Progress of a run: a live bar on a terminal, a plain line every few seconds in a log file.

A cluster job's log is a file, where a redrawn bar prints nothing useful; there a line such as
`epoch 3/20 step 1234/7020 loss 2.345 12,345 img/s ETA 0:05:12` shows the run is alive.
"""
import sys
import time
from datetime import timedelta
from typing import Optional

__all__ = ["RunProgress"]


class RunProgress:
    """Context manager: `start_epoch`, `advance` per step, `end_epoch`. Disabled: prints nothing at all."""

    def __init__(self, total_steps: int, *, enabled: bool = True, interval_s: float = 30.0, stream=None):
        self.total_steps, self.enabled, self.interval_s = total_steps, enabled, interval_s
        self.stream = stream or sys.stdout
        self.terminal = enabled and self.stream.isatty()
        self._bar = self._task = None
        self._epoch_text, self._info = "", ""
        self._t0 = self._last_line = time.perf_counter()
        self._steps_done = 0

    def __enter__(self) -> "RunProgress":
        if self.terminal:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(file=self.stream))
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, batches: int, done: int = 0):
        self.start(f"epoch {epoch + 1}/{epochs}", batches, done)

    def start(self, description: str, batches: int, done: int = 0):
        """A new bar (a new line prefix off a terminal): `batches` to go, `done` of them already."""
        self._epoch_text = description
        if self._bar is not None:
            self._task = self._bar.add_task(description, total=batches, completed=done, info="")

    def advance(self, step: int, info: Optional[str] = None, new_step: bool = True):
        """One batch done; `step` is the optimizer step count, `info` e.g. "loss 2.345  12,345 img/s"."""
        if info is not None:
            self._info = info
        self._steps_done += int(new_step)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, info=self._info)
        elif self.enabled and time.perf_counter() - self._last_line >= self.interval_s:
            self._line(step)

    def end_epoch(self):
        if self._bar is not None and self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None

    def _line(self, step: int):
        now = time.perf_counter()
        self._last_line = now
        rate = self._steps_done / max(now - self._t0, 1e-9)
        eta = timedelta(seconds=round((self.total_steps - step) / rate)) if rate > 0 else "?"
        print(f"{self._epoch_text} step {step}/{self.total_steps} {self._info} ETA {eta}".replace("  ", " "),
              file=self.stream, flush=True)
