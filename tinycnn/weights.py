"""Self-describing safetensors weights.

`save_model` writes the state dict plus metadata (architecture, class wnids, normalization) so that
`load_model(path)` rebuilds the model from the file alone. The same file loads through timm alone:

    timm.create_model('tinycnn', pretrained=True,
                      pretrained_cfg_overlay=dict(file=path, num_classes=N))

No pickle anywhere; writes go to a temporary file that is renamed into place, so an interrupted save
never leaves a corrupt file behind.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .model import TinyCNN

__all__ = ["save_model", "load_model", "read_metadata", "unwrap_model", "WeightsError"]

METADATA_KEY = "tinycnn"  # one JSON value under this key; safetensors metadata is str -> str


class WeightsError(ValueError):
    """A file that is not tinycnn weights, or weights that do not match what was asked for."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile / accelerate wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def atomic_write(path: Union[str, Path], write_fn) -> Path:
    """Call write_fn(tmp_path) then rename tmp_path onto path: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_model(
        model: nn.Module,
        path: Union[str, Path],
        *,
        classes: Optional[Sequence[str]] = None,
        class_names: Optional[Sequence[str]] = None,
        extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write `model`'s weights and a description of it to a `.safetensors` file (atomically).

    classes: the wnid of each output index, when known; class_names: their human-readable names.
    extra: JSON-serializable facts to keep with the weights (epoch, accuracy, ...).
    """
    model = unwrap_model(model)
    if not isinstance(model, TinyCNN):
        raise WeightsError(f"save_model writes TinyCNN models, got {type(model).__name__}")
    if classes is not None and len(classes) != model.num_classes:
        raise WeightsError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = {
        "architecture": cfg.get("architecture", "tinycnn"),
        "stage_channels": list(model.stage_channels),
        "stage_repeats": list(model.stage_repeats),
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
        "input_size": list(cfg.get("input_size", (model.in_chans, 64, 64))),
        "classes": list(classes) if classes is not None else None,
        "class_names": list(class_names) if class_names is not None else None,
        "extra": extra or {},
    }
    from . import __version__
    meta["tinycnn_version"] = __version__
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The tinycnn description stored in a weights file (raises WeightsError if it has none)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None
    if METADATA_KEY not in metadata:
        raise WeightsError(f"{path}: a safetensors file without tinycnn metadata (not saved by tinycnn.save_model)")
    return json.loads(metadata[METADATA_KEY])


def load_model(
        path: Union[str, Path],
        *,
        num_classes: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        **kwargs,
) -> TinyCNN:
    """Rebuild the model described by a tinycnn weights file and load its weights.

    num_classes: when given, must match the file (a clear error otherwise). kwargs go to
    timm.create_model (e.g. drop_rate). The model's pretrained_cfg carries the file's mean/std and,
    when known, `label_names` (wnids) and `label_descriptions`.
    """
    import timm

    meta = read_metadata(path)
    if num_classes is not None and num_classes != meta["num_classes"]:
        raise WeightsError(f"{path} holds a {meta['num_classes']}-class model, {num_classes} classes asked for")
    overlay = dict(mean=tuple(meta["mean"]), std=tuple(meta["std"]), input_size=tuple(meta["input_size"]),
                   num_classes=meta["num_classes"])
    if meta.get("classes"):
        overlay["label_names"] = tuple(meta["classes"])
    if meta.get("class_names"):
        overlay["label_descriptions"] = dict(zip(meta.get("classes") or (), meta["class_names"]))
    model = timm.create_model(
        "tinycnn", pretrained=False, stage_channels=meta["stage_channels"], stage_repeats=meta["stage_repeats"],
        num_classes=meta["num_classes"], in_chans=meta["in_chans"], pretrained_cfg_overlay=overlay, **kwargs)
    model.pretrained_cfg["architecture"] = meta["architecture"]
    state = load_file(str(path), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not match the architecture in its metadata "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device)
