"""Resumable training state without pickle: safetensors for tensors, JSON for everything else.

`save_state(folder, ...)` keeps what a stopped run needs to continue exactly where it stopped: the model's
weights, the optimizer's state, the lr scheduler, accelerate's fp16 GradScaler, each process's random number
generators and the run's counters; `load_state(folder, ...)` puts them back. A run folder may come from someone
else, so loading never unpickles anything (no pickle, no torch.load, no accelerate load_state): it reads only
the files it knows by name, checks every value against the live model and optimizer (shapes, dtypes, JSON
types) before using any of it, and refuses anything else in one line (StateError). Other files in the folder
are never opened.

Layout of the folder (RUN/state)::

    progress.json        the commit: counters (epoch, step, best accuracy, reason) and the slot holding the state
    slot-0/ or slot-1/   one complete save (while a save runs: the committed one and the one being written)
        model.safetensors                         the unwrapped model's state_dict
        ema.safetensors                           the weights' moving average (timm ModelEmaV3's module), when
                                                  the run keeps one (train.ema)
        optimizer.safetensors + optimizer.json    tensors as `state.<param index>.<name>`; groups and numbers
        scheduler.json                            the scheduler's state_dict without its lr functions
        scaler.json                               the fp16 GradScaler (only when the run has one)
        rng-<rank>.safetensors + rng-<rank>.json  per process: torch CPU (and CUDA/MPS) generators; python
                                                  `random` and numpy's global state

A save writes the slot that progress.json does not name, emptied first: every process its own rng files, the
main process the shared ones. Only when all of them are written does the main process replace progress.json
(an atomic rename) to name the new slot, then remove the old one. A kill at any moment therefore leaves
progress.json naming a complete save, the new one or the previous one, never a mix of the two.
"""
import itertools
import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.utils import unwrap_model

from .errors import TinycnnError
from .files import atomic_write

__all__ = ["save_state", "load_state", "has_saved_state", "StateError"]

FORMAT, VERSION = "tinycnn-state", 1
PROGRESS = "progress.json"
SLOTS = ("slot-0", "slot-1")
MODEL, OPTIMIZER_TENSORS, OPTIMIZER_JSON = "model.safetensors", "optimizer.safetensors", "optimizer.json"
EMA = "ema.safetensors"
SCHEDULER, SCALER = "scheduler.json", "scaler.json"
MAX_JSON_BYTES = 16 << 20  # optimizer.json: every parameter group's settings (and names); the others: a few kB
MAX_SMALL_JSON_BYTES = 1 << 20  # progress, scheduler, scaler, generators
MAX_PROCESSES = 1 << 16
_SCALAR_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)  # an optimizer's per-parameter numbers

# what accelerate's save_state wrote for earlier tinycnn versions: pickles, never loaded again
_ACCELERATE_FILES = re.compile(r"(pytorch_model.*\.bin|model(_\d+)?\.safetensors|(optimizer|scheduler|sampler|"
                               r"dl_state_dict)(_\d+)?\.bin|scaler\.pt|(random_states|custom_checkpoint)_\d+\.pkl)")


class StateError(TinycnnError, ValueError):
    """A state folder that tinycnn does not load: damaged, not a tinycnn state, or saved in the old pickle format."""


def _damaged(folder: Path, detail: str) -> StateError:
    detail = " ".join(str(detail).split())[:300]  # one line, whatever a file held
    return StateError(f"{folder} is not a tinycnn state folder or is damaged ({detail}): start a new run or "
                      f"--resume from a good copy")


# ============================================================================= saving

def save_state(folder: Union[str, Path], *, accelerator, model: torch.nn.Module, optimizer, scheduler,
               progress: Dict[str, Any], ema: Optional[torch.nn.Module] = None) -> None:
    """Save a resumable state into `folder` (every process calls this; see the module docstring for the order).

    progress: the run's counters (epoch, step, best_accuracy, best_epoch, reason), JSON values.
    ema: the run's timm ModelEmaV3 (its `module`'s state_dict is saved; it keeps no other state), or None.
    """
    folder = Path(folder)
    main, rank = accelerator.is_main_process, accelerator.process_index
    target = SLOTS[1] if _committed_slot(folder) == SLOTS[0] else SLOTS[0]
    slot = folder / target
    accelerator.wait_for_everyone()  # every process has read the commit before the main process changes anything
    if main:
        if folder.is_symlink():  # a link where the state goes (a folder someone else wrote): replaced, never followed
            folder.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        _remove(slot)
        slot.mkdir()
    accelerator.wait_for_everyone()
    tensors, meta = _rng_state(accelerator.device)
    _write_tensors(slot / f"rng-{rank}.safetensors", tensors)
    _write_json(slot / f"rng-{rank}.json", meta)
    if main:
        _write_tensors(slot / MODEL, {k: _cpu_copy(v) for k, v in unwrap_model(model).state_dict().items()})
        if ema is not None:
            _write_tensors(slot / EMA, {k: _cpu_copy(v) for k, v in _ema_module(ema).state_dict().items()})
        tensors, meta = _split_optimizer_state(optimizer.state_dict())
        _write_tensors(slot / OPTIMIZER_TENSORS, tensors)
        _write_json(slot / OPTIMIZER_JSON, meta)
        _write_json(slot / SCHEDULER, _json_values(
            {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}, "scheduler"))
        if getattr(accelerator, "scaler", None) is not None:
            _write_json(slot / SCALER, _json_values(accelerator.scaler.state_dict(), "scaler"))
    accelerator.wait_for_everyone()  # every file of the slot is written: commit it
    if main:
        _write_json(folder / PROGRESS, {**_json_values(progress, "progress"), "format": FORMAT, "version": VERSION,
                                        "slot": target, "processes": accelerator.num_processes})
        for name in SLOTS:
            if name != target:
                _remove(folder / name)
    accelerator.wait_for_everyone()


def _committed_slot(folder: Path) -> Optional[str]:
    """The slot progress.json names (our own folder, being written to), or None."""
    if not (folder / PROGRESS).is_file():  # (not a FIFO either: opening one would wait forever)
        return None
    try:
        with open(folder / PROGRESS, "rb") as f:
            slot = json.loads(f.read(MAX_SMALL_JSON_BYTES)).get("slot")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return slot if slot in SLOTS else None


def _remove(path: Path):
    """Remove one of our slot folders (a link, file or FIFO in its place is unlinked, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def _write_tensors(path: Path, tensors: Dict[str, torch.Tensor]):
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _write_json(path: Path, value: Any):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value)))


def _ema_module(ema: torch.nn.Module) -> torch.nn.Module:
    """The averaged model of a timm ModelEma* (its `module`), or `ema` itself when it is the model."""
    return getattr(ema, "module", ema)


def _json_values(value: Any, where: str) -> Any:
    """value as JSON (tuples become lists); anything else is a programming error: it cannot be saved without pickle."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_values(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_values(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where} holds a {type(value).__name__}, which a tinycnn state cannot save (JSON values only)")


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _split_optimizer_state(state_dict: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """An optimizer's state_dict as safetensors tensors (`state.<param index>.<name>`,
    `param_groups.<group>.<name>`) and JSON for the rest (param_groups, per-parameter numbers)."""
    tensors, per_param, groups = {}, {}, []
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = _cpu_copy(value)
            else:
                per_param.setdefault(str(index), {})[name] = _json_values(value, f"optimizer state {index}.{name}")
    for g, group in enumerate(state_dict["param_groups"]):
        kept = {}
        for name, value in group.items():
            if torch.is_tensor(value):
                tensors[f"param_groups.{g}.{name}"] = _cpu_copy(value)
            else:
                kept[name] = _json_values(value, f"optimizer param group {g}.{name}")
        groups.append(kept)
    return tensors, {"param_groups": groups, "state": per_param}


def _rng_state(device: torch.device) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """This process's generators: torch CPU (and the run's CUDA devices or MPS) as uint8 tensors; python
    `random` and numpy's legacy global state as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    elif device.type == "mps":
        tensors["mps"] = torch.mps.get_rng_state()
    version, internal, gauss_next = random.getstate()
    meta: Dict[str, Any] = {"python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    if "numpy" in sys.modules:  # only when something imported it: its global state is then in use
        algorithm, keys, pos, has_gauss, cached_gaussian = sys.modules["numpy"].random.get_state()
        meta["numpy"] = {"algorithm": algorithm, "keys": [int(k) for k in keys], "pos": int(pos),
                         "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {k: _cpu_copy(v) for k, v in tensors.items()}, meta


# ============================================================================= loading

def has_saved_state(folder: Union[str, Path]) -> bool:
    """True when `folder` holds a saved state to resume from (or the old pickle format, which load_state refuses);
    False when nothing was committed yet (a run killed during its first save included)."""
    folder = Path(folder)
    return (folder / PROGRESS).is_file() or bool(_accelerate_files(folder))


def _accelerate_files(folder: Path) -> List[str]:
    try:
        names = [p.name for p in itertools.islice(folder.iterdir(), 10_000)]  # bounded: a folder others wrote
    except OSError:  # no folder (or not a readable one): nothing saved by accelerate
        return []
    return sorted(name for name in names if _ACCELERATE_FILES.fullmatch(name))


def load_state(folder: Union[str, Path], *, accelerator, model: torch.nn.Module, optimizer,
               scheduler, ema: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
    """Load the state saved in `folder` into the live model, optimizer, scheduler, scaler, EMA (when given) and
    this process's generators; returns the counters (epoch, step, best_accuracy, best_epoch, reason).

    Everything is read and checked first, then applied: a folder the checks refuse (StateError, one line) changes
    nothing. With `ema`, a state saved without one is refused (the run was trained without train.ema).
    """
    folder = Path(folder)
    progress = _read_progress(folder)
    slot = folder / progress.pop("slot")
    processes = progress.pop("processes")
    model = unwrap_model(model)
    weights = _read_model(folder, slot, model)
    ema_weights = None
    if ema is not None:
        if not (slot / EMA).exists() and not (slot / EMA).is_symlink():
            raise StateError(f"{folder} holds no moving average of the weights (the run was trained without "
                             f"train.ema): resume it without train.ema=true, or start a new run")
        ema_weights = _read_model(folder, slot, _ema_module(ema), EMA)
    optimizer_state = _read_optimizer(folder, slot, optimizer)
    scheduler_state = _read_scheduler(folder, slot, scheduler)
    # LambdaLR's lr functions are code: the live ones stay (None: nothing to update in them)
    lr_functions = {"lr_lambdas": [None] * len(scheduler.lr_lambdas)} if hasattr(scheduler, "lr_lambdas") else {}
    scaler = getattr(accelerator, "scaler", None)
    scaler_state = _read_numbers(folder, slot / SCALER, scaler.state_dict()) if scaler is not None else None
    rank = accelerator.process_index
    # a process the saved run did not have keeps its freshly seeded generators (as accelerate did)
    rng = _read_rng(folder, slot, rank, accelerator.device) if rank < processes else None
    try:
        model.load_state_dict(weights)
        if ema_weights is not None:
            _ema_module(ema).load_state_dict(ema_weights)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict({**scheduler_state, **lr_functions})
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        if rng is not None:
            rng()
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise _damaged(folder, f"{type(e).__name__}: {e}") from None
    return progress


def _read_progress(folder: Path) -> Dict[str, Any]:
    path = folder / PROGRESS
    old = _accelerate_files(folder)
    if not path.is_file() and not old:
        raise _damaged(folder, f"no {PROGRESS}")
    data = _read_json(folder, path, MAX_SMALL_JSON_BYTES) if path.is_file() else None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        if old:
            raise StateError(f"{folder} was saved by an older tinycnn (accelerate's pickle files: "
                             f"{', '.join(old[:3])}), a format that is no longer loaded for safety: start a new run")
        raise _damaged(folder, f"{PROGRESS} is not a tinycnn progress record")
    if data.get("version") != VERSION:
        raise _damaged(folder, f"{PROGRESS}: format version {data.get('version')!r}, this tinycnn reads {VERSION}")

    def check(name, ok, expected):
        if name not in data or not ok(data[name]):
            raise _damaged(folder, f"{PROGRESS}: {name} must be {expected}, got {data.get(name)!r}")

    count = lambda v: _is_int(v) and v >= 0  # noqa: E731
    check("slot", lambda v: v in SLOTS, " or ".join(SLOTS))
    check("processes", lambda v: _is_int(v) and 1 <= v <= MAX_PROCESSES, "a number of processes")
    check("epoch", count, "a count")
    check("step", count, "a count")
    check("best_accuracy", _is_number, "a number")
    check("best_epoch", lambda v: v is None or count(v), "an epoch or null")
    if "reason" in data:
        check("reason", lambda v: isinstance(v, str), "text")
    return {k: data[k] for k in ("epoch", "step", "best_accuracy", "best_epoch", "reason", "slot", "processes")
            if k in data}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_json(folder: Path, path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    if not path.is_file():
        raise _damaged(folder, f"{path.relative_to(folder)} is missing")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise _damaged(folder, f"{path.relative_to(folder)} cannot be read: {e.strerror or e}") from None
    if len(data) > limit:
        raise _damaged(folder, f"{path.relative_to(folder)} is over {limit >> 20} MiB")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _damaged(folder, f"{path.relative_to(folder)} is not JSON: {e}") from None


class _Tensors:
    """A safetensors file read by name: shapes are checked before a tensor is read (memory bounded by what the
    live model expects, whatever the file declares)."""

    def __init__(self, folder: Path, path: Path):
        self.folder, self.name = folder, str(path.relative_to(folder))
        if not path.is_file():
            raise _damaged(folder, f"{self.name} is missing")
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            self.keys = list(self._file.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise _damaged(folder, f"{self.name} is not a safetensors file: {e}") from None

    def get(self, key: str, shapes: Tuple[Tuple[int, ...], ...], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The tensor `key`, refused unless its shape is one of `shapes` (and its dtype `dtype`, when given)."""
        try:
            found = tuple(self._file.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise _damaged(self.folder, f"{self.name}: {key!r} cannot be read: {e}") from None
        if found not in [tuple(s) for s in shapes]:
            raise _damaged(self.folder, f"{self.name}: {key!r} has shape {list(found)}, expected "
                                        f"{' or '.join(str(list(s)) for s in shapes)}")
        try:
            # a copy: get_tensor maps the file, and the optimizer keeps (and updates) what it is given
            tensor = self._file.get_tensor(key).clone()
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise _damaged(self.folder, f"{self.name}: {key!r} cannot be read: {e}") from None
        if dtype is not None and tensor.dtype != dtype:
            raise _damaged(self.folder, f"{self.name}: {key!r} is {tensor.dtype}, expected {dtype}")
        return tensor


def _read_model(folder: Path, slot: Path, model: torch.nn.Module, name: str = MODEL) -> Dict[str, torch.Tensor]:
    """The weights saved as `name` in the slot: exactly the live model's keys, each of its shape and dtype."""
    live = model.state_dict()
    file = _Tensors(folder, slot / name)
    if set(file.keys) != set(live):
        missing, unexpected = sorted(set(live) - set(file.keys)), sorted(set(file.keys) - set(live))
        raise _damaged(folder, f"{file.name} does not match the model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    return {k: file.get(k, (tuple(v.shape),), v.dtype) for k, v in live.items()}


def _kind(value: Any) -> str:
    """The JSON kind of a value, for comparing a saved value with the live one (int and float are one kind)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "list"
    if torch.is_tensor(value):
        return "tensor"
    return type(value).__name__


def _like(folder: Path, where: str, saved: Any, live: Any) -> Any:
    """saved (from JSON) checked against the live value's kind (lists element by element, the same length);
    given back as the live value's type for tuples, so a restored state equals the saved one."""
    if _kind(saved) != _kind(live):
        raise _damaged(folder, f"{where} is {_kind(saved)} {saved!r:.60}, the live value is {_kind(live)}")
    if isinstance(live, (list, tuple)):
        if len(saved) != len(live):
            raise _damaged(folder, f"{where} has {len(saved)} values, the live one {len(live)}")
        values = [_like(folder, f"{where}[{i}]", s, v) for i, (s, v) in enumerate(zip(saved, live))]
        return tuple(values) if isinstance(live, tuple) else values
    return saved


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _read_optimizer(folder: Path, slot: Path, optimizer) -> Dict[str, Any]:
    """The saved optimizer state_dict, every value checked against the live optimizer (its groups, its parameters'
    shapes and dtypes)."""
    live = optimizer.state_dict()
    meta = _read_json(folder, slot / OPTIMIZER_JSON)
    if not isinstance(meta, dict) or set(meta) != {"param_groups", "state"} or \
            not isinstance(meta["param_groups"], list) or not isinstance(meta["state"], dict):
        raise _damaged(folder, f"{OPTIMIZER_JSON} is not an optimizer state")
    if len(meta["param_groups"]) != len(live["param_groups"]):
        raise _damaged(folder, f"{OPTIMIZER_JSON} has {len(meta['param_groups'])} parameter groups, the optimizer "
                               f"{len(live['param_groups'])}")
    params = {}  # the state_dict's parameter index -> the live parameter
    for live_group, group in zip(live["param_groups"], optimizer.param_groups):
        params.update(zip(live_group["params"], group["params"]))
    file = _Tensors(folder, slot / OPTIMIZER_TENSORS)
    tensors: Dict[str, Dict[str, torch.Tensor]] = {"state": {}, "param_groups": {}}
    for key in file.keys:
        match = re.fullmatch(r"(state|param_groups)\.(0|[1-9][0-9]{0,8})\.(.+)", key, flags=re.S)
        if not match:
            raise _damaged(folder, f"{OPTIMIZER_TENSORS}: unexpected tensor {key!r}")
        tensors[match[1]].setdefault(int(match[2]), {})[match[3]] = key

    groups = []
    for g, (saved, live_group) in enumerate(zip(meta["param_groups"], live["param_groups"])):
        where = f"{OPTIMIZER_JSON} param group {g}"
        if not isinstance(saved, dict):
            raise _damaged(folder, f"{where} is not a mapping")
        tensor_keys = tensors["param_groups"].pop(g, {})
        names = set(saved) | set(tensor_keys)
        if names != set(live_group) or set(saved) & set(tensor_keys):
            raise _damaged(folder, f"{where} has settings {sorted(names)[:12]}, the optimizer "
                                   f"{sorted(live_group)[:12]}")
        if saved.get("params") != live_group["params"]:
            raise _damaged(folder, f"{where} holds other parameters than the optimizer")
        group = {name: _like(folder, f"{where} {name}", value, live_group[name]) for name, value in saved.items()
                 if name != "params"}
        for name, key in tensor_keys.items():
            if not torch.is_tensor(live_group[name]):
                raise _damaged(folder, f"{where} {name} is a tensor, the live value is {_kind(live_group[name])}")
            group[name] = file.get(key, (tuple(live_group[name].shape),), live_group[name].dtype)
        groups.append({**group, "params": list(live_group["params"])})
    if tensors["param_groups"]:
        raise _damaged(folder, f"{OPTIMIZER_TENSORS}: tensors for group {min(tensors['param_groups'])}, which the "
                               f"optimizer does not have")

    state: Dict[int, Dict[str, Any]] = {}
    for index, values in meta["state"].items():
        if not (re.fullmatch(r"0|[1-9][0-9]{0,8}", index) and int(index) in params) or not isinstance(values, dict):
            raise _damaged(folder, f"{OPTIMIZER_JSON}: state for {index!r:.40}, which is not a parameter index")
        for name, value in values.items():
            if not _is_scalar(value):
                raise _damaged(folder, f"{OPTIMIZER_JSON}: state {index}.{name} is a {_kind(value)}, not a number")
            state.setdefault(int(index), {})[name] = value
    for index, keys in tensors["state"].items():
        if index not in params:
            raise _damaged(folder, f"{OPTIMIZER_TENSORS}: state for parameter {index}, which the optimizer does "
                                   f"not have")
        param = params[index]
        for name, key in keys.items():
            if name in state.get(index, {}):
                raise _damaged(folder, f"state {index}.{name} is in both {OPTIMIZER_JSON} and {OPTIMIZER_TENSORS}")
            # a per-element buffer (exp_avg, momentum_buffer, ...) is shaped and typed like its parameter;
            # a scalar (Adam's step) is a number
            tensor = file.get(key, (tuple(param.shape), ()))
            if tensor.dtype != param.dtype and (tensor.dim() > 0 or tensor.dtype not in _SCALAR_DTYPES):
                raise _damaged(folder, f"{OPTIMIZER_TENSORS}: {key!r} is {tensor.dtype}, parameter {index} is "
                                       f"{param.dtype}")
            state.setdefault(index, {})[name] = tensor
    return {"state": state, "param_groups": groups}


def _read_scheduler(folder: Path, slot: Path, scheduler) -> Dict[str, Any]:
    live = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    return _read_numbers(folder, slot / SCHEDULER, live)


def _read_numbers(folder: Path, path: Path, live: Dict[str, Any]) -> Dict[str, Any]:
    """A JSON state_dict (scheduler, scaler) with exactly the live one's keys and kinds of value: no other key
    reaches load_state_dict (which sets them as attributes)."""
    saved = _read_json(folder, path, MAX_SMALL_JSON_BYTES)
    name = path.name
    if not isinstance(saved, dict) or set(saved) != set(live):
        keys = sorted(saved)[:8] if isinstance(saved, dict) else _kind(saved)
        raise _damaged(folder, f"{name} holds {keys}, expected {sorted(live)[:8]}")
    return {k: _like(folder, f"{name} {k}", saved[k], v) for k, v in live.items()}


def _read_rng(folder: Path, slot: Path, rank: int, device: torch.device):
    """Check this process's saved generator states; returns the function that sets them."""
    meta = _read_json(folder, slot / f"rng-{rank}.json", MAX_SMALL_JSON_BYTES)
    file = _Tensors(folder, slot / f"rng-{rank}.safetensors")
    torch_state = file.get("torch", (tuple(torch.get_rng_state().shape),), torch.uint8)
    cuda, mps = {}, None
    for key in file.keys:
        match = re.fullmatch(r"cuda\.(0|[1-9][0-9]{0,3})", key)
        if key != "torch" and key != "mps" and not match:
            raise _damaged(folder, f"{file.name}: unexpected tensor {key!r}")
        # generators of a device kind the resumed run does not use (a GPU run resumed on the CPU) are left alone
        if match and device.type == "cuda" and int(match[1]) < torch.cuda.device_count():
            live = torch.cuda.get_rng_state(int(match[1]))
            cuda[int(match[1])] = file.get(key, (tuple(live.shape),), torch.uint8)
        if key == "mps" and device.type == "mps":
            mps = file.get(key, (tuple(torch.mps.get_rng_state().shape),), torch.uint8)

    where = f"rng-{rank}.json"
    python = meta.get("python") if isinstance(meta, dict) else None
    version, internal, gauss_next = random.getstate()
    if not isinstance(python, dict) or python.get("version") != version or \
            not _uint32s(python.get("state"), len(internal)) or not 0 <= python["state"][-1] <= 624 or \
            not (python.get("gauss_next") is None or _is_number(python.get("gauss_next"))):
        raise _damaged(folder, f"{where}: not a python random state")
    python_state = (version, tuple(python["state"]), python["gauss_next"])
    numpy_state = meta.get("numpy")
    if numpy_state is not None:
        ok = (isinstance(numpy_state, dict) and numpy_state.get("algorithm") == "MT19937"
              and _uint32s(numpy_state.get("keys"), 624) and _is_int(numpy_state.get("pos"))
              and 0 <= numpy_state["pos"] <= 624 and numpy_state.get("has_gauss") in (0, 1)
              and _is_number(numpy_state.get("cached_gaussian")))
        if not ok:
            raise _damaged(folder, f"{where}: not a numpy random state")
    if set(meta) - {"python", "numpy"}:
        raise _damaged(folder, f"{where}: unexpected entries {sorted(set(meta) - {'python', 'numpy'})[:4]}")

    def apply():
        torch.set_rng_state(torch_state)
        for index, state in cuda.items():
            torch.cuda.set_rng_state(state, index)
        if mps is not None:
            torch.mps.set_rng_state(mps)
        random.setstate(python_state)
        if numpy_state is not None:
            import numpy as np
            np.random.set_state((numpy_state["algorithm"], np.array(numpy_state["keys"], dtype=np.uint32),
                                 numpy_state["pos"], numpy_state["has_gauss"], float(numpy_state["cached_gaussian"])))
    return apply


def _uint32s(values: Any, length: int) -> bool:
    return (isinstance(values, list) and len(values) == length
            and all(_is_int(v) and 0 <= v < 1 << 32 for v in values))
