"""Which device and precision a run uses, the accelerator that holds them, and what to do when memory runs out."""
from pathlib import Path
from typing import Optional, Tuple

import accelerate
import torch
from accelerate import Accelerator
from packaging.version import Version

from .config import Config, ConfigError
from .errors import TinycnnError

__all__ = ["resolve_device", "resolve_mixed_precision", "make_accelerator", "out_of_memory_message"]


class DeviceError(TinycnnError, RuntimeError):
    """The configured device is not there."""


def resolve_device(name: str) -> str:
    """auto -> cuda, else mps, else cpu; an explicit device that is not there is an error that says what to use."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device is cuda but no CUDA device is visible (use train.device=auto or cpu)")
    if kind == "mps" and not mps:
        raise DeviceError("train.device is mps but MPS is not available (use train.device=auto or cpu)")
    if kind == "cuda" and index:  # accelerate places each process on its own GPU: cuda:N would be ignored
        raise ConfigError(f"train.device={name}: pick the GPU with CUDA_VISIBLE_DEVICES={index} and train.device=cuda "
                         "(accelerate gives each process its own GPU)")
    return name


def resolve_mixed_precision(mixed_precision: str, device) -> str:
    """train.mixed_precision for `device`. "auto": bf16 on a CUDA GPU that has it; on Apple silicon (MPS) bf16
    where macOS and torch have it, else fp16 where torch has it, else "no"; "no" on the CPU. An explicit bf16 or
    fp16 that MPS cannot run here is refused with what to use instead."""
    if str(device).startswith("mps"):
        return _mps_mixed_precision(mixed_precision)
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "no"


def _mps_mixed_precision(mixed_precision: str) -> str:
    # bf16 first: no loss scaling, float32's range (M1/M2 emulate bfloat16: fp16 may be faster there)
    if mixed_precision == "no":
        return "no"
    best = next((mp for mp in ("bf16", "fp16") if not _mps_missing(mp)), "no")
    if mixed_precision == "auto":
        return best
    missing = _mps_missing(mixed_precision)
    if missing:
        raise ConfigError(f"train.mixed_precision={mixed_precision} on mps needs {missing}: use "
                         f"train.mixed_precision={best} (what auto picks here)")
    return mixed_precision


def _mps_missing(mixed_precision: str) -> str:
    """What MPS autocast in `mixed_precision` lacks here ("" when nothing): accelerate accepts bf16/fp16 on MPS from
    1.11 (it raised before); torch autocasts MPS to fp16 from 2.5 and to bf16 from 2.6, scales fp16 losses
    (GradScaler) on MPS from 2.8; MPS has bfloat16 kernels from macOS 14 (accelerate's own bf16 check)."""
    missing = []
    if _release(accelerate.__version__) < (1, 11):
        missing.append("accelerate>=1.11")
    if mixed_precision == "bf16":
        if _release(torch.__version__) < (2, 6):
            missing.append("torch>=2.6")
        elif not torch.backends.mps.is_macos_or_newer(14, 0):
            missing.append("macOS 14 or newer")
    elif _release(torch.__version__) < (2, 8):
        missing.append("torch>=2.8")
    return " and ".join(missing)


def _release(version: str) -> Tuple[int, ...]:
    """(major, minor) of a version string; a nightly of 2.8 counts as 2.8."""
    return Version(str(version)).release[:2]


def make_accelerator(cfg: Config, output: Optional[Path] = None, log: bool = True) -> Accelerator:
    """An Accelerator for cfg.train's device, mixed precision and gradient accumulation (TensorBoard in output/tb
    when `log` and tensorboard is installed)."""
    t = cfg.train
    device = resolve_device(t.device)
    mp = resolve_mixed_precision(t.mixed_precision, device)
    trackers = None
    if log and output is not None:
        try:
            import tensorboard  # noqa: F401
            trackers = "tensorboard"
        except ImportError:
            pass
    return Accelerator(cpu=device == "cpu", mixed_precision=mp, gradient_accumulation_steps=t.grad_accum_steps,
                       log_with=trackers, project_dir=str(output) if output else None)


def out_of_memory_message(cfg: Config, accelerator: Accelerator) -> str:
    free = ""
    if accelerator.device.type == "cuda":
        free_b, total_b = torch.cuda.mem_get_info(accelerator.device)
        free = f" ({free_b / 2**30:.1f} of {total_b / 2**30:.1f} GiB free now)"
    hint = " or train.mixed_precision=bf16" if accelerator.mixed_precision == "no" and accelerator.device.type == "cuda" else ""
    resident = " or data.device_resident=false" if cfg.data.device_resident else ""
    return (f"{accelerator.device} ran out of memory{free} at train.batch_size={cfg.train.batch_size} per process: "
            f"lower it (e.g. train.batch_size={max(1, cfg.train.batch_size // 2)}){hint}{resident}")
