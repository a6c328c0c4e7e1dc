"""The workflow's tools before and around training: checks (step 1), LR finder (step 3), grid search (step 4).

Pure helpers are tested on synthetic inputs; the recipes end to end on the 10-class sample
(`sample_shards`) with a 2-stage 8/16-channel model and a handful of steps.
"""
import csv
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import ImageReadMode, decode_png, read_file

from tinycnn.workflow.checks import (CheckError, baselines, check_batch_shape, gradient_check, grid_size, initial_loss,
                            save_augment_grid)
from tinycnn.augment import GPUAugment
from tinycnn.config import load_config
from tinycnn.workflow.lr_finder import find_lr, lr_sweep, plot_lr_finder, smooth_losses, stop_check, suggest_lr

REPO = Path(__file__).resolve().parents[1]
TINY = ["stage_channels=[8,16]", "stage_repeats=[1,1]", "train.batch_size=32", "data.num_workers=0"]


def read_png(path):
    data = read_file(str(path))
    assert bytes(data[:8].tolist()) == b"\x89PNG\r\n\x1a\n"
    return decode_png(data, mode=ImageReadMode.RGB)  # (3, H, W) uint8


# ============================================================================= pure helpers: LR finder

def test_lr_sweep_and_smoothing():
    lrs = lr_sweep(1e-6, 1.0, 100)
    assert len(lrs) == 100 and lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios)) and ratios[0] == pytest.approx(10 ** (6 / 99))
    assert smooth_losses([3.0, 3.0, 3.0], 0.98) == pytest.approx([3.0, 3.0, 3.0])  # bias-corrected
    s = smooth_losses([4.0, 2.0], 0.5)
    assert s == pytest.approx([4.0, (0.25 * 4 + 0.5 * 2) / 0.75])


def test_suggest_lr_on_a_synthetic_curve():
    lrs = lr_sweep(1e-5, 1.0, 101)  # 20 points per decade
    curve = [2.0 - math.tanh(2 * (math.log10(lr) + 3)) for lr in lrs]  # steepest at 1e-3
    assert suggest_lr(lrs, curve) == pytest.approx(1e-3, rel=1e-6)
    # a steeper drop among the first points is ignored (skip_start), a later one is found
    early = list(curve)
    early[1] -= 3.0
    assert suggest_lr(lrs, early, skip_start=0) == pytest.approx(lrs[0])
    assert suggest_lr(lrs, early, skip_start=5) == pytest.approx(1e-3, rel=1e-6)
    assert suggest_lr(lrs, early) == pytest.approx(1e-3, rel=1e-6)  # default: the first tenth is skipped
    # non-finite points are dropped, not chosen
    with_nan = list(curve)
    with_nan[70] = float("nan")
    assert suggest_lr(lrs, with_nan) == pytest.approx(1e-3, rel=1e-6)
    assert suggest_lr(lrs, [1.0 + i for i in range(101)]) is None  # never falls
    assert suggest_lr(lrs[:3], curve[:3]) is None  # too few points


def test_stop_check():
    assert stop_check(2.0, 2.1, 2.0, 4.0, 0.1) is None
    assert stop_check(9.0, 8.1, 2.0, 4.0, 0.1).startswith("smoothed loss 8.100 > 4 x best 2.000")
    assert stop_check(9.0, 7.9, 2.0, 4.0, 0.1) is None
    assert stop_check(float("nan"), 2.0, 2.0, 4.0, 0.1).startswith("loss is nan")
    assert stop_check(2.0, float("inf"), 2.0, 4.0, 0.1).startswith("loss is")


def test_plot_needs_matplotlib(tmp_path, monkeypatch, capsys):
    result = {"points": [{"step": i, "lr": 10.0 ** (i - 5), "loss": 2.0, "smoothed_loss": 2.0} for i in range(5)],
              "min_lr": 1e-5, "max_lr": 0.1, "suggested_lr": 1e-3}
    assert read_png(plot_lr_finder(result, tmp_path / "a.png")).shape[0] == 3
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    assert plot_lr_finder(result, tmp_path / "b.png") is None
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'pip install "tinycnn[report]"' in err
    assert not (tmp_path / "b.png").exists()


# ============================================================================= pure helpers: checks

def test_check_batch_shape():
    manifest = {"num_classes": 10, "input_shape": [3, 64, 64]}
    ok = check_batch_shape((torch.zeros(4, 3, 64, 64, dtype=torch.uint8), torch.tensor([0, 1, 9, 2])), manifest)
    assert ok["batch_shape"] == [4, 3, 64, 64] and ok["input_shape"] == [3, 64, 64]
    with pytest.raises(CheckError, match=r"input_shape \[3, 64, 64\]"):
        check_batch_shape((torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)), manifest)
    with pytest.raises(CheckError, match="uint8"):
        check_batch_shape((torch.zeros(4, 3, 64, 64), torch.zeros(4, dtype=torch.int64)), manifest)
    with pytest.raises(CheckError, match="labels in"):
        check_batch_shape((torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.tensor([0, 10])), manifest)
    with pytest.raises(CheckError, match="one per image"):
        check_batch_shape((torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.tensor([0])), manifest)


def test_baselines_on_imbalanced_labels():
    manifest = {"num_classes": 4, "classes": [{"wnid": f"n{i}"} for i in range(4)]}
    train = torch.tensor([0] * 5 + [2] * 9 + [3] * 1)
    val = torch.tensor([0] * 10 + [2] * 30 + [1] * 60)
    b = baselines(manifest, train, val, seed=0)
    assert b["majority_class"]["class"] == 2 and b["majority_class"]["wnid"] == "n2"
    assert b["majority_class"]["accuracy"] == pytest.approx(0.3)
    assert b["uniform_random"]["expected"] == 0.25
    assert b == baselines(manifest, train, val, seed=0)  # seeded
    big = torch.arange(4).repeat(5000)
    assert baselines(manifest, train, big, seed=1)["uniform_random"]["accuracy"] == pytest.approx(0.25, abs=0.02)


def test_initial_loss_and_gradient_flags():
    labels = torch.tensor([0, 1, 2, 3])
    assert initial_loss(torch.zeros(4, 200), labels)["observed"] == pytest.approx(math.log(200))
    assert initial_loss(torch.zeros(4, 200), labels)["expected"] == pytest.approx(5.2983, abs=1e-4)
    assert initial_loss(torch.zeros(4, 200), labels)["ok"]
    assert not initial_loss(torch.randn(4, 200, generator=torch.Generator().manual_seed(0)) * 20, labels)["ok"]

    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    m = Unused()
    m(torch.randn(5, 3)).sum().backward()
    g = gradient_check(m)
    assert not g["all_nonzero"] and g["num_params_with_zero_grad"] == 2
    assert g["params_with_zero_grad"] == ["unused.weight", "unused.bias"] and not g["ok"]
    m.zero_grad(set_to_none=True)
    (m(torch.randn(5, 3)).sum() + 0.0 * m.unused.weight.sum()).backward()  # a gradient, all zeros
    g = gradient_check(m)
    assert m.unused.weight.grad is not None and g["params_with_zero_grad"] == ["unused.weight", "unused.bias"]
    m.zero_grad(set_to_none=True)
    (m(torch.randn(5, 3)).sum() + m.unused(torch.randn(5, 3)).sum()).backward()
    assert gradient_check(m)["all_nonzero"] and gradient_check(m)["ok"]


def test_augment_grid_layout_and_denormalization(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=g)
    # no random ops: the "augmented" rows, denormalized, must give back the originals
    path = save_augment_grid(images, GPUAugment.from_config({"enabled": False}), tmp_path / "grid.png", nrow=3)
    png = read_png(path)
    assert (png.shape[2], png.shape[1]) == grid_size(5, nrow=3) == (3 * 66 + 2, 4 * 66 + 2)
    def tile(row, col):
        return png[:, 2 + row * 66:2 + row * 66 + 64, 2 + col * 66:2 + col * 66 + 64].int()
    assert (tile(0, 0) - images[0].int()).abs().max() <= 1  # originals
    assert (tile(1, 0) - images[0].int()).abs().max() <= 1  # the same image below it, denormalized
    assert (tile(3, 1) - images[4].int()).abs().max() <= 1  # second block: image 4, augmented row
    assert tile(3, 2).abs().max() == 0  # padding of the short last row
    flipped = save_augment_grid(images, GPUAugment(crop_padding=0, flip_p=1.0, brightness=0, contrast=0, saturation=0,
                                                   hue=0), tmp_path / "flip.png", nrow=3)
    png = read_png(flipped)
    assert (tile(1, 0) - images[0].flip(-1).int()).abs().max() <= 1


# ============================================================================= the sample: checks

def test_checks_recipe_on_sample(sample_shards, tmp_path, run_recipe):
    out = tmp_path / "checks"
    proc = run_recipe("checks", "--data", sample_shards, "--output", out, "--num_images", 12, "--nrow", 6, *TINY)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # every check passed
    r = json.loads((out / "checks.json").read_text())
    assert r["splits"]["train"]["num_samples"] == 4500 and r["splits"]["val"]["num_samples"] == 500
    assert (r["splits"]["train"]["min_per_class"], r["splits"]["train"]["mean_per_class"],
            r["splits"]["train"]["max_per_class"]) == (450, 450.0, 450)
    assert r["batch_shape"] == [32, 3, 64, 64] and r["input_shape"] == [3, 64, 64]
    assert r["initial_loss"]["expected"] == pytest.approx(math.log(10))
    assert abs(r["initial_loss"]["observed"] - math.log(10)) < 0.5
    assert r["baselines"]["majority_class"]["accuracy"] == pytest.approx(0.1)  # balanced sample
    assert r["baselines"]["uniform_random"]["expected"] == pytest.approx(0.1)
    assert 0.04 <= r["baselines"]["uniform_random"]["accuracy"] <= 0.16
    assert r["gradients"]["all_nonzero"] and r["gradients"]["num_params_with_zero_grad"] == 0
    assert r["num_parameters"] == sum(p.numel() for p in
                                      __import__("timm").create_model("tinycnn", num_classes=10, stage_channels=[8, 16],
                                                                      stage_repeats=[1, 1]).parameters())
    assert r["passed"] and Path(r["augment_grid"]) == out / "augment_grid.png"
    png = read_png(out / "augment_grid.png")
    assert (png.shape[2], png.shape[1]) == grid_size(12, nrow=6) == (6 * 66 + 2, 4 * 66 + 2)


# ============================================================================= the sample: LR finder

def test_lr_finder_recipe_on_sample(sample_shards, tmp_path, run_recipe):
    out = tmp_path / "lrf"
    proc = run_recipe("lr_finder", "--data", sample_shards, "--output", out, "--min_lr", "1e-4", "--max_lr", "0.1",
                      "--num_iters", 12, "train.progress_seconds=0.001", *TINY)
    assert proc.returncode == 0, proc.stderr
    # its output is not a terminal here (a job log): plain progress lines
    assert "lr finder step 12/12 lr 1.00e-01 loss" in proc.stdout and "ETA" in proc.stdout
    r = json.loads((out / "lr_finder.json").read_text())
    assert (r["min_lr"], r["max_lr"], r["num_iters"]) == (1e-4, 0.1, 12)  # the flags reached the sweep
    lrs = [p["lr"] for p in r["points"]]
    assert not r["stopped_early"] and len(lrs) == 12
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(0.1)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert min(ratios) > 1 and max(ratios) == pytest.approx(min(ratios))
    assert all(math.isfinite(p["loss"]) and math.isfinite(p["smoothed_loss"]) for p in r["points"])
    assert r["suggested_lr"] is not None and 1e-4 <= r["suggested_lr"] <= 0.1
    rows = list(csv.DictReader((out / "lr_finder.csv").open()))
    assert len(rows) == 12 and float(rows[3]["lr"]) == pytest.approx(lrs[3])
    assert float(rows[0]["loss"]) == pytest.approx(float(rows[0]["smoothed_loss"]))
    assert read_png(out / "lr_finder.png").shape[1] > 100


def test_lr_finder_stops_when_the_loss_diverges(sample_shards):
    # AdamW (the default) at huge lrs: the loss grows large but stays finite, so the diverge_factor rule stops it.
    # No augmentation: it is most of a CPU step here and plays no part in the stop rule.
    cfg = load_config(overrides=[f"data.root={sample_shards}", *TINY, "lr_finder.min_lr=1e-3",
                                 "lr_finder.max_lr=1e6", "lr_finder.num_iters=30", "augment.enabled=false"])
    r = find_lr(cfg, None, progress=False)
    assert r["stopped_early"] and r["stop_reason"].startswith("smoothed loss")
    assert 3 <= r["num_points"] < 30 and len(r["points"]) == r["num_points"]
    last = r["points"][-1]
    assert last["smoothed_loss"] > cfg.lr_finder.diverge_factor * r["best_smoothed_loss"]
    assert all(p["smoothed_loss"] <= 4 * r["best_smoothed_loss"] for p in r["points"][:-1])  # not earlier
    assert r["suggested_lr"] is not None and 1e-3 <= r["suggested_lr"] <= 1e6
    assert r["suggested_lr"] < last["lr"]


def test_lr_finder_rejects_bad_settings(sample_shards):
    with pytest.raises(ValueError, match="min_lr < max_lr"):  # checked with the config, before the sweep
        load_config(overrides=[f"data.root={sample_shards}", *TINY, "lr_finder.min_lr=1", "lr_finder.max_lr=0.1"])


# ============================================================================= the scripts

def test_recipes_help(tmp_path, monkeypatch, capsys):
    """Each script run as __main__ with --help, from another folder than the checkout."""
    monkeypatch.chdir(tmp_path)
    flags = {"checks": ["--output", "--num_images"], "lr_finder": ["--min_lr", "--max_lr", "--num_iters"],
             "grid_search": ["--gpus", "--workers", "--storage", "--sampler", "--pruner", "optuna-dashboard"]}
    for name in flags:
        monkeypatch.setattr(sys, "argv", [f"recipes/{name}.py", "--help"])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(REPO / "recipes" / f"{name}.py"), run_name="__main__")
        text = capsys.readouterr().out
        assert e.value.code in (0, None), (name, e.value.code)
        assert text.startswith("usage:") and all(f in text for f in flags[name]) and "key=value" in text
