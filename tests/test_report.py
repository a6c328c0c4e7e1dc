"""The experiment report (tinycnn.workflow.report, recipes/report.py).

Pure helpers on synthetic files (folder detection, the hyperparameter-effect table, the holdout note,
the layer table); then a small project built once on the 10-class sample (checks, an overfit run,
an LR finder, a 2-run grid, two training runs, a test evaluation; a 2-stage 8/16-channel model and a
handful of steps, in-process) and its report, checked against the files it was built from.
"""
import importlib.util
import json
import math
import re
import runpy
import struct
import sys
from pathlib import Path

import pytest
import yaml

from tinycnn.workflow import grid, report
from tinycnn.config import load_config
from tinycnn.workflow.report import (ReportError, build_report, class_extremes, collect, detect, holdout_note,
                            hyperparameter_effects, layer_table)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
TINY = ["stage_channels=[8,16]", "stage_repeats=[1,1]", "data.num_workers=0", "train.batch_size=32"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) of a PNG, after checking its signature and IHDR chunk."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def section(text, number):
    """The text of section `number` (1-based) of a report, up to the next `## ` heading."""
    start = text.index(f"\n## {number}. ")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def evaluation_json(accuracies, split="test", test_from_holdout=True, data=None, checkpoint=None):
    per_class = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}, a name", "accuracy": a, "num_samples": 50}
                 for i, a in enumerate(accuracies)]
    scored = [a for a in accuracies if a is not None]
    return {"accuracy": sum(scored) / len(scored), "top5": 0.9, "loss": 1.5, "num_samples": 50 * len(accuracies),
            "per_class": per_class, "split": split, "test_from_holdout": test_from_holdout, "data": data,
            "checkpoint": checkpoint}


# ============================================================================= pure helpers

def test_detect_tells_folder_kinds_by_their_files(tmp_path):
    write_json(tmp_path / "shards" / "manifest.json", {"format": "tinycnn-shards"})
    write_json(tmp_path / "checks" / "checks.json", {"num_classes": 10})
    (tmp_path / "lrcsv").mkdir()
    (tmp_path / "lrcsv" / "lr_finder.csv").write_text("step,lr,loss,smoothed_loss\n")
    write_json(tmp_path / "grid" / "results.json", {"results": []})
    gs = tmp_path / "grid_folders_only" / "gs_000_lr=0.001_wd=0_ch=8-16_rep=1-1"
    gs.mkdir(parents=True)
    (gs / "metrics.jsonl").write_text('{"epoch": 1, "val/accuracy": 0.5}\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (tmp_path / "run" / "config.yaml").write_text("train: {overfit_small: false}\n")
    write_json(tmp_path / "run" / "run.json", {"command": ["python"]})  # not an evaluation
    write_json(tmp_path / "both" / "checks.json", {})
    write_json(tmp_path / "both" / "lr_finder.json", {})
    ev = write_json(tmp_path / "evals" / "test.json", evaluation_json([0.5, 0.7]))
    write_json(tmp_path / "evals" / "other.json", {"accuracy": 0.5})  # no per_class: not an evaluation
    (tmp_path / "empty").mkdir()

    kinds = lambda p: sorted(k for k, _ in detect(p))  # noqa: E731
    assert kinds(tmp_path / "shards") == ["shards"]
    assert kinds(tmp_path / "checks") == ["checks"]
    assert kinds(tmp_path / "lrcsv") == ["lr_finder"]
    assert kinds(tmp_path / "grid") == ["grid"]
    assert kinds(tmp_path / "grid_folders_only") == ["grid"]
    assert kinds(gs) == ["run"]  # a grid's run folder on its own is a training run folder
    assert kinds(tmp_path / "run") == ["run"]
    assert kinds(tmp_path / "both") == ["checks", "lr_finder"]
    assert detect(tmp_path / "evals") == [("evaluation", ev)]
    assert detect(ev) == [("evaluation", ev)] and detect(tmp_path / "evals" / "other.json") == []
    assert detect(tmp_path / "shards" / "manifest.json") == [("shards", tmp_path / "shards")]
    assert detect(tmp_path / "empty") == []

    # the parent of everything: searched below, without descending into the grid's run folders
    found = collect([tmp_path])
    assert found.shards == [tmp_path / "shards"]
    assert sorted(found.checks) == [tmp_path / "both", tmp_path / "checks"]
    assert sorted(found.lr_finder) == [tmp_path / "both", tmp_path / "lrcsv"]
    assert sorted(found.grid) == [tmp_path / "grid", tmp_path / "grid_folders_only"]
    assert found.run == [tmp_path / "run"]
    assert found.evaluation == [ev]
    # given twice: once; a folder with nothing of a recipe in it is listed as not recognized
    again = collect([tmp_path / "run", tmp_path / "run" / "metrics.jsonl", tmp_path / "empty"])
    assert again.run == [tmp_path / "run"] and again.unrecognized == [tmp_path / "empty"]
    with pytest.raises(ReportError, match="no such file"):
        collect([tmp_path / "nowhere"])


def _row(lr, wd, ch, rep, acc):
    return {"lr": lr, "weight_decay": wd, "stage_channels": ch, "stage_repeats": rep, "val_accuracy": acc}


def test_hyperparameter_effects_table():
    rows = [_row(0.001, 1e-4, [8, 16], [1, 1], 0.20), _row(0.001, 1e-5, [8, 16], [2, 2], 0.30),
            _row(0.002, 1e-4, [16, 32], [1, 1], 0.40), _row(0.002, 1e-5, [16, 32], [2, 2], None),  # diverged
            _row(0.0005, 1e-4, [8, 16], [1, 1], 0.10)]
    effects = hyperparameter_effects(rows)
    assert list(effects) == ["lr", "weight_decay", "stage_channels", "stage_repeats"]
    lr = effects["lr"]
    assert [e["label"] for e in lr] == ["0.0005", "0.001", "0.002"]  # ascending values
    assert [e["runs"] for e in lr] == [1, 2, 2] and [e["with_result"] for e in lr] == [1, 2, 1]
    assert [e["mean_val_accuracy"] for e in lr] == pytest.approx([0.10, 0.25, 0.40])  # the diverged run left out
    assert [e["best_val_accuracy"] for e in lr] == pytest.approx([0.10, 0.30, 0.40])
    wd = {e["label"]: e for e in effects["weight_decay"]}
    assert list(wd) == ["1e-5", "1e-4"]
    assert wd["1e-4"]["mean_val_accuracy"] == pytest.approx((0.2 + 0.4 + 0.1) / 3)
    assert wd["1e-5"]["mean_val_accuracy"] == pytest.approx(0.30) and wd["1e-5"]["runs"] == 2
    ch = effects["stage_channels"]
    assert [(e["label"], e["value"]) for e in ch] == [("8-16", [8, 16]), ("16-32", [16, 32])]
    assert [e["mean_val_accuracy"] for e in ch] == pytest.approx([0.2, 0.4])
    assert [e["label"] for e in effects["stage_repeats"]] == ["1-1", "2-2"]
    # a value no run has a result for
    only_failed = hyperparameter_effects([_row(0.1, 0, [8], [1], None)])
    assert only_failed["lr"][0]["mean_val_accuracy"] is None and only_failed["lr"][0]["runs"] == 1


def test_holdout_note_follows_the_manifest_then_the_evaluation():
    test = evaluation_json([0.5], split="test", test_from_holdout=True)
    val = evaluation_json([0.5], split="val", test_from_holdout=False)
    assert holdout_note(test, {"holdout_per_class": 50}).startswith("**Test from a held-out split**")
    assert "50 images per class" in holdout_note(test, {"holdout_per_class": 50})
    assert holdout_note(val, {"holdout_per_class": 0}).startswith("**Validation doubled as test**")
    assert holdout_note(val, {"holdout_per_class": 50}).startswith("**Not a test figure**")
    # the manifest decides when given, whatever the JSON says
    assert holdout_note(test, {"holdout_per_class": 0}).startswith("**Validation doubled as test**")
    # no manifest: the evaluation's test_from_holdout, said to be the source
    assert holdout_note(test).startswith("**Test from a held-out split**")
    assert "manifest.json was not found" in holdout_note(test)
    assert holdout_note(val).startswith("**Split `val`, scheme unknown**")


def test_class_extremes():
    per_class = evaluation_json([0.5, 0.9, None, 0.1, 0.9, 0.1, 0.3])["per_class"]
    most, least = class_extremes(per_class, 2)
    assert [c["index"] for c in most] == [1, 4]  # ties: lower index first
    assert [c["index"] for c in least] == [3, 5]
    assert all(c["accuracy"] is not None for c in most + least)


def test_layer_table_of_the_default_model():
    t = layer_table({"model": "tinycnn", "stage_channels": [64, 128, 256], "stage_repeats": [2, 2, 2],
                     "num_classes": 200})
    assert t["total_parameters"] == 1_197_704 == sum(row["parameters"] for row in t["layers"])
    by_name = {row["name"]: row for row in t["layers"]}
    assert by_name["stages.0.blocks.0.conv"]["output_shape"] == [1, 64, 64, 64]
    assert by_name["stages.2.downsample"]["output_shape"] == [1, 128, 16, 16]
    assert by_name["head.fc"]["output_shape"] == [1, 200] and by_name["head.fc"]["parameters"] == 256 * 200 + 200
    assert "stages.0.downsample" not in by_name  # Identity layers are left out
    assert t["output_shape"] == [1, 200]


def test_matplotlib_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ReportError, match=re.escape('pip install "tinycnn[report]"')):
        build_report([tmp_path], tmp_path / "out")


def test_output_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    write_json(tmp_path / "in" / "test.json", evaluation_json([0.5, 0.7]))
    with pytest.raises(ReportError, match="is a file.*--output"):
        build_report([tmp_path / "in"], tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_report_from_synthetic_outputs_without_training(tmp_path):
    """An LR finder with only its CSV, a grid with only run folders, an evaluation: the rest says what is missing."""
    lr = tmp_path / "lr"
    lr.mkdir()
    lines = ["step,lr,loss,smoothed_loss"]
    for i in range(20):  # the loss falls fastest around lr 1e-2
        x = 1e-5 * 10 ** (i * 5 / 19)
        y = 2.3 - 1.0 / (1 + math.exp(-3 * (math.log10(x) + 2)))
        lines.append(f"{i},{x!r},{y!r},{y!r}")
    (lr / "lr_finder.csv").write_text("\n".join(lines) + "\n")
    # run folders as train() leaves them (config.yaml, metrics.jsonl), without the grid's tables
    cfg = load_config(CONFIGS / "grid_search.yaml", ["grid.lr=[0.001,0.01]", "grid.weight_decay=[0]",
                                                     "grid.stage_channels=[[8,16]]", "grid.stage_repeats=[[1,1]]"])
    for run, accs in zip(grid.grid_plan(cfg), [[0.1, 0.2], [0.15, 0.35]]):
        d = tmp_path / "grid" / run.name
        d.mkdir(parents=True)
        d.joinpath("config.yaml").write_text(yaml.safe_dump(grid.run_config(cfg, run).to_dict()))
        d.joinpath("metrics.jsonl").write_text("".join(json.dumps(
            {"epoch": e + 1, "step": 10 * (e + 1), "train/loss": 2.0, "val/loss": 1.9, "val/accuracy": a}) + "\n"
            for e, a in enumerate(accs)))
    write_json(tmp_path / "eval.json", evaluation_json([0.2, 0.8, 0.5], split="val", test_from_holdout=False))
    out = tmp_path / "report"
    text = build_report([tmp_path], out).read_text()

    lr_part = section(text, 4)
    assert "lr_finder.csv (the suggestion recomputed" in lr_part and "**missing:**" not in lr_part
    sug = float(re.search(r"\*\*([0-9.e+-]+)\*\*", lr_part)[1])
    assert 1e-3 < sug < 1e-1
    grid_part = section(text, 5)
    first = [ln for ln in grid_part.splitlines() if ln.startswith("| 1 |")][0]
    assert "`gs_001`" in first and "35.00%" in first  # best epoch of the better run
    assert re.search(r"\| learning rate \| 0\.001 \| 1 \| 20\.00% \| 20\.00% \|", grid_part)
    for number, recipe in [(2, "recipes/train.py"), (3, "recipes/train.py --config recipes/configs/overfit.yaml"),
                           (6, "recipes/train.py"), (1, "recipes/checks.py")]:
        part = section(text, number)
        assert "**missing:**" in part and recipe in part, (number, part)
    assert "Split `val`, scheme unknown" in section(text, 7)
    for fig in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert png_size(out / fig)[0] > 300


def _metrics_lines(records):
    return "".join(json.dumps({"step": 10 * r["epoch"], "train/loss": 2.0, "val/loss": 1.9, **r}) + "\n"
                   for r in records)


def test_report_shows_seed_spread_and_ema_tta_labels(tmp_path):
    """A grid with grid.seeds (run folders only), EMA and flip TTA in its runs and in a training run, an evaluation
    with flip TTA: mean ± sd (n) per point, and every accuracy says its weights and TTA."""
    cfg = load_config(CONFIGS / "grid_search.yaml", ["grid.lr=[0.001,0.01]", "grid.weight_decay=[0]",
                                                     "grid.stage_channels=[[8,16]]", "grid.stage_repeats=[[1,1]]",
                                                     "grid.seeds=[1,2]", "train.ema=true", "train.tta=flip"])
    epochs = {  # per run: (raw, EMA) val accuracy per epoch
        (0, 1): [(0.10, 0.05), (0.20, 0.15)], (0, 2): [(0.15, 0.10), (0.30, 0.25)],  # raw best: 0.20, 0.30
        (1, 1): [(0.30, 0.40)], (1, 2): [(0.35, 0.30)]}                              # 0.40 EMA, 0.35 raw
    for run in grid.grid_plan(cfg):
        d = tmp_path / "grid" / run.name
        d.mkdir(parents=True)
        d.joinpath("config.yaml").write_text(yaml.safe_dump(grid.run_config(cfg, run).to_dict()))
        d.joinpath("metrics.jsonl").write_text(_metrics_lines(
            {"epoch": e, "val/accuracy": raw, "val_ema/accuracy": ema, "val_ema/loss": 1.8, "tta": "flip"}
            for e, (raw, ema) in enumerate(epochs[run.index, run.seed], 1)))
    run_dir = tmp_path / "ema_run"
    run_dir.mkdir()
    run_dir.joinpath("config.yaml").write_text(yaml.safe_dump(load_config(
        CONFIGS / "timm-like.yaml", ["stage_channels=[8,16]", "stage_repeats=[1,1]"]).to_dict()))
    run_dir.joinpath("metrics.jsonl").write_text(_metrics_lines(
        [{"epoch": 1, "val/accuracy": 0.25, "val_ema/accuracy": 0.20, "tta": "flip"},
         {"epoch": 2, "val/accuracy": 0.30, "val_ema/accuracy": 0.45, "val_ema/loss": 1.5, "tta": "flip"}]))
    write_json(tmp_path / "eval.json", {**evaluation_json([0.2, 0.8], split="test"), "tta": "flip",
                                        "checkpoint": str(tmp_path / "nowhere" / "best.safetensors")})
    text = build_report([tmp_path], tmp_path / "report").read_text()

    grid_part = section(text, 5)
    assert "seeds 1, 2 (each point once per seed)" in grid_part and "4 runs (2 points x 2 seeds)" in grid_part
    points = [ln for ln in grid_part.split("### Every run")[0].splitlines() if re.match(r"\| \d \| `gs_", ln)]
    # point 1: 0.40 (EMA) and 0.35 (raw): mean 37.50%, sd 0.05 / sqrt(2) = 3.54 points
    assert points[0].startswith("| 1 | `gs_001` |") and "| 37.50 ± 3.54% (n=2) |" in points[0]
    assert "| EMA 1, raw 1, flip TTA |" in points[0]
    # point 0: 0.20 and 0.30 (raw): mean 25.00%, sd 0.1 / sqrt(2) = 7.07 points
    assert points[1].startswith("| 2 | `gs_000` |") and "| 25.00 ± 7.07% (n=2) |" in points[1]
    assert "| raw, flip TTA |" in points[1]
    runs = {ln.split("|")[2].strip(): ln for ln in grid_part.split("### Every run")[1].splitlines()
            if re.match(r"\| \d \| `gs_", ln)}
    assert set(runs) == {"`gs_000_seed=1`", "`gs_000_seed=2`", "`gs_001_seed=1`", "`gs_001_seed=2`"}
    assert "| 40.00% |" in runs["`gs_001_seed=1`"] and "| EMA, flip TTA |" in runs["`gs_001_seed=1`"]
    assert "| 35.00% |" in runs["`gs_001_seed=2`"] and "| raw, flip TTA |" in runs["`gs_001_seed=2`"]
    assert "the better of its raw and its EMA weights'" in grid_part and "measured with flip TTA" in grid_part
    assert "Best: **gs_001_lr=0.01_wd=0_ch=8-16_rep=1-1** with a mean best val accuracy of 37.50 ± 3.54% (n=2)" \
        in grid_part
    full = section(text, 6)
    row = [ln for ln in full.splitlines() if ln.startswith("| `ema_run` |")][0]
    assert "**45.00%** (epoch 2) | EMA, flip TTA |" in row  # the EMA weights beat the raw ones (30%)
    ev = [ln for ln in section(text, 7).splitlines() if ln.startswith("| `eval` |")][0]
    assert "| ?, flip TTA |" in ev  # its checkpoint is not there: its weights are not known
    for fig in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert png_size(tmp_path / "report" / fig)[0] > 300


def test_report_help(monkeypatch, capsys):
    monkeypatch.chdir("/")
    monkeypatch.setattr(sys, "argv", ["recipes/report.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "recipes" / "report.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None)
    assert out.startswith("usage:") and "--output" in out and "DIR" in out


# ============================================================================= a project on the sample

@pytest.fixture(scope="module")
def project(sample_shards, tmp_path_factory):
    """Every recipe's output, written by the library functions the recipes call (small and fast)."""
    from tinycnn.workflow import grid
    from tinycnn.workflow.checks import run_checks
    from tinycnn.config import load_config
    from tinycnn.evaluation import evaluate_checkpoint
    from tinycnn.workflow.lr_finder import find_lr
    from tinycnn.train import train

    p = tmp_path_factory.mktemp("project")

    def cfg(name, *overrides):
        return load_config(CONFIGS / name, [f"data.root={sample_shards}", *TINY, *overrides])

    run_checks(cfg("checks.yaml"), p / "checks", num_images=8)
    train(cfg("overfit.yaml", "train.batch_size=32", "train.overfit_small_size=128", "train.val_subset_size=64",
              "train.epochs=2"), p / "overfit", progress=False)
    find_lr(cfg("lr_finder.yaml", "lr_finder.num_iters=8", "lr_finder.min_lr=1e-4", "lr_finder.max_lr=0.1"),
            p / "lr_finder", progress=False, plot=False)
    grid.run_grid(cfg("grid_search.yaml", "grid.lr=[0.001,0.01]", "grid.weight_decay=[0]",
                      "grid.stage_channels=[[8,16]]", "grid.stage_repeats=[[1,1]]", "grid.epochs=1",
                      "train.max_steps=2", "train.val_subset_size=64"), p / "grid", progress=False)
    # two "full" runs, kept short by training on the 500-image val split for 2 epochs, without the augmentation
    # (on the CPU it is half of a step's time; the report only says whether it was on)
    for name in ("original", "recommended"):
        train(cfg(f"{name}.yaml", "train.batch_size=100", "data.train_split=val", "train.val_subset_size=64",
                  "train.epochs=2", "augment.enabled=false"), p / name, progress=False)
    results = evaluate_checkpoint(p / "recommended" / "best.safetensors", sample_shards, "test", batch_size=100,
                                  num_workers=0)
    write_json(p / "test.json", results)
    return p


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_report", REPO / "recipes" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(project, sample_shards):
    """The report of the whole project, through recipes/report.py (the shards found from the runs' data.root)."""
    out = project.parent / "report"
    argv = sys.argv
    sys.argv = ["recipes/report.py", str(project), "--output", str(out)]
    try:
        assert load_recipe().main() == 0
    finally:
        sys.argv = argv
    return out, (out / "report.md").read_text()


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_section_is_there_and_complete(built):
    out, text = built
    for number, name in enumerate(report.SECTIONS, 1):
        assert f"\n## {number}. {name}\n" in text
    assert "**missing:**" not in text and "> warning" not in text and "not recognized" not in text
    assert "shards (found at a run's data path)" in text


@pytest.mark.slow
def test_figures_exist_and_are_pngs(built):
    out, text = built
    figures = re.findall(r"!\[[^\]]+\]\((figures/[^)]+\.png)\)", text)
    expected = {"figures/class_distribution.png", "figures/augment_grid.png", "figures/overfit_overfit.png",
                "figures/lr_finder_lr_finder.png", "figures/grid_grid_curves.png", "figures/grid_grid_effects.png",
                "figures/train_original.png", "figures/train_recommended.png", "figures/train_comparison.png",
                "figures/eval_test_classes.png"}
    assert set(figures) == expected and len(figures) == len(expected)
    for fig in figures:
        path = out / fig
        width, height = png_size(path)
        assert path.stat().st_size > 5000, fig
        if fig != "figures/augment_grid.png":  # matplotlib figures of about 7 x 4 inches or more at 120 dpi
            assert width >= 800 and height >= 350, (fig, width, height)
    assert {f"figures/{p.name}" for p in (out / "figures").glob("*.png")} == expected  # nothing else left there


@pytest.mark.slow
def test_augment_grid_is_the_checks_png(built, project):
    out, _ = built
    assert (out / "figures" / "augment_grid.png").read_bytes() == (project / "checks" / "augment_grid.png").read_bytes()


@pytest.mark.slow
def test_numbers_match_the_inputs(built, project):
    import timm

    out, text = built
    # full training: each run's best val accuracy and its epoch
    full = section(text, 6)
    for name in ("original", "recommended"):
        rec = metrics(project / name)
        best = max(rec, key=lambda r: r["val/accuracy"])
        row = [ln for ln in full.splitlines() if ln.startswith(f"| `{name}` |")][0]
        assert f"**{best['val/accuracy']:.2%}** (epoch {best['epoch']})" in row
    # the overfit run's best val accuracy
    over = max(metrics(project / "overfit"), key=lambda r: r["val/accuracy"])
    assert f"best val accuracy **{over['val/accuracy']:.2%}** (epoch {over['epoch']})" in section(text, 3)
    # the evaluation: top-1 and top-5, the most and least accurate classes by name
    ev = json.loads((project / "test.json").read_text())
    row = [ln for ln in section(text, 7).splitlines() if ln.startswith("| `test` |")][0]
    assert f"**{ev['accuracy']:.2%}**" in row and f"{ev['top5']:.2%}" in row and "| `test` | 500 |" in row
    most, least = class_extremes(ev["per_class"], 5)
    assert f"| most | 1 | {most[0]['index']} | {most[0]['wnid']} | {most[0]['name']} | {most[0]['accuracy']:.1%} |" \
        in section(text, 7)
    assert f"| least | 1 | {least[0]['index']} | {least[0]['wnid']} | {least[0]['name']} |" in section(text, 7)
    # the grid: the first row is results.json's best
    best = json.loads((project / "grid" / "results.json").read_text())["best"]
    first = [ln for ln in section(text, 5).splitlines() if ln.startswith("| 1 |")][0]
    assert f"`{best['name'].split('_lr=')[0]}`" in first and f"{best['val_accuracy']:.2%}" in first
    # LR finder and checks
    lrf = json.loads((project / "lr_finder" / "lr_finder.json").read_text())
    assert f"**{lrf['suggested_lr']:.3g}**" in section(text, 4)
    checks = json.loads((project / "checks" / "checks.json").read_text())
    model = section(text, 2)
    assert f"**{checks['initial_loss']['observed']:.3f}**" in model and "ln(10) = 2.303" in model
    assert f"| majority class | {checks['baselines']['majority_class']['accuracy']:.2%} |" in model
    # parameters: the total = the sum of the layer table = the model's count
    total = int(re.search(r"Total parameters: \*\*([\d,]+)\*\*", model)[1].replace(",", ""))
    rows = [ln.split("|") for ln in model.splitlines() if re.match(r"\| \d+ \| `", ln)]
    assert sum(int(r[-2].strip().replace(",", "")) for r in rows) == total
    built_model = timm.create_model("tinycnn", num_classes=10, stage_channels=[8, 16], stage_repeats=[1, 1])
    assert total == sum(p.numel() for p in built_model.parameters()) == checks["num_parameters"]
    assert "| 8 x 64 x 64 |" in model and "| 16 x 32 x 32 |" in model


@pytest.mark.slow
def test_accuracies_say_their_weights_and_tta(built):
    _, text = built  # no train.ema, no train.tta anywhere in the project: raw weights, no TTA, said everywhere
    grid_part = section(text, 5)
    assert "Val accuracy of the raw weights (no train.ema), without TTA." in grid_part
    assert all("| raw, no TTA |" in ln for ln in grid_part.splitlines() if re.match(r"\| \d \| `gs_", ln))
    assert "±" not in grid_part and "| seed |" not in grid_part  # a grid without seeds: single runs
    for name in ("original", "recommended"):
        row = [ln for ln in section(text, 6).splitlines() if ln.startswith(f"| `{name}` |")][0]
        assert "| raw, no TTA |" in row
    assert "(raw weights, no TTA)." in section(text, 6)  # the best checkpoint's metadata
    row = [ln for ln in section(text, 7).splitlines() if ln.startswith("| `test` |")][0]
    assert "| raw, no TTA |" in row  # best.safetensors says raw weights; the evaluation ran without TTA


@pytest.mark.slow
def test_runs_are_sorted_into_their_sections(built):
    _, text = built
    assert "overfit" in section(text, 3) and "`original`" not in section(text, 3)
    full = section(text, 6)
    assert "### original" in full and "### recommended" in full and "### overfit" not in full
    assert "trained on split `val`, validated on `val`" in full  # the fixture's shortcut is visible
    assert "gs_000" not in full  # grid runs stay in the grid section
    repro = section(text, 8)
    assert "### Configuration of `recommended`" in repro  # the evaluated run
    assert "overfit_small: false" in repro and "| torch |" in repro and "cpu_count" in repro


@pytest.mark.slow
def test_holdout_note_switches_with_the_manifest(built, project, sample_shards, tmp_path):
    _, text = built
    assert "**Test from a held-out split**" in section(text, 7)
    assert "Validation doubled as test" not in text
    # the same shards described as the course project's scheme (--holdout 0): val doubled as test
    fake = tmp_path / "shards-holdout0"
    fake.mkdir()
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    manifest["holdout_per_class"] = 0
    write_json(fake / "manifest.json", manifest)
    ev = json.loads((project / "test.json").read_text())
    ev.update(split="val", test_from_holdout=False, data=str(fake))
    write_json(tmp_path / "evals" / "val.json", ev)
    other = build_report([fake, tmp_path / "evals"], tmp_path / "out").read_text()
    assert "**Validation doubled as test**" in section(other, 7) and "held-out split" not in section(other, 7)
    # the checkpoint (read from the path in the JSON) was chosen on val, the split evaluated here
    assert "**caution:** the checkpoint was chosen on `val`" in section(other, 7)
    assert "caution" not in text
    assert "`val` = the official validation images" in section(other, 1)


@pytest.mark.slow
def test_a_missing_input_gives_a_note_not_a_crash(project, tmp_path):
    text = build_report([project / "checks", project / "test.json"], tmp_path / "out").read_text()
    for number, name in enumerate(report.SECTIONS, 1):
        assert f"\n## {number}. {name}\n" in text
    notes = {3: "recipes/train.py --config recipes/configs/overfit.yaml", 4: "recipes/lr_finder.py",
             5: "recipes/grid_search.py", 6: "recipes/train.py"}
    for number, recipe in notes.items():
        part = section(text, number)
        assert "**missing:**" in part and f"`python {recipe}" in part, part
    # what is there is still reported: the model from checks.json, the data from its split statistics
    assert "Total parameters: **" in section(text, 2) and "**missing:**" not in section(text, 7)
    assert "| train | 4,500 |" in section(text, 1)


@pytest.mark.slow
def test_recipe_lists_the_sections_that_lack_inputs(project, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["recipes/report.py", str(project / "checks"), str(project / "test.json"),
                                      "--output", str(out)])
    assert load_recipe().main() == 0
    printed = {line[2:20].strip(): line[21:].strip() for line in capsys.readouterr().out.splitlines()
               if line.startswith("  ")}  # "  <section, 18 wide> <state>"
    lacking = ["Overfit run", "LR finder", "Grid search", "Full training"]
    assert printed == {name: "input missing" if name in lacking else "ok" for name in report.SECTIONS}
    # the same from the structured report, and each lacking section's text has the note
    written = report.write_report([project / "checks", project / "test.json"], tmp_path / "again")
    assert [s.title for s in written.sections if s.missing] == lacking
    text = written.path.read_text()
    for s in written.sections:
        assert ("**missing:**" in section(text, s.number)) == bool(s.missing)
    assert sorted(written.figures) == sorted((tmp_path / "again" / "figures").glob("*.png"))

