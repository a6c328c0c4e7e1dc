"""Run configuration: a typed schema, YAML files, dotted `key=value` overrides, all checked before a run starts.

The dataclasses below are the schema and their defaults are the recommended recipe for the default model.
`load_config` merges defaults < YAML file < overrides, then checks every key's type and range, so a mistyped value
fails at once with the key, the expected type and the value given, before anything is written. An unknown key is
an error that names the closest valid one. The course project's own config layout (stage_repeats, stage_channels,
train.{seed, device, batch_size, epochs, max_steps, overfit_small, val_subset_size, optimizer.{name, lr,
weight_decay, momentum}}) is a subset and loads unchanged. The training-recipe options (augment.policy and
augment.erase_*, the mixup: section, train.ema, train.tta) are all off by default; recipes/configs/timm-like.yaml
turns them on together.

A config file (and a saved run's config.yaml, read again on --resume) may come from anyone: `read_yaml` reads at
most MAX_CONFIG_BYTES of UTF-8 text without YAML anchors and aliases or deep nesting, every number must be finite
and under a sane cap (no 10**100 epochs), and `run_name` is a plain name, never a path. Each refusal is one
ConfigError line naming the file or the key.
"""
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Optional, Union

import yaml

from .errors import TinycnnError

__all__ = ["Config", "DataConfig", "AugmentConfig", "MixupConfig", "TrainConfig", "OptimizerConfig",
           "SchedulerConfig", "LRFinderConfig", "GridConfig", "ConfigError", "load_config", "parse_value", "flatten",
           "model_kwargs", "is_tinycnn_model", "from_dict", "check_model_name", "read_yaml", "safe_yaml_load",
           "check_run_name", "MAX_CONFIG_BYTES"]


class ConfigError(TinycnnError, ValueError):
    pass


def _range(ge=None, gt=None, le=None, lt=None, cap=None) -> Dict[str, Any]:
    """A key's range; `cap`: the largest sane value, refused above it (a typo, or a config meant to exhaust time
    or memory: 10**100 epochs)."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, "cap": cap}


MAX_CONFIG_BYTES = 256 << 10  # a config file is a page of keys (a few KiB): anything larger is not one
MAX_CHANNELS = 8192          # per stage
MAX_REPEATS = 256            # blocks per stage
MAX_GRID_RUNS = 10_000       # runs of one grid search (combinations x seeds)
# A run name is a folder name (checkpoints/<run_name>, a grid's OUTPUT/<name>): never a path.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}")


@dataclass
class DataConfig:
    root: str = "shards/tiny-imagenet"          # a tinycnn-prepare output folder, or a URL serving one
    source: Optional[str] = None                # zip/folder/parquet folder the shards are (to be) made from
    download: bool = True                       # the default root only: download the official zip when missing
    train_split: str = "train"
    val_split: str = "val"
    # per process; default: cores - 1, shared
    num_workers: Optional[int] = field(default=None, metadata=_range(ge=0, cap=256))
    shuffle_buffer: int = field(default=2048, metadata=_range(ge=1, cap=1_000_000))
    device_resident: bool = False               # keep the decoded train split on the device after epoch 1
    skip_bad: bool = False                      # skip (and count) unreadable samples instead of stopping
    cache_dir: Optional[str] = None             # a URL root's shards kept on local disk after the first read
    cache_max_bytes: Optional[int] = field(default=None, metadata=_range(ge=0))  # default: 50 GiB (tinycnn.cache)


@dataclass
class AugmentConfig:                            # tinycnn.augment.GPUAugment, on the device, per sample
    enabled: bool = True
    crop_padding: Optional[int] = field(default=4, metadata=_range(ge=0, le=32))
    flip_p: float = field(default=0.5, metadata=_range(ge=0, le=1))
    brightness: float = field(default=0.2, metadata=_range(ge=0, cap=10))
    contrast: float = field(default=0.2, metadata=_range(ge=0, cap=10))
    saturation: float = field(default=0.2, metadata=_range(ge=0, cap=10))
    hue: float = field(default=0.05, metadata=_range(ge=0, le=0.5))
    # after crop and flip, before the colour jitter (timm switches the jitter off with a policy: set it to 0)
    policy: Optional[Literal["trivialaugment", "randaugment"]] = None  # TrivialAugmentWide or RandAugment
    ra_num_ops: int = field(default=2, metadata=_range(ge=0, le=16))         # randaugment: ops per image
    ra_magnitude: int = field(default=9, metadata=_range(ge=0, le=1023))     # randaugment: a bin below policy_bins
    policy_bins: int = field(default=31, metadata=_range(ge=2, le=1024))
    policy_fill: Optional[List[float]] = field(default=None, metadata=_range(ge=0, le=255))  # 1 or 3 values; null: 0
    # timm RandomErasing, on the normalized image
    erase_p: float = field(default=0.0, metadata=_range(ge=0, le=1))         # per image; 0: off
    erase_mode: Literal["pixel", "rand", "const"] = "pixel"
    erase_count: int = field(default=1, metadata=_range(ge=1, le=16))        # boxes: 1..erase_count per image
    erase_area: List[float] = field(default_factory=lambda: [0.02, 1 / 3], metadata=_range(gt=0, le=1))
    erase_aspect: List[float] = field(default_factory=lambda: [0.3, 1 / 0.3], metadata=_range(gt=0, cap=1000))


@dataclass
class MixupConfig:                              # tinycnn.augment.MixupCutmix (timm's Mixup), after the augmentation
    mixup_alpha: float = field(default=0.0, metadata=_range(ge=0, cap=1000))   # 0 with cutmix_alpha 0: off
    cutmix_alpha: float = field(default=0.0, metadata=_range(ge=0, cap=1000))
    prob: float = field(default=1.0, metadata=_range(ge=0, le=1))              # of mixing an image (or batch)
    switch_prob: float = field(default=0.5, metadata=_range(ge=0, le=1))       # of cutmix over mixup, both on
    mode: Literal["elem", "pair", "batch"] = "elem"                            # a lambda per image, pair, batch


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    lr: float = field(default=0.003, metadata=_range(gt=0))  # any finite lr: one that diverges stops the run
    weight_decay: float = field(default=0.05, metadata=_range(ge=0, cap=1_000_000))  # never on norms and biases
    momentum: float = field(default=0.9, metadata=_range(ge=0, lt=1))  # sgd, rmsprop
    nesterov: bool = True                                             # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    fused: Union[Literal["auto"], bool] = "auto"                      # fused kernels where the device has them


@dataclass
class SchedulerConfig:
    name: Literal["none", "cosine", "onecycle"] = "cosine"  # cosine: linear warmup then cosine
    warmup_epochs: float = field(default=1.0, metadata=_range(ge=0, cap=100_000))
    min_lr_ratio: float = field(default=0.01, metadata=_range(ge=0, le=1))  # cosine floor as a fraction of lr
    pct_start: float = field(default=0.25, metadata=_range(gt=0, lt=1))     # onecycle


@dataclass
class TrainConfig:
    seed: int = field(default=42, metadata=_range(ge=0, cap=2**32 - 1))  # numpy's seeds are 32-bit
    device: str = "auto"                       # auto, cpu, cuda or mps (a GPU: CUDA_VISIBLE_DEVICES)
    batch_size: int = field(default=256, metadata=_range(ge=1, cap=65536))   # per process
    epochs: int = field(default=20, metadata=_range(ge=1, cap=100_000))
    max_steps: Optional[int] = field(default=None, metadata=_range(ge=1, cap=10**9))  # optimizer steps, over epochs
    overfit_small: bool = False                # the memorization check: a small train subset, no regularization
    overfit_small_size: int = field(default=4096, metadata=_range(ge=1, cap=10**7))
    val_subset_size: Optional[int] = field(default=None, metadata=_range(ge=1, cap=10**9))  # evaluate the first N only
    label_smoothing: float = field(default=0.1, metadata=_range(ge=0, lt=1))
    grad_accum_steps: int = field(default=1, metadata=_range(ge=1, cap=4096))
    grad_clip: Optional[float] = field(default=None, metadata=_range(gt=0, cap=1_000_000))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 where the GPU has it; MPS: bf16 or fp16
    compile: bool = False
    channels_last: Union[Literal["auto"], bool] = "auto"             # auto: on CUDA
    deterministic: bool = False
    log_every: int = field(default=50, metadata=_range(ge=1, cap=10**9))    # steps between train/loss points
    eval_every: int = field(default=1, metadata=_range(ge=1, cap=10**9))    # epochs between evaluations
    save_every: int = field(default=1, metadata=_range(ge=1, cap=10**9))    # epochs between last.safetensors + state/
    # also save state/ every N optimizer steps within an epoch (long epochs on a preemptible cluster); None: off
    save_every_steps: Optional[int] = field(default=None, metadata=_range(ge=1, cap=10**9))
    progress_seconds: float = field(default=30.0, metadata=_range(gt=0, cap=1_000_000))  # plain lines off a TTY
    # an exponential moving average of the weights (timm's ModelEmaV3), evaluated beside them; the better is best
    ema: bool = False
    ema_decay: float = field(default=0.999, metadata=_range(ge=0, lt=1))
    ema_warmup: bool = False                    # timm's use_warmup: decay 1 - (1 + step) ** -2/3, up to ema_decay
    tta: Optional[Literal["flip"]] = None      # the evaluations' test-time augmentation: mean logits with the mirror
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class LRFinderConfig:
    min_lr: float = field(default=1e-6, metadata=_range(gt=0, cap=10**9))
    max_lr: float = field(default=1.0, metadata=_range(gt=0, cap=10**9))
    num_iters: int = field(default=100, metadata=_range(ge=2, cap=100_000))
    smooth: float = field(default=0.98, metadata=_range(ge=0, lt=1))
    diverge_factor: float = field(default=4.0, metadata=_range(gt=1, cap=1_000_000))


@dataclass
class GridConfig:  # grid_search.py's Optuna study: GridSampler tries every combination, TPE their ranges; `epochs` each
    lr: Union[List[float], float] = field(default_factory=lambda: [0.001, 0.002, 0.005],
                                          metadata=_range(gt=0, cap=1_000_000))
    weight_decay: Union[List[float], float] = field(default_factory=lambda: [1e-5, 1e-4],
                                                    metadata=_range(ge=0, cap=1_000_000))
    stage_channels: Union[List[List[int]], List[int]] = field(default_factory=lambda: [[48, 96, 192], [64, 128, 256]])
    stage_repeats: Union[List[List[int]], List[int]] = field(default_factory=lambda: [[1, 1, 1], [2, 2, 2], [3, 3, 3]])
    epochs: int = field(default=3, metadata=_range(ge=1, cap=100_000))
    # each point trained once per seed (train.seed), shown as mean ± sd over them; empty: once, with train.seed
    seeds: List[int] = field(default_factory=list, metadata=_range(ge=0, cap=2**32 - 1))


@dataclass
class Config:
    model: str = "tinycnn"                     # any timm model name; stage_* and the tinycnn variants go together
    stage_repeats: Optional[List[int]] = None  # tinycnn models only; null: the variant's own (2, 2, 2 for tinycnn)
    stage_channels: Optional[List[int]] = None  # tinycnn models only; null: the variant's own (64, 128, 256)
    drop_rate: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    run_name: Optional[str] = None             # a plain name (a folder's); default: the config file's name
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_finder: LRFinderConfig = field(default_factory=LRFinderConfig)
    grid: GridConfig = field(default_factory=GridConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: Iterable[str]) -> "Config":
        """A checked copy with dotted `key=value` overrides applied."""
        data = self.to_dict()
        _apply_overrides(data, overrides)
        return from_dict(data)


# ---------------------------------------------------------------------------------------------- parsing values

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(text: str) -> Any:
    """A command-line value: YAML, with `1e-5` read as a number (YAML 1.1 reads it as a string)."""
    try:
        value = safe_yaml_load(text)
    except (yaml.YAMLError, ConfigError, ValueError, RecursionError):
        value = text  # e.g. `[16,32` : kept as text, then refused by the type check with the key's name
    return _numbers(value)


def _numbers(value: Any) -> Any:
    text = value.strip(" \t\r\n") if isinstance(value, str) else None  # int() strips more (\x1f): not a number then
    if text is not None and len(text) < 400 and _NUMBER.match(text):
        if re.match(r"^[+-]?\d+$", text):
            return int(text)  # exactly: a float on the way would make 10**400 an error, 2**53 + 1 inexact
        return float(text)  # 1e400 is inf: refused by the type check, naming the key
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- checking types

def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in inner)
        return f"{text} or null" if len(inner) < len(args) else text
    if origin in (list, List):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


class _NotFinite(Exception):
    """inf, nan, or an integer too large for a float, where a number is wanted."""


def _shown(value: Any, limit: int = 80) -> str:
    """repr(value) for a one-line message: a 1 MiB list or a 400-digit number is cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _coerce(tp, value: Any) -> Any:
    """`value` as type `tp`, or _Mismatch. YAML 1.1 reads `no`/`off` as false: a choice that lists "no" takes it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value is False and "no" in args:
            return "no"
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        raise _Mismatch
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(args[0], v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise _NotFinite from None
            if not math.isfinite(number):
                raise _NotFinite
            return number
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"no rule for {tp}")


def _check_range(key: str, value: Any, meta: Dict[str, Any]):
    if value is None or not meta:
        return
    bounds = [(op, meta.get(name)) for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))]
    ok = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
    cap = meta.get("cap")
    for v in value if isinstance(value, list) else [value]:
        if not all(ok[op](v, b) for op, b in bounds if b is not None):
            wanted = " and ".join(f"{op} {b}" for op, b in bounds if b is not None)
            if wanted == ">= 1" and isinstance(v, int):
                wanted = "a positive integer"
            raise ConfigError(f"{key} must be {wanted}, got {_shown(v)}")
        if cap is not None and v > cap:
            raise ConfigError(f"{key} must be at most {cap:,}, got {_shown(v)}")


def _closest(key: Any, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(str(key)[:100], list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid keys: {', '.join(sorted(options))})"


def _build(cls, data: Dict[str, Any], where: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {_shown(where + str(key))}{_closest(key, names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, value, tp = where + f.name, data[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} holds a section, got {_shown(value)}")
            kwargs[f.name] = _build(tp, value, key + ".")
            continue
        try:
            kwargs[f.name] = _coerce(tp, value)
        except _Mismatch:
            raise ConfigError(f"{key} must be {_describe(tp)}, got {_shown(value)}") from None
        except _NotFinite:
            raise ConfigError(f"{key} must be a finite number, got {_shown(value)}") from None
        _check_range(key, kwargs[f.name], f.metadata)
    return cls(**kwargs)


def from_dict(data: Dict[str, Any]) -> Config:
    """A checked Config from nested dicts (missing keys take their defaults)."""
    cfg = _build(Config, data)
    _check(cfg)
    return cfg


def _check(cfg: Config):
    """What a single key's type cannot say."""
    t = cfg.train
    stages = [len(v) for v in (cfg.stage_channels, cfg.stage_repeats) if v is not None]
    if len(set(stages + [3] * (len(stages) == 1))) > 1:  # one given: every tinycnn variant has 3 stages
        raise ConfigError(f"stage_channels {cfg.stage_channels} and stage_repeats {cfg.stage_repeats} "
                          "need one entry per stage")
    if cfg.run_name is not None:
        check_run_name(cfg.run_name)
    for key, cap in (("stage_channels", MAX_CHANNELS), ("stage_repeats", MAX_REPEATS)):
        values = getattr(cfg, key)
        if values is not None and (not values or min(values) < 1):
            raise ConfigError(f"{key} must be a non-empty list of positive integers, got {_shown(values)}")
        if values is not None and (len(values) > 64 or max(values) > cap):
            raise ConfigError(f"{key} takes at most 64 stages of at most {cap:,} each, got {_shown(values)}")
        grid_values = getattr(cfg.grid, key)
        for option in grid_values if grid_values and isinstance(grid_values[0], list) else [grid_values]:
            if option and (len(option) > 64 or max(option) > cap):
                raise ConfigError(f"grid.{key} takes at most 64 stages of at most {cap:,} each, "
                                  f"got {_shown(option)}")
    seeds = cfg.grid.seeds
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"grid.seeds must not repeat a seed, got {_shown(seeds)}")
    runs = math.prod(_grid_options(getattr(cfg.grid, key), nested)
                     for key, nested in (("lr", False), ("weight_decay", False), ("stage_channels", True),
                                         ("stage_repeats", True))) * max(1, len(seeds))
    if runs > MAX_GRID_RUNS:
        raise ConfigError(f"grid: {runs:,} runs (combinations of grid.lr, grid.weight_decay, grid.stage_channels and "
                          f"grid.stage_repeats, times grid.seeds); at most {MAX_GRID_RUNS:,} in one grid search")
    if t.device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", t.device):
        raise ConfigError(f"train.device must be one of auto, cpu, cuda, cuda:N, mps, got {t.device!r}")
    a = cfg.augment
    if a.ra_magnitude >= a.policy_bins:
        raise ConfigError(f"augment.ra_magnitude must be a bin below augment.policy_bins={a.policy_bins}, "
                          f"got {a.ra_magnitude}")
    if a.policy_fill is not None and len(a.policy_fill) not in (1, 3):
        raise ConfigError(f"augment.policy_fill must be one value or three (RGB) in 0..255, or null, "
                          f"got {_shown(a.policy_fill)}")
    for key, top in (("erase_area", " <= 1"), ("erase_aspect", "")):
        pair = getattr(a, key)
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"augment.{key} must be two numbers [min, max] with 0 < min <= max{top}, "
                              f"got {_shown(pair)}")
    if len(t.optimizer.betas) != 2 or not all(0 <= b < 1 for b in t.optimizer.betas):
        raise ConfigError(f"train.optimizer.betas must be two numbers in [0, 1), got {t.optimizer.betas!r}")
    if cfg.lr_finder.min_lr >= cfg.lr_finder.max_lr:
        raise ConfigError(f"lr_finder needs min_lr < max_lr, got lr_finder.min_lr={cfg.lr_finder.min_lr}, "
                          f"lr_finder.max_lr={cfg.lr_finder.max_lr}")
    if not cfg.model or not isinstance(cfg.model, str):
        raise ConfigError(f"model must be a timm model name, got {cfg.model!r}")


def _grid_options(value: Any, nested: bool) -> int:
    """How many values a grid.* key tries (as tinycnn.workflow.grid reads it: one value alone is a list of one)."""
    if not isinstance(value, list):
        return 1
    if nested and not (value and isinstance(value[0], list)):
        return 1
    return len(value)


def check_run_name(name: str):
    """A run name is a plain folder name: letters and digits, then also . _ = + - (200 at most), never `/` or
    `..`, so `checkpoints/<run_name>` stays in checkpoints/."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"run_name must be a plain name (a letter or digit, then letters, digits and . _ = + -; "
                          f"at most 200 characters, no '/' or '..'), got {_shown(name)}")


def _name_from_path(path: Union[str, Path]) -> str:
    """The default run name of a config file: its name without .yaml, as a plain name (other characters -)."""
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", Path(path).stem)
    name = re.sub(r"\.\.+", ".", name).lstrip("._=+-")[:200]
    return name or "default"


def is_tinycnn_model(name: str) -> bool:
    return name == "tinycnn" or name.startswith("tinycnn_")


def check_model_name(name: str):
    """An unknown model is an error listing close matches among timm's models (tinycnn's registered by import)."""
    import timm

    import tinycnn  # noqa: F401  (registers the tinycnn models)

    if name.startswith(("hf-hub:", "local-dir:")) or name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; `python -c \"import timm; print(timm.list_models('*net*'))\"` lists them"
    raise ConfigError(f"model {name!r} is not a timm model{hint}")


def model_kwargs(cfg: Config) -> Dict[str, Any]:
    """timm.create_model keyword arguments: the tinycnn widths and depths go to tinycnn models only."""
    kwargs: Dict[str, Any] = {"drop_rate": cfg.drop_rate}
    if is_tinycnn_model(cfg.model):
        if cfg.stage_channels is not None:
            kwargs["stage_channels"] = list(cfg.stage_channels)
        if cfg.stage_repeats is not None:
            kwargs["stage_repeats"] = list(cfg.stage_repeats)
    return kwargs


# ---------------------------------------------------------------------------------------------- loading

def _merge(base: Dict[str, Any], update: Dict[str, Any], where: str = ""):
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"unknown config key {_shown(where + str(key))}{_closest(key, base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where + key!r} holds a section, got {_shown(value)}")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def _apply_overrides(data: Dict[str, Any], overrides: Iterable[str]):
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
        _merge(data, nested)


MAX_YAML_DEPTH = 32  # a config nests 4 deep (grid.stage_channels: a section, a list of lists)


class _PlainLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases (a config never needs them, and nine levels of nine aliases,
    the "billion laughs", expand to 9**9 values) and without deep nesting (each level is a Python call)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ConfigError(f"YAML anchors and aliases (&name, *name) are not read in configs (line "
                              f"{mark.line + 1}, column {mark.column + 1}): write the values out")
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth > MAX_YAML_DEPTH:
            raise ConfigError(f"YAML nested more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1}): "
                              "not a config")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def safe_yaml_load(text: str) -> Any:
    """yaml.safe_load without anchors and aliases and without deep nesting (ConfigError on them)."""
    try:
        return yaml.load(text, Loader=_PlainLoader)
    except RecursionError:
        raise ConfigError("YAML nested too deeply") from None


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """A YAML config file as a dict: at most MAX_CONFIG_BYTES of UTF-8 text, no anchors or aliases; anything
    else is a one-line ConfigError naming the file (configs and saved run folders come from anyone)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (see recipes/configs/ for examples)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                          "save it as UTF-8") from None
    try:
        data = safe_yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except ValueError as e:  # an integer of more than 4300 digits, a date that is none
        why = ("an integer of more than 4300 digits" if "integer string conversion" in str(e)
               else (str(e).splitlines() or [""])[0][:200])
        raise ConfigError(f"{path}: a value YAML cannot read: {why}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file holds a mapping of keys, got {type(data).__name__}")
    try:
        return _numbers(data)
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = (),
                check_model: bool = True) -> Config:
    """Defaults, updated by the YAML file at `path`, then by `overrides`; every key checked."""
    data = Config().to_dict()
    if path is not None:
        try:
            _merge(data, read_yaml(path))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
        if data["run_name"] is None:
            data["run_name"] = _name_from_path(path)
    _apply_overrides(data, overrides)
    if data["run_name"] is None:
        data["run_name"] = "default"
    cfg = from_dict(data)
    if check_model:
        check_model_name(cfg.model)
    return cfg


def flatten(cfg: Union[Config, Dict[str, Any]], prefix: str = "") -> Dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1} (for TensorBoard hparams, reports, comparing configs)."""
    if dataclasses.is_dataclass(cfg):
        cfg = cfg.to_dict()
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
