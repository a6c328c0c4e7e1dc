from pathlib import Path

import pytest

from tinycnn.config import DEFAULTS, ConfigError, apply_overrides, load_config, parse_value
from tinycnn.train import build_lr_lambda

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
    opt = cfg["train"]["optimizer"]
    assert opt["name"] == "adam" and opt["lr"] == 0.002
    assert opt["weight_decay"] == 1e-5 and isinstance(opt["weight_decay"], float)  # a string to YAML 1.1
    assert cfg["train"]["batch_size"] == 128 and cfg["stage_channels"] == [64, 128, 256]
    assert cfg["run_name"] == "original_project"


def test_shipped_configs_load():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"original", "recommended", "overfit"} <= names
    for p in CONFIGS.glob("*.yaml"):
        load_config(p)
    original = load_config(CONFIGS / "original.yaml")
    assert original["train"]["scheduler"]["name"] == "none" and original["train"]["label_smoothing"] == 0


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
    assert cfg["train"]["epochs"] == 5 and cfg["stage_channels"] == [16, 32, 64]
    assert cfg["train"]["optimizer"]["weight_decay"] == 1e-4
    assert cfg["augment"]["enabled"] is False and cfg["train"]["max_steps"] is None
    assert DEFAULTS["train"]["epochs"] == 20  # defaults are not mutated
    assert parse_value("1e-5") == 1e-5 and parse_value("3") == 3 and parse_value("abc") == "abc"


def test_invalid_values_are_refused():
    with pytest.raises(ConfigError, match="train.optimizer.name must be one of"):
        load_config(None, ["train.optimizer.name=lamb"])
    with pytest.raises(ConfigError, match="one entry per stage"):
        load_config(None, ["stage_channels=[16,32]"])
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="holds a section"):
        apply_overrides(load_config(None), ["train=3"])


def test_schedules():
    none = build_lr_lambda({"name": "none"}, 100, 10)
    assert {none(s) for s in range(100)} == {1.0}
    cos = build_lr_lambda({"name": "cosine", "warmup_epochs": 1, "min_lr_ratio": 0.01}, 100, 10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(99) == pytest.approx(0.01, abs=1e-3)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 99))
    one = build_lr_lambda({"name": "onecycle", "pct_start": 0.25}, 100, 10)
    assert one(0) == pytest.approx(1 / 25) and one(25) == pytest.approx(1.0) and one(100) < 1e-3
    assert max(range(100), key=one) == 25
