"""Run configuration: YAML files, dotted `key=value` overrides, validation against the defaults.

The defaults below are the recommended recipe for the default model; every key a config may hold is
here, so an unknown key is an error that names the closest valid one. The course project's own
config layout (stage_repeats, stage_channels, train.{seed, device, batch_size, epochs, max_steps,
overfit_small, val_subset_size, optimizer.{name, lr, weight_decay, momentum}}) is a subset and loads
unchanged.
"""
import copy
import difflib
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import yaml

__all__ = ["DEFAULTS", "ConfigError", "load_config", "apply_overrides", "parse_value", "flatten"]

DEFAULTS: Dict[str, Any] = {
    "model": "tinycnn",                 # a timm model name; stage_* below override its widths and depths
    "stage_repeats": [2, 2, 2],
    "stage_channels": [64, 128, 256],
    "drop_rate": 0.0,
    "run_name": None,                   # default: the config file's name
    "data": {
        "root": "shards/tiny-imagenet",  # a tinycnn-prepare output folder
        "source": None,                 # prepare from this zip/folder/parquet folder when root does not exist
        "download": True,               # ... or download the official zip when there is no source
        "train_split": "train",
        "val_split": "val",
        "test_split": "test",
        "num_workers": None,            # decoding processes per rank (default: the cores, up to 8)
        "shuffle_buffer": 2048,
        "device_resident": False,       # keep the decoded train split on the device after epoch 1
        "skip_bad": False,
    },
    "augment": {                        # tinycnn.augment.GPUAugment, on the device, per sample
        "enabled": True,
        "crop_padding": 4,
        "flip_p": 0.5,
        "brightness": 0.2,
        "contrast": 0.2,
        "saturation": 0.2,
        "hue": 0.05,
    },
    "train": {
        "seed": 42,
        "device": "auto",               # cpu, cuda, mps or auto
        "batch_size": 256,              # per process
        "epochs": 20,
        "max_steps": None,              # stop after this many optimizer steps (overrides epochs)
        "overfit_small": False,         # train on a small fixed train subset, no augmentation
        "overfit_small_size": 4096,
        "val_subset_size": None,        # evaluate on the first N val samples only
        "label_smoothing": 0.1,
        "grad_accum_steps": 1,
        "grad_clip": None,
        "mixed_precision": "auto",      # no, bf16, fp16; auto = bf16 on a GPU that has it, else no
        "compile": False,
        "channels_last": "auto",        # auto = on CUDA
        "deterministic": False,
        "log_every": 50,                # steps between train/loss points in TensorBoard
        "eval_every": 1,                # epochs
        "optimizer": {
            "name": "adamw",            # sgd, adam, adamw, rmsprop
            "lr": 0.003,
            "weight_decay": 0.05,
            "momentum": 0.9,            # sgd, rmsprop
            "nesterov": True,           # sgd
            "betas": [0.9, 0.999],      # adam, adamw
            "fused": "auto",            # fused kernels where the device has them
        },
        "scheduler": {
            "name": "cosine",           # none, cosine (linear warmup then cosine), onecycle
            "warmup_epochs": 1.0,
            "min_lr_ratio": 0.01,       # cosine floor as a fraction of lr
            "pct_start": 0.25,          # onecycle
        },
    },
    "lr_finder": {
        "min_lr": 1e-6,
        "max_lr": 1.0,
        "num_iters": 100,
        "smooth": 0.98,
        "diverge_factor": 4.0,
    },
    "grid": {                           # grid_search.py: every combination, `epochs` each
        "lr": [0.001, 0.002, 0.005],
        "weight_decay": [1e-5, 1e-4],
        "stage_channels": [[48, 96, 192], [64, 128, 256]],
        "stage_repeats": [[1, 1, 1], [2, 2, 2], [3, 3, 3]],
        "epochs": 3,
    },
}

class ConfigError(ValueError):
    pass


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(text: str) -> Any:
    """A command-line value: YAML, with `1e-5` read as a number (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(text)
    return _numbers(value)


def _numbers(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        v = float(value)
        return int(v) if re.match(r"^[+-]?\d+$", value.strip()) else v
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _closest(key: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid keys: {', '.join(sorted(options))})"


def _merge(base: Dict[str, Any], update: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {path!r}{_closest(key, base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} holds a section, got {value!r}")
            _merge(base[key], value, f"{path}.")
        else:
            base[key] = value
    return base


def apply_overrides(cfg: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML: `stage_channels=[16,32,64]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=5)")
        key, text = item.split("=", 1)
        nested: Dict[str, Any] = {}
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node[part] = {}
            node = node[part]
        node[parts[-1]] = parse_value(text)
        _merge(cfg, nested)
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """DEFAULTS, updated by the YAML file at `path`, then by `overrides`."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (see recipes/configs/ for examples)")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file holds a mapping of keys, got {type(data).__name__}")
        try:
            _merge(cfg, _numbers(data))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if cfg["run_name"] is None:
            cfg["run_name"] = path.stem
    apply_overrides(cfg, overrides)
    _check(cfg)
    return cfg


def _check(cfg: Dict[str, Any]):
    t = cfg["train"]
    if len(cfg["stage_channels"]) != len(cfg["stage_repeats"]):
        raise ConfigError(f"stage_channels {cfg['stage_channels']} and stage_repeats {cfg['stage_repeats']} "
                          "need one entry per stage")
    choices = {
        "train.device": (t["device"], ("auto", "cpu", "cuda", "mps")),
        "train.optimizer.name": (t["optimizer"]["name"], ("sgd", "adam", "adamw", "rmsprop")),
        "train.scheduler.name": (str(t["scheduler"]["name"]).lower(), ("none", "cosine", "onecycle")),
        "train.mixed_precision": (t["mixed_precision"], ("auto", "no", "bf16", "fp16")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed and not (key == "train.device" and str(value).startswith(("cuda:", "mps"))):
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    for key in ("batch_size", "epochs", "grad_accum_steps"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {t[key]!r}")
    if not isinstance(t["optimizer"]["lr"], (int, float)) or t["optimizer"]["lr"] <= 0:
        raise ConfigError(f"train.optimizer.lr must be a positive number, got {t['optimizer']['lr']!r}")


def flatten(cfg: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1} (for TensorBoard hparams and reports)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
