"""Self-describing safetensors weights.

`save_model` writes the state dict plus metadata (architecture, class wnids, normalization) of a tinycnn
model or any other timm model (`model=resnet10t` in a run config), so that
`load_model(path)` rebuilds the model from the file alone. `load_model` and `read_metadata` also read
the folder `tinycnn-export` writes (timm's Hugging Face layout: config.json + model.safetensors), which
timm loads by itself: `timm.create_model('local-dir:DIR', pretrained=True)` (see tinycnn/hub.py).

No pickle anywhere; writes go to a temporary file that is renamed into place, so an interrupted save
never leaves a corrupt file behind.

Weights are untrusted input: `read_metadata` caps what it reads (the safetensors header length, the
metadata string, config.json) and checks every field's type and range (`check_metadata`): the
architecture must be a plain registered timm name (no `hf-hub:`/`local-dir:`), and model_args hold
only JSON scalars (or lists of them) and none of the arguments that make timm load or fetch anything
(`REFUSED_MODEL_ARGS`). `load_model` then builds the described model on the meta device (no memory)
and compares its state_dict, key by key and shape by shape, with the tensors the file holds (read
from the header, without loading data); only a model that matches the file is built for real (and
under a memory bound; see load_model for architectures timm cannot build on the meta device).
`save_model` runs the same checks, so weights it writes always load.
"""
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode
from timm.utils import unwrap_model  # DDP / DataParallel (.module), torch.compile (._orig_mod), ModelEma

from .errors import TinycnnError
from .files import atomic_write, open_regular
from .model import TinyCNN

__all__ = ["save_model", "load_model", "read_metadata", "check_metadata", "unwrap_model", "WeightsError"]

METADATA_KEY = "tinycnn"  # one JSON value under this key; safetensors metadata is str -> str
HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"  # timm's names in a Hugging Face model folder

# What an untrusted weights file may cost before anything is checked.
MAX_HEADER_BYTES = 100_000_000  # a safetensors header (its first 8 bytes say how long): safetensors' own limit
MAX_METADATA_BYTES = 16 * 2 ** 20  # the metadata JSON string, and an exported folder's config.json

# The ranges of the fields a tinycnn description may hold.
MAX_CLASSES = 100_000
MAX_IN_CHANS = 1024
MAX_IMAGE_SIZE = 16384  # height and width of input_size
MAX_STAGES, MAX_CHANNELS, MAX_REPEATS = 32, 8192, 64
MAX_MODEL_ARGS, MAX_LIST_LENGTH, MAX_STRING_LENGTH = 64, 64, 256
MAX_INT = 2 ** 31  # any integer model argument, in absolute value

ARCHITECTURE_NAME = re.compile(r"[a-z0-9_.]{1,128}")  # a plain timm name: no hf-hub:/local-dir:/timm/ prefix
ARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
URL_LIKE = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*:")  # https://, file:, hf-hub:, local-dir:, C:\ ...

# model_args that timm.create_model (or build_model_with_cfg) reads as instructions to load, fetch or
# adapt something rather than as the architecture's shape: a description naming one is refused.
REFUSED_MODEL_ARGS = frozenset({
    # load weights or configs from a file, a URL or the Hugging Face Hub
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "pretrained_filter_fn",
    "pretrained_model_args", "checkpoint_path", "cache_dir", "pruned",
    # build something else than a classifier (feature extraction wrappers)
    "features_only", "feature_cfg", "feature_cls", "out_indices", "flatten_sequential", "kwargs_filter",
    "model_cfg",
    # layer configuration and placement: the caller's choice, not the file's
    "scriptable", "exportable", "no_jit", "device", "dtype",
    # given by the description's own fields
    "model_name", "num_classes", "in_chans",
})


class WeightsError(TinycnnError, ValueError):
    """A file that is not tinycnn weights, or weights that do not match what was asked for."""


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
    text = json.dumps(meta)
    try:  # what load_model would refuse is not written
        check_metadata(json.loads(text), path)
    except WeightsError as e:
        raise WeightsError(f"save_model cannot write weights load_model would refuse: {e}") from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: text}
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


def _show(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: attacker-sized values stay one short line in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_list(meta: Dict[str, Any], key: str, low: int, high: int, max_length: int, source: str) -> list:
    value = meta.get(key)
    if (not isinstance(value, list) or not 1 <= len(value) <= max_length
            or not all(_is_int(v) and low <= v <= high for v in value)):
        raise WeightsError(f"{source}: {key} must be a list of 1 to {max_length} integers from {low} to {high}, "
                           f"got {_show(value)}")
    return value


def _check_architecture(name: Any, source: str):
    """A plain timm model name that timm knows (so timm.create_model builds it, from nothing but code)."""
    import timm

    if not isinstance(name, str) or not ARCHITECTURE_NAME.fullmatch(name):
        raise WeightsError(f"{source}: the architecture {_show(name)} is not a plain timm model name (lowercase "
                           "letters, digits, '_' and '.'; no hf-hub:, local-dir: or timm/ prefix): tinycnn loads "
                           "only weights that name a timm architecture")
    if not timm.is_model(name):
        raise WeightsError(f"{source} holds a {name} model, which timm does not know: import the package "
                           "that registers it first")


def _check_model_args(args: Any, source: str):
    """JSON scalars (or short lists of them) that describe the architecture, and nothing that loads or fetches."""
    if not isinstance(args, dict) or len(args) > MAX_MODEL_ARGS:
        raise WeightsError(f"{source}: model_args must be a JSON object of at most {MAX_MODEL_ARGS} arguments, "
                           f"got {_show(args)}")
    for key, value in args.items():
        if not ARG_NAME.fullmatch(key):
            raise WeightsError(f"{source}: model_args holds {_show(key)}, which is not an argument name")
        if key in REFUSED_MODEL_ARGS:
            raise WeightsError(f"{source}: model_args holds {key}, which makes timm load, fetch or build something "
                               "else than the architecture: tinycnn loads only weights whose model_args describe "
                               "the architecture itself")
        if isinstance(value, list) and len(value) > MAX_LIST_LENGTH:
            raise WeightsError(f"{source}: model_args {key} holds more than {MAX_LIST_LENGTH} values")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                if len(item) > MAX_STRING_LENGTH or URL_LIKE.match(item):
                    raise WeightsError(f"{source}: model_args {key}={_show(item)} names a location or is too long: "
                                       "tinycnn refuses arguments that point timm at files or URLs")
            elif _is_int(item):
                if abs(item) > MAX_INT:
                    raise WeightsError(f"{source}: model_args {key}={_show(item)} is out of range")
            elif not (item is None or isinstance(item, bool) or _is_number(item)):
                raise WeightsError(f"{source}: model_args {key} must be a JSON number, string, boolean, null or a "
                                   f"list of them, got {_show(value)}")


def check_metadata(meta: Any, source: Union[str, Path]) -> Dict[str, Any]:
    """`meta` (a weights description) if every field has the type and range tinycnn expects, else WeightsError.

    architecture: a registered timm name, `^[a-z0-9_.]+$`. A tinycnn model: stage_channels (1..8192 each)
    and stage_repeats (1..64 each), one entry per stage (at most 32). Any other timm model: model_args,
    JSON scalars or lists of them, none in REFUSED_MODEL_ARGS and no string that starts with a URL
    scheme or hf-hub:/local-dir:. num_classes 1..100000, in_chans 1..1024, input_size [C, H, W], mean and
    std finite (std > 0), classes and class_names lists of num_classes strings (or null), extra an object.
    """
    source = str(source)
    if not isinstance(meta, dict):
        raise WeightsError(f"{source}: the tinycnn metadata is {type(meta).__name__}, not a JSON object "
                           "(not saved by tinycnn.save_model)")
    architecture = meta.get("architecture")
    _check_architecture(architecture, source)
    if architecture.startswith("tinycnn"):
        stages = _int_list(meta, "stage_channels", 1, MAX_CHANNELS, MAX_STAGES, source)
        if len(_int_list(meta, "stage_repeats", 1, MAX_REPEATS, MAX_STAGES, source)) != len(stages):
            raise WeightsError(f"{source}: stage_channels and stage_repeats must have one entry per stage, got "
                               f"{_show(meta['stage_channels'])} and {_show(meta['stage_repeats'])}")
        if meta.get("model_args"):
            raise WeightsError(f"{source}: a tinycnn model is described by stage_channels and stage_repeats, "
                               "not model_args")
    else:
        if "stage_channels" in meta or "stage_repeats" in meta:
            raise WeightsError(f"{source}: stage_channels and stage_repeats describe tinycnn models, not "
                               f"{architecture}")
        _check_model_args(meta.get("model_args", {}), source)
    num_classes, in_chans = meta.get("num_classes"), meta.get("in_chans")
    if not _is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise WeightsError(f"{source}: num_classes must be an integer from 1 to {MAX_CLASSES}, "
                           f"got {_show(num_classes)}")
    if not _is_int(in_chans) or not 1 <= in_chans <= MAX_IN_CHANS:
        raise WeightsError(f"{source}: in_chans must be an integer from 1 to {MAX_IN_CHANS}, got {_show(in_chans)}")
    input_size = meta.get("input_size")
    if (not isinstance(input_size, list) or len(input_size) != 3 or not all(_is_int(v) for v in input_size)
            or not 1 <= input_size[0] <= MAX_IN_CHANS or not all(1 <= v <= MAX_IMAGE_SIZE for v in input_size[1:])):
        raise WeightsError(f"{source}: input_size must be [channels, height, width] (channels 1 to {MAX_IN_CHANS}, "
                           f"sizes 1 to {MAX_IMAGE_SIZE}), got {_show(input_size)}")
    for key in ("mean", "std"):
        values = meta.get(key)
        if (not isinstance(values, list) or not 1 <= len(values) <= MAX_IN_CHANS or not all(map(_is_number, values))
                or key == "std" and min(values) <= 0):
            raise WeightsError(f"{source}: {key} must be a list of 1 to {MAX_IN_CHANS} finite numbers"
                               f"{' above 0' if key == 'std' else ''}, got {_show(values)}")
    for key in ("classes", "class_names"):
        names = meta.get(key)
        if names is not None and (not isinstance(names, list) or len(names) != num_classes
                                  or not all(isinstance(n, str) for n in names)):
            raise WeightsError(f"{source}: {key} must be a list of {num_classes} strings (one per class) or null, "
                               f"got {_show(names)}")
    if not isinstance(meta.get("extra", {}), dict):
        raise WeightsError(f"{source}: extra must be a JSON object, got {_show(meta['extra'])}")
    if not isinstance(meta.get("tinycnn_version"), (str, type(None))):
        raise WeightsError(f"{source}: tinycnn_version must be a string, got {_show(meta['tinycnn_version'])}")
    return meta


def _parse_json(text: Union[str, bytes], source: str, refusal: str) -> Any:
    """json.loads of untrusted text: capped in size, UTF-8 only; any failure is one line, `source: refusal (why)`."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if len(raw) > MAX_METADATA_BYTES:
        raise WeightsError(f"{source}: {refusal} (more than the {MAX_METADATA_BYTES:,} bytes tinycnn reads)")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise WeightsError(f"{source}: {refusal} (not UTF-8 text)") from None
    except RecursionError:
        raise WeightsError(f"{source}: {refusal} (JSON nested too deeply)") from None
    except ValueError as e:
        raise WeightsError(f"{source}: {refusal} (not JSON: {_show(str(e), 80)})") from None


def _open_file(path: Path) -> int:
    """An fd of the regular file `path` (a link to one too: Hugging Face's cache links its files), without
    waiting on a FIFO; an OSError (files.NotRegularFile) otherwise."""
    return open_regular(path, follow_symlinks=True, single_link=False)


def _open_safetensors(path: Path) -> Tuple[Dict[str, str], Dict[str, Tuple[int, ...]], int]:
    """(metadata, tensor shapes, total tensor bytes) of a safetensors file, from its header alone.

    The header's length (the file's first 8 bytes, little-endian) is checked before safetensors reads it,
    so a file claiming a huge header costs nothing.
    """
    try:
        with os.fdopen(_open_file(path), "rb") as f:
            length_bytes = f.read(8)
            file_size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the weights ({e.strerror})") from None
    header_length = int.from_bytes(length_bytes, "little")
    if len(length_bytes) < 8:
        raise WeightsError(f"{path}: not a safetensors file (shorter than the 8 bytes that give its header length)")
    if header_length > MAX_HEADER_BYTES:
        raise WeightsError(f"{path}: not a safetensors file tinycnn reads (its header claims {header_length:,} "
                           f"bytes, more than {MAX_HEADER_BYTES:,})")
    if 8 + header_length > file_size:
        raise WeightsError(f"{path}: not a safetensors file (its header runs past the end of the file: truncated?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        reason = (str(e).splitlines() or [""])[0]
        raise WeightsError(f"{path}: not a safetensors file ({_show(reason, 120)})") from None
    # safetensors checks that the tensors tile the data after the header exactly
    return metadata, shapes, file_size - 8 - header_length


def read_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The tinycnn description of a weights file or an exported model folder (WeightsError if it has none).

    Checked with check_metadata: what comes back is safe to hand to load_model's build.
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder_metadata(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file or model folder")
    metadata, _, _ = _open_safetensors(path)
    if METADATA_KEY not in metadata:
        if (path.parent / HUB_CONFIG).is_file():  # the weights of an exported folder: the folder describes them
            raise WeightsError(f"{path} is part of an exported model folder: give the folder {path.parent}")
        raise WeightsError(f"{path}: a safetensors file without tinycnn metadata (not saved by tinycnn.save_model)")
    meta = _parse_json(metadata[METADATA_KEY], str(path),
                       "unreadable tinycnn metadata, not saved by tinycnn.save_model")
    return check_metadata(meta, path)


def read_json_file(path: Path, refusal: str) -> Any:
    """The JSON value of a small untrusted file (at most MAX_METADATA_BYTES, UTF-8); WeightsError otherwise."""
    try:
        with os.fdopen(_open_file(path), "rb") as f:
            raw = f.read(MAX_METADATA_BYTES + 1)
    except OSError as e:
        raise WeightsError(f"{path}: {refusal} (cannot read it: {e.strerror})") from None
    return _parse_json(raw, str(path), refusal)


def _read_folder_metadata(folder: Path) -> Dict[str, Any]:
    """read_metadata's dict, from the config.json timm's save_for_hf writes (tinycnn-export)."""
    config_file = folder / HUB_CONFIG
    if not config_file.is_file():
        raise WeightsError(f"{folder}: a folder without {HUB_CONFIG}; give a .safetensors file or a folder "
                           "written by tinycnn-export")
    cfg = read_json_file(config_file, "not a timm model config")
    if not isinstance(cfg, dict):
        cfg = {}  # refused just below, in the same words as a config without the fields
    arch, pretrained_cfg = cfg.get("architecture"), cfg.get("pretrained_cfg")
    saved_args, about = cfg.get("model_args") or {}, cfg.get(METADATA_KEY) or {}
    if not isinstance(arch, str) or not all(isinstance(v, dict) for v in (pretrained_cfg, saved_args, about)):
        raise WeightsError(f"{config_file}: not a timm model config (an object with architecture, pretrained_cfg "
                           "and model_args)")
    args = {k: v for k, v in saved_args.items() if k not in ("num_classes", "in_chans")}  # the config's own fields
    # all of model_args, also what tinycnn itself ignores: timm's local-dir: loader would pass it on
    _check_architecture(arch, str(folder))
    _check_model_args(args, str(folder))
    input_size = _as_list(pretrained_cfg.get("input_size", [3, 64, 64]))
    if arch.startswith("tinycnn"):
        if "stage_channels" not in args or "stage_repeats" not in args:  # a named variant exported without them
            args = {**_variant_architecture(arch, args, folder), **args}
        architecture = {"stage_channels": args["stage_channels"], "stage_repeats": args["stage_repeats"]}
    else:
        architecture = {"model_args": args}
    classes = _as_list(cfg.get("label_names") or pretrained_cfg.get("label_names")) or None
    descriptions = cfg.get("label_descriptions") or pretrained_cfg.get("label_descriptions") or {}
    names_known = (isinstance(descriptions, dict) and isinstance(classes, list)
                   and all(isinstance(c, str) for c in classes))
    meta = {
        "architecture": arch,
        **architecture,
        "num_classes": cfg.get("num_classes", pretrained_cfg.get("num_classes")),
        "in_chans": saved_args.get("in_chans", input_size[0] if isinstance(input_size, list) and input_size
                                   else None),
        "mean": _as_list(pretrained_cfg.get("mean", [0.485, 0.456, 0.406])),
        "std": _as_list(pretrained_cfg.get("std", [0.229, 0.224, 0.225])),
        "input_size": input_size,
        "classes": classes,
        "class_names": [descriptions.get(c, c) for c in classes] if names_known and descriptions else None,
        "extra": about.get("extra", {}),
        "tinycnn_version": about.get("version"),
    }
    return check_metadata(meta, folder)


def _as_list(value: Any) -> Any:
    """A JSON array as a list; anything else as it is (for check_metadata to refuse)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _variant_architecture(arch: str, args: Dict[str, Any], source: Path) -> Dict[str, list]:
    """stage_channels and stage_repeats of a named tinycnn variant, read off a model built on the meta device
    (`arch` and `args` already checked)."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(arch, num_classes=0, **args)
        return {"stage_channels": list(model.stage_channels), "stage_repeats": list(model.stage_repeats)}
    except Exception as e:  # bad arguments for the variant: one line, whatever timm raised
        raise WeightsError(f"{source}: timm cannot build the {arch} model its config describes "
                           f"({type(e).__name__}: {_show(str(e), 120)})") from None


def _weights_file(path: Path) -> Path:
    """The safetensors file of a weights path: the file itself, or model.safetensors in a model folder."""
    if not path.is_dir():
        return path
    if not (path / HUB_WEIGHTS).is_file():
        raise WeightsError(f"{path}: no {HUB_WEIGHTS} in the folder (tinycnn reads safetensors only; "
                           "export again with tinycnn-export)")
    return path / HUB_WEIGHTS


class _BoundedBuild(TorchFunctionMode):
    """Refuse (WeightsError) any tensor made by a torch factory function once their bytes pass `budget`.

    Each factory call runs on the meta device first, so an oversized tensor is refused before it exists.
    Used only for models timm cannot build on the meta device (see load_model).
    """

    def __init__(self, budget: int, source: str):
        super().__init__()
        self.budget, self.source, self.used = budget, source, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from torch.utils._device import _device_constructors

        if func not in _device_constructors():
            return func(*args, **kwargs)
        try:
            probe = func(*args, **{**kwargs, "device": "meta"})
            size = probe.numel() * probe.element_size() if isinstance(probe, torch.Tensor) else 0
        except Exception:  # a constructor meta cannot run: made for real, then counted
            size = None
        if size is not None:
            self._count(size)
        made = func(*args, **kwargs)
        if size is None and isinstance(made, torch.Tensor):
            self._count(made.numel() * made.element_size())
        return made

    def _count(self, size: int):
        self.used += size
        if self.used > self.budget:
            raise WeightsError(f"{self.source}: the model its metadata describes needs more than {self.budget:,} "
                               "bytes, far more than the tensors the file holds")


def _compare_with_file(model: nn.Module, shapes: Dict[str, Tuple[int, ...]], name: str, path: Path):
    """WeightsError naming the first key whose shape differs between `model`'s state_dict and the file."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    described, stored = (sum(math.prod(s) for s in d.values()) for d in (expected, shapes))
    problem = next((f"{k} is {list(s)} in the model but {list(shapes[k]) if k in shapes else 'missing'} in the file"
                    for k, s in expected.items() if shapes.get(k) != s), None)
    problem = problem or next((f"{k} ({list(s)}) is in the file but not in the model"
                               for k, s in shapes.items() if k not in expected), None)
    if problem or described != stored:
        raise WeightsError(f"{path}: the weights do not match the {name} model its metadata describes: "
                           f"{problem or 'different sizes'} ({described:,} values described, {stored:,} stored)")


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

    Nothing is built for real before it is known to match the file: the checked description is built on
    the meta device and its state_dict compared with the tensors the file's header lists (keys, shapes,
    value count). The real build is bounded too: the tensors torch's factory functions make during it
    may total at most twice the file's tensor bytes plus 64 MiB (a model's memory is its state_dict plus
    a few buffers and temporaries), each refused before it is allocated. A timm model that cannot be
    built on the meta device is built for real under that bound alone, then compared the same way.
    """
    import timm

    path = Path(path)
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
    weights_file = _weights_file(path)
    _, shapes, tensor_bytes = _open_safetensors(weights_file)

    def build():
        return timm.create_model(name, pretrained=False, num_classes=meta["num_classes"], in_chans=meta["in_chans"],
                                 pretrained_cfg_overlay=overlay, **{**args, **kwargs})

    def bounded_build():
        try:
            with _BoundedBuild(2 * tensor_bytes + 64 * 2 ** 20, str(path)):
                return build()
        except WeightsError:
            raise
        except Exception as e:  # arguments the architecture does not take, ...: one line, whatever timm raised
            raise WeightsError(f"{path}: timm cannot build the {name} model its metadata describes "
                               f"({type(e).__name__}: {_show(str(e), 120)})") from None

    try:
        with torch.device("meta"):
            described = build()
    except WeightsError:
        raise
    except Exception:  # timm cannot build this architecture on the meta device: the memory bound alone
        model = bounded_build()
        _compare_with_file(model, shapes, name, path)
    else:
        _compare_with_file(described, shapes, name, path)
        del described
        model = bounded_build()
    model.pretrained_cfg["architecture"] = meta["architecture"]
    state = load_file(str(weights_file), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # keys and shapes matched: only an unconvertible dtype is left
        raise WeightsError(f"{path}: the weights do not load into the {name} model "
                           f"({_show(str(e).splitlines()[0] if str(e) else '', 160)})") from None
    return model.to(device)
