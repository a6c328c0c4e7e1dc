"""What a run records to be reproduced: the command, package versions, hardware (run.json, checks.json, ...)."""
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Dict, Optional

import torch

__all__ = ["environment_info", "package_version", "available_cpus"]

PACKAGES = ("tinycnn", "torch", "torchvision", "timm", "accelerate", "webdataset", "safetensors")


def package_version(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, e.g. under a scheduler), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def environment_info(accelerator=None, **extra: Any) -> Dict[str, Any]:
    """The command, package versions and hardware; with an accelerator, its processes, device and precision."""
    hardware = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor(),
                "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            hardware["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        hardware["gpu"] = torch.cuda.get_device_name(0)
        hardware["gpu_count"] = torch.cuda.device_count()
    info = {"command": [os.path.basename(sys.executable), *sys.argv], "cwd": os.getcwd(),
            "versions": {p: package_version(p) for p in PACKAGES}, "hardware": hardware,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if accelerator is not None:
        info.update(num_processes=accelerator.num_processes, device=str(accelerator.device),
                    mixed_precision=accelerator.mixed_precision)
    info.update(extra)
    return info
