"""Which device and precision a run uses, the accelerator that holds them, and what to do when memory runs out."""
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from .config import Config

__all__ = ["resolve_device", "make_accelerator", "out_of_memory_message"]


def resolve_device(name: str) -> str:
    """auto -> cuda, else mps, else cpu; an explicit device that is not there is an error that says what to use."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible (use train.device=auto or cpu)")
    if kind == "mps" and not mps:
        raise RuntimeError("train.device is mps but MPS is not available (use train.device=auto or cpu)")
    if kind == "cuda" and index:  # accelerate places each process on its own GPU: cuda:N would be ignored
        raise ValueError(f"train.device={name}: pick the GPU with CUDA_VISIBLE_DEVICES={index} and train.device=cuda "
                         "(accelerate gives each process its own GPU)")
    return name


def make_accelerator(cfg: Config, output: Optional[Path] = None, log: bool = True) -> Accelerator:
    """An Accelerator for cfg.train's device, mixed precision and gradient accumulation (TensorBoard in output/tb
    when `log` and tensorboard is installed)."""
    t = cfg.train
    device = resolve_device(t.device)
    mp = t.mixed_precision
    if mp == "auto":
        mp = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
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
