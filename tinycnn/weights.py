"""Self-describing safetensors weights.

`save_model` writes the state dict plus metadata (architecture, class wnids, normalization) of a tinycnn
model or any other timm model (`model=resnet10t` in a run config), so that
`load_model(path)` rebuilds the model from the file alone. `load_model` and `read_metadata` also read
the folder `tinycnn-export` writes (timm's Hugging Face layout: config.json + model.safetensors), which
timm loads by itself: `timm.create_model('local-dir:DIR', pretrained=True)` (see tinycnn/hub.py).

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
from timm.utils import unwrap_model  # DDP / DataParallel (.module), torch.compile (._orig_mod), ModelEma

from .model import TinyCNN

__all__ = ["save_model", "load_model", "read_metadata", "unwrap_model", "WeightsError"]

METADATA_KEY = "tinycnn"  # one JSON value under this key; safetensors metadata is str -> str
HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"  # timm's names in a Hugging Face model folder


class WeightsError(ValueError):
    """A file that is not tinycnn weights, or weights that do not match what was asked for."""


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as open() would create it under the process umask (mkstemp/mkdtemp make private 0600/0700 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: Union[str, Path], write_fn) -> Path:
    """Call write_fn(tmp_path) then rename tmp_path onto path: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, umask_mode())
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

    model: a tinycnn model, or any timm model made by timm.create_model (rebuilt from its name and the
    arguments timm recorded). classes: the wnid of each output index, when known; class_names: their
    human-readable names. extra: JSON-serializable facts to keep with the weights (epoch, accuracy, ...).
    """
    model = unwrap_model(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not isinstance(model, TinyCNN) and "architecture" not in cfg:
        raise WeightsError(f"save_model writes timm models (made by timm.create_model), got {type(model).__name__}")
    if classes is not None and len(classes) != model.num_classes:
        raise WeightsError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    in_chans = cfg.get("input_size", (3,))[0]
    meta = {
        "architecture": cfg.get("architecture", "tinycnn"),
        **_architecture_args(model),
        "num_classes": model.num_classes,
        "in_chans": getattr(model, "in_chans", in_chans),
        "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
        "input_size": list(cfg.get("input_size", (in_chans, 64, 64))),
        "classes": list(classes) if classes is not None else None,
        "class_names": list(class_names) if class_names is not None else None,
        "extra": extra or {},
    }
    from . import __version__
    meta["tinycnn_version"] = __version__
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _architecture_args(model: nn.Module) -> Dict[str, Any]:
    """What rebuilds the architecture besides its name, num_classes and in_chans: tinycnn's widths and
    depths, or the (JSON) arguments timm.create_model recorded for another timm model."""
    if isinstance(model, TinyCNN):
        return {"stage_channels": list(model.stage_channels), "stage_repeats": list(model.stage_repeats)}
    skip = {"num_classes", "in_chans", "pretrained_cfg", "pretrained_cfg_overlay", "drop_rate", "drop_path_rate"}
    args = {}
    for k, v in getattr(model, "_model_args", {}).items():  # what timm.create_model was given
        if k in skip:
            continue
        try:
            args[k] = json.loads(json.dumps(v))
        except (TypeError, ValueError):
            raise WeightsError(f"save_model cannot describe the model argument {k}={v!r} (not JSON)") from None
    return {"model_args": args}


def read_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The tinycnn description of a weights file or an exported model folder (WeightsError if it has none)."""
    path = Path(path)
    if path.is_dir():
        return _read_folder_metadata(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file or model folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None
    if METADATA_KEY not in metadata:
        if (path.parent / HUB_CONFIG).is_file():  # the weights of an exported folder: the folder describes them
            raise WeightsError(f"{path} is part of an exported model folder: give the folder {path.parent}")
        raise WeightsError(f"{path}: a safetensors file without tinycnn metadata (not saved by tinycnn.save_model)")
    return json.loads(metadata[METADATA_KEY])


def _read_folder_metadata(folder: Path) -> Dict[str, Any]:
    """read_metadata's dict, from the config.json timm's save_for_hf writes (tinycnn-export)."""
    config_file = folder / HUB_CONFIG
    if not config_file.is_file():
        raise WeightsError(f"{folder}: a folder without {HUB_CONFIG}; give a .safetensors file or a folder "
                           "written by tinycnn-export")
    try:
        cfg = json.loads(config_file.read_text())
        arch, pretrained_cfg = cfg["architecture"], cfg["pretrained_cfg"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{config_file}: not a timm model config ({e!r})") from None
    args = dict(cfg.get("model_args") or {})
    if not str(arch).startswith("tinycnn"):
        architecture = {"model_args": {k: v for k, v in args.items() if k not in ("num_classes", "in_chans")}}
    else:
        if "stage_channels" not in args or "stage_repeats" not in args:  # a named variant exported without them
            import timm
            model = timm.create_model(arch, **{k: v for k, v in args.items() if k != "num_classes"}, num_classes=0)
            args = {"stage_channels": model.stage_channels, "stage_repeats": model.stage_repeats, **args}
        architecture = {"stage_channels": list(args["stage_channels"]), "stage_repeats": list(args["stage_repeats"])}
    classes = cfg.get("label_names") or pretrained_cfg.get("label_names")
    descriptions = cfg.get("label_descriptions") or pretrained_cfg.get("label_descriptions") or {}
    input_size = list(pretrained_cfg.get("input_size", (3, 64, 64)))
    about = cfg.get(METADATA_KEY) or {}
    return {
        "architecture": arch,
        **architecture,
        "num_classes": cfg.get("num_classes", pretrained_cfg.get("num_classes")),
        "in_chans": args.get("in_chans", input_size[0]),
        "mean": list(pretrained_cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(pretrained_cfg.get("std", (0.229, 0.224, 0.225))),
        "input_size": input_size,
        "classes": list(classes) if isinstance(classes, (list, tuple)) else None,
        "class_names": [descriptions.get(c, c) for c in classes] if descriptions and classes else None,
        "extra": about.get("extra", {}),
        "tinycnn_version": about.get("version"),
    }


def _weights_file(path: Path) -> Path:
    """The safetensors file of a weights path: the file itself, or model.safetensors in a model folder."""
    if not path.is_dir():
        return path
    if not (path / HUB_WEIGHTS).is_file():
        raise WeightsError(f"{path}: no {HUB_WEIGHTS} in the folder (tinycnn reads safetensors only; "
                           "export again with tinycnn-export)")
    return path / HUB_WEIGHTS


def load_model(
        path: Union[str, Path],
        *,
        num_classes: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        **kwargs,
) -> nn.Module:
    """Rebuild the model described by a tinycnn weights file (or exported model folder) and load its weights.

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
    if "stage_channels" in meta:  # tinycnn: the widths and depths make any variant
        name, args = "tinycnn", {"stage_channels": meta["stage_channels"], "stage_repeats": meta["stage_repeats"]}
    else:
        name, args = meta["architecture"], meta.get("model_args") or {}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=meta["num_classes"], in_chans=meta["in_chans"],
                                  pretrained_cfg_overlay=overlay, **{**args, **kwargs})
    except RuntimeError as e:
        if not str(e).startswith("Unknown model"):
            raise
        raise WeightsError(f"{path} holds a {name} model, which timm does not know: import the package "
                           "that registers it first") from None
    model.pretrained_cfg["architecture"] = meta["architecture"]
    state = load_file(str(_weights_file(Path(path))), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not match the architecture in its metadata "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device)
