from pathlib import Path

import pytest
import torch

from tinycnn.config import Config, ConfigError, SchedulerConfig, load_config, parse_value
from tinycnn.plan import build_lr_lambda

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"

ORIGINAL = """\
stage_repeats: [2, 2, 2]
stage_channels: [64, 128, 256]
train:
  seed: 42
  device: auto              # cpu, cuda, mps or auto
  batch_size: 128
  epochs: 20
  max_steps: null
  overfit_small: false
  #overfit_small_size: 4096
  val_subset_size: null
  optimizer:
    name: adam              # sgd/adam/adamw/rmsprop
    lr: 0.002
    weight_decay: 1e-5
    momentum: 0.9
"""


def test_the_original_projects_config_loads_unchanged(tmp_path):
    path = tmp_path / "original_project.yaml"
    path.write_text(ORIGINAL)
    cfg = load_config(path)
    opt = cfg.train.optimizer
    assert opt.name == "adam" and opt.lr == 0.002
    assert opt.weight_decay == 1e-5 and isinstance(opt.weight_decay, float)  # a string to YAML 1.1
    assert cfg.train.batch_size == 128 and cfg.stage_channels == [64, 128, 256]
    assert cfg.run_name == "original_project"


def test_shipped_configs_load():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"original", "recommended", "overfit"} <= names
    for p in CONFIGS.glob("*.yaml"):
        load_config(p)
    original = load_config(CONFIGS / "original.yaml")
    assert original.train.scheduler.name == "none" and original.train.label_smoothing == 0


def test_unknown_keys_name_the_closest_valid_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  optimiser:\n    lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train.optimiser.*did you mean 'optimizer'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"did you mean 'epochs'"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_overrides_are_yaml_values():
    cfg = load_config(None, ["train.epochs=5", "stage_channels=[16,32,64]", "train.optimizer.weight_decay=1e-4",
                             "augment.enabled=false", "train.max_steps=null"])
    assert cfg.train.epochs == 5 and cfg.stage_channels == [16, 32, 64]
    assert cfg.train.optimizer.weight_decay == 1e-4
    assert cfg.augment.enabled is False and cfg.train.max_steps is None
    assert Config().train.epochs == 20  # defaults are not mutated
    assert parse_value("1e-5") == 1e-5 and parse_value("3") == 3 and parse_value("abc") == "abc"


def test_invalid_values_are_refused():
    with pytest.raises(ConfigError, match="train.optimizer.name must be one of"):
        load_config(None, ["train.optimizer.name=lamb"])
    with pytest.raises(ConfigError, match="one entry per stage"):
        load_config(None, ["stage_channels=[16,32]"])
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="holds a section"):
        load_config(None).replace(["train=3"])


def test_schedules():
    none = build_lr_lambda(SchedulerConfig(name="none"), 100, 10)
    assert {none(s) for s in range(100)} == {1.0}
    cos = build_lr_lambda(SchedulerConfig(name="cosine", warmup_epochs=1, min_lr_ratio=0.01), 100, 10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(99) == pytest.approx(0.01, abs=1e-3)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 99))
    one = build_lr_lambda(SchedulerConfig(name="onecycle", pct_start=0.25), 100, 10)
    assert one(0) == pytest.approx(1 / 25) and one(25) == pytest.approx(1.0) and one(100) < 1e-3
    assert max(range(100), key=one) == 25


@pytest.mark.parametrize("warmup_epochs, total", [(1, 100), (0.5, 37), (0, 50)])
def test_the_cosine_schedule_is_timms_with_warmup_one_step_earlier(warmup_epochs, total):
    """timm's CosineLRScheduler (per step, warmup as a prefix) gives the same cosine; its warmup starts at lr 0,
    ours one step later, so that no step trains at lr 0."""
    from timm.scheduler import CosineLRScheduler

    steps_per_epoch, floor = 10, 0.01
    ours = build_lr_lambda(SchedulerConfig(name="cosine", warmup_epochs=warmup_epochs, min_lr_ratio=floor), total,
                           steps_per_epoch)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    timm_schedule = CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=floor, warmup_t=warmup,
                                      warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    timms = [timm_schedule._get_lr(t)[0] for t in range(total + 1)]
    assert [ours(s) for s in range(warmup)] == pytest.approx(timms[1:warmup + 1])
    assert [ours(s) for s in range(warmup, total)] == pytest.approx(timms[warmup:total])


@pytest.mark.parametrize("override, message", [
    ("train.label_smoothing=abc", "train.label_smoothing must be a number, got 'abc'"),
    ("drop_rate=abc", "drop_rate must be a number, got 'abc'"),
    ("data.num_workers=abc", "data.num_workers must be an integer or null, got 'abc'"),
    ("stage_channels=abc", "stage_channels must be a list of integers or null, got 'abc'"),
    ("stage_channels=[16,32", "stage_channels must be a list of integers or null"),
    ("train.compile=maybe", "train.compile must be true or false, got 'maybe'"),
    ("train.epochs=2.5", "train.epochs must be an integer, got 2.5"),
    ("augment.flip_p=2", "augment.flip_p must be >= 0 and <= 1, got 2.0"),
    ("train.label_smoothing=1", "train.label_smoothing must be >= 0 and < 1"),
    ("train.grad_clip=-1", "train.grad_clip must be > 0"),
    ("train.device=tpu", "train.device must be one of auto, cpu, cuda, cuda:N, mps"),
    ("train.optimizer.betas=[0.9]", "train.optimizer.betas must be two numbers"),
    ("model=resnet10", "model 'resnet10' is not a timm model; close matches: resnet10t"),
    ("grid.seeds=[1,2,1]", "grid.seeds must not repeat a seed, got [1, 2, 1]"),
    ("grid.seeds=[-3]", "grid.seeds must be >= 0, got -3"),
])
def test_every_key_is_type_and_range_checked(override, message):
    """The key, what it takes and what was given, in one line, before anything starts."""
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "recommended.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_documented_values_are_accepted():
    # YAML 1.1 reads `no` as false: the documented choice `no` still means no mixed precision
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    cfg = load_config(None, ["train.channels_last=true", "train.optimizer.fused=false", "train.max_steps=null",
                             "train.device=cuda:1", "data.num_workers=0"])
    assert cfg.train.channels_last is True and cfg.train.optimizer.fused is False and cfg.train.device == "cuda:1"


def test_any_timm_model_takes_only_its_keys():
    from tinycnn.config import model_kwargs

    cfg = load_config(CONFIGS / "original.yaml", ["model=resnet10t", "drop_rate=0.1"])
    assert model_kwargs(cfg) == {"drop_rate": 0.1}  # stage_* are tinycnn's
    cfg = load_config(None, ["model=tinycnn_narrow"])
    assert model_kwargs(cfg) == {"drop_rate": 0.0}  # the variant's own widths, not the defaults'
    cfg = load_config(None, ["stage_channels=[8,16]", "stage_repeats=[1,1]"])
    assert model_kwargs(cfg) == {"drop_rate": 0.0, "stage_channels": [8, 16], "stage_repeats": [1, 1]}


def test_grid_seeds_default_to_none_and_load_from_yaml(tmp_path):
    assert load_config(CONFIGS / "grid_search.yaml").grid.seeds == []  # train.seed only, one run per point
    path = tmp_path / "seeds.yaml"
    path.write_text("grid:\n  seeds: [3, 1, 2]\n")
    assert load_config(path).grid.seeds == [3, 1, 2]  # in the order given
