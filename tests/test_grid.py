"""Grid search (tinycnn.workflow.grid, recipes/grid_search.py): naming and planning, reading results back, the Optuna
study (params checked, storages, refusals), and workers on the 10-class sample with a 2-stage 8/16-channel model and a
handful of steps: two worker processes on one SQLite study, a killed worker, a stopped one."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tinycnn.config import ConfigError, load_config
from tinycnn.runs import RunFolderError
from tinycnn.workflow import grid

REPO = Path(__file__).resolve().parents[1]


# ============================================================================= naming, planning, tables

def test_run_names_and_number_formats():
    assert grid.run_name(34, 0.002, 1e-4, [64, 128, 256], [2, 2, 2]) == "gs_034_lr=0.002_wd=1e-4_ch=64-128-256_rep=2-2-2"
    assert grid.run_name(7, 1e-5, 0, (8,), (1,)) == "gs_007_lr=1e-5_wd=0_ch=8_rep=1"
    assert [grid.format_wd(v) for v in (1e-4, 1e-5, 0, 0.0, 5e-4, 0.05, 2.5e-6)] == \
        ["1e-4", "1e-5", "0", "0", "5e-4", "0.05", "2.5e-6"]
    assert [grid.format_lr(v) for v in (0.002, 0.001, 0.005, 0.0005, 1e-5, 0.1)] == \
        ["0.002", "0.001", "0.005", "0.0005", "1e-5", "0.1"]


def test_grid_plan_is_the_product_in_order():
    cfg = load_config()  # the default grid: 3 lr x 2 wd x 2 widths x 3 depths
    plan = grid.grid_plan(cfg)
    assert len(plan) == 36 and [r.index for r in plan] == list(range(36))
    assert len({r.name for r in plan}) == 36
    assert plan[0].name == "gs_000_lr=0.001_wd=1e-5_ch=48-96-192_rep=1-1-1"
    # stage_repeats varies fastest, then stage_channels, weight_decay, lr
    assert plan[1].stage_repeats == (2, 2, 2) and plan[1].lr == 0.001
    assert plan[3].stage_channels == (64, 128, 256) and plan[3].stage_repeats == (1, 1, 1)
    assert plan[6].weight_decay == 1e-4 and plan[6].lr == 0.001
    assert plan[12].lr == 0.002 and plan[12].weight_decay == 1e-5
    assert plan[34].name == "gs_034_lr=0.005_wd=1e-4_ch=64-128-256_rep=2-2-2"
    run_cfg = grid.run_config(cfg, plan[34])
    assert run_cfg.train.optimizer.lr == 0.005 and run_cfg.train.optimizer.weight_decay == 1e-4
    assert run_cfg.stage_channels == [64, 128, 256] and run_cfg.stage_repeats == [2, 2, 2]
    assert run_cfg.train.epochs == 3 and run_cfg.run_name == plan[34].name
    assert cfg.train.optimizer.lr == 0.003  # the base config is left alone


def test_grid_plan_rejects_bad_grids():
    with pytest.raises(ValueError, match="different numbers of stages"):
        grid.grid_plan(load_config(overrides=["grid.stage_channels=[[8,16,32]]", "grid.stage_repeats=[[1,1]]"]))
    with pytest.raises(ValueError, match="grid.lr"):
        grid.grid_plan(load_config(overrides=["grid.lr=[]"]))
    with pytest.raises(ValueError, match="grid.epochs"):
        grid.grid_plan(load_config(overrides=["grid.epochs=0"]))
    # one width written flat is one option
    plan = grid.grid_plan(load_config(overrides=["grid.stage_channels=[8,16]", "grid.stage_repeats=[[1,1]]",
                                                 "grid.lr=0.01", "grid.weight_decay=[0]"]))
    assert [r.name for r in plan] == ["gs_000_lr=0.01_wd=0_ch=8-16_rep=1-1"]


def _result(index, acc, loss, status="finished"):
    return {"index": index, "name": f"gs_{index:03d}", "lr": 0.001 * (index + 1), "weight_decay": 1e-4,
            "stage_channels": [8, 16], "stage_repeats": [1, 1], "num_parameters": 100, "val_accuracy": acc,
            "val_loss": loss, "best_epoch": 1, "epochs": 1, "final_train_loss": 2.0, "status": status}


def test_sort_results_and_tables(tmp_path):
    results = [_result(0, 0.30, 1.5), _result(1, None, None, "diverged"), _result(2, 0.50, 1.2),
               _result(3, 0.30, 1.4), _result(4, 0.10, 2.0)]
    ranked = grid.sort_results(results)
    assert [r["index"] for r in ranked] == [2, 3, 0, 4, 1]  # accuracy, then lower loss, no result last
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4, 5]
    paths = grid.write_results(results, tmp_path, meta={"title": "t"})
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [int(r["index"]) for r in rows] == [2, 3, 0, 4, 1]
    assert rows[0]["stage_channels"] == "8-16" and rows[-1]["val_accuracy"] == ""
    md = paths["md"].read_text().splitlines()
    table = [line for line in md if line.startswith("| ") and "gs_" in line]
    assert [line.split("|")[2].strip() for line in table] == ["gs_002", "gs_003", "gs_000", "gs_004", "gs_001"]
    assert "50.00%" in table[0] and "1.2000" in table[0]
    data = json.loads(paths["json"].read_text())
    assert data["best"]["index"] == 2 and data["num_runs"] == 5


def test_run_status_reads_metrics(tmp_path):
    manifest = {"num_classes": 10, "splits": {"train": {"num_samples": 100}}}
    cfg = load_config(overrides=["train.batch_size=10", f"data.root={tmp_path}"])
    run = grid.grid_plan(load_config(overrides=["grid.lr=[0.01]", "grid.weight_decay=[0]", "grid.epochs=2",
                                                "grid.stage_channels=[[8]]", "grid.stage_repeats=[[1]]"]))[0]
    cfg = cfg.replace(["grid.epochs=2"])
    run_cfg = grid.run_config(cfg, run)
    assert grid.expected_steps(run_cfg, manifest) == (2, 20)
    d = tmp_path / run.name
    assert grid.run_status(d, run_cfg, manifest) == "new"
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(run_cfg.to_dict()))
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 10, "val/accuracy": 0.2, "val/loss": 2.0}) + "\n")
    assert grid.run_status(d, run_cfg, manifest) == "new"  # one of two epochs, nothing to resume
    (d / "state").mkdir()
    (d / "state" / "progress.json").write_text("{}")
    assert grid.run_status(d, run_cfg, manifest) == "partial"
    with open(d / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 20, "val/accuracy": 0.4, "val/loss": 1.5, "train/loss": 1.7}) + "\n")
        f.write('{"epoch": 3, "st')  # a torn line is ignored
    assert grid.run_status(d, run_cfg, manifest) == "finished"
    assert grid.expected_steps(run_cfg, manifest, world_size=2) == (2, 10)  # 2 processes: 5 steps an epoch
    assert grid.expected_steps(run_cfg.replace(["train.max_steps=25"]), manifest) == (3, 25)
    # a setting that does not change the result keeps it finished; one that does makes it another run
    assert grid.run_status(d, run_cfg.replace(["data.num_workers=7"]), manifest) == "finished"
    other = grid.run_config(load_config(overrides=["train.batch_size=10", f"data.root={tmp_path}", "train.seed=1"]), run)
    other = other.replace(["train.epochs=2"])
    assert grid.run_status(d, other, manifest) == "changed"
    r = grid.run_result(run, d, "finished")
    assert (r["val_accuracy"], r["val_loss"], r["best_epoch"], r["epochs"]) == (0.4, 1.5, 2, 2)


def _epochs(accuracies):
    return "".join(json.dumps({"epoch": e, "step": 10 * e, "train/loss": 2.0, "val/loss": 2.0 - a, "val/accuracy": a})
                   + "\n" for e, a in enumerate(accuracies, 1))


def test_load_results_reads_the_tables_else_the_run_folders(tmp_path):
    cfg = load_config(overrides=["grid.lr=[0.00123456789,0.01,0.1]", "grid.weight_decay=[0]", "grid.epochs=2",
                                 "grid.stage_channels=[[8,16]]", "grid.stage_repeats=[[1,1]]"])
    plan = grid.grid_plan(cfg)
    assert plan[0].name.startswith(grid.short_name(0) + "_lr=0.00123457_")  # the name rounds the lr
    for run, accs in zip(plan, [[0.1, 0.3], [0.2, 0.25], [0.05]]):
        d = tmp_path / run.name
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(grid.run_config(cfg, run).to_dict()))
        (d / "metrics.jsonl").write_text(_epochs(accs))
    (tmp_path / plan[2].name / "grid_failed.json").write_text(json.dumps({"error": "loss is nan"}))
    stray = tmp_path / "gs_007_lr=0.5_wd=0_ch=8_rep=1"  # a run folder no config places in a grid
    stray.mkdir()
    (stray / "metrics.jsonl").write_text(_epochs([0.9]))
    assert grid.is_run_folder(stray) and not grid.is_run_folder(tmp_path)

    # no tables: every run's settings from its config.yaml (never from its name), its results from metrics.jsonl
    folders = grid.load_results(tmp_path)
    assert folders["source"] == "the gs_* run folders"
    assert [(r["rank"], r["index"], r["lr"], r["val_accuracy"], r["best_epoch"], r["status"], r["error"])
            for r in folders["results"]] == [(1, 0, 0.00123456789, 0.3, 2, "finished", None),
                                             (2, 1, 0.01, 0.25, 2, "finished", None),
                                             (3, 2, 0.1, 0.05, 1, "diverged", "loss is nan")]
    rows = folders["results"]
    # the tables once written: results.csv, then results.json
    grid.write_results(rows, tmp_path)
    (tmp_path / "results.json").unlink()
    from_csv = grid.load_results(tmp_path)
    assert from_csv["source"] == "results.csv"
    for key in grid.RESULT_COLUMNS:
        assert [r[key] for r in from_csv["results"]] == [r[key] for r in rows], key
    grid.write_results(rows[:2], tmp_path, meta={"runs_planned": 3})
    whole = grid.load_results(tmp_path)
    assert whole["source"] == "results.json" and whole["runs_planned"] == 3 and len(whole["results"]) == 2


def test_best_record_is_the_first_of_the_best():
    records = [{"epoch": 1}, {"epoch": 2, "val/accuracy": 0.5}, {"epoch": 3, "val/accuracy": 0.5},
               {"epoch": 4, "val/accuracy": 0.4}]
    assert grid.best_record(records)["epoch"] == 2
    assert grid.best_record(records[:1]) is None and grid.best_record([]) is None


# ============================================================================= seeds: plan, aggregation, tables

SEEDED = ["grid.lr=[0.001,0.02]", "grid.weight_decay=[0]", "grid.stage_channels=[[8,16]]",
          "grid.stage_repeats=[[1,1]]", "grid.seeds=[1,2,3]"]


def _seeded(index, seed, acc, loss, status="finished", weights="raw", ema=False, tta=None):
    lr = [0.001, 0.02][index]
    return {"index": index, "name": grid.run_name(index, lr, 0.0, [8, 16], [1, 1], seed), "lr": lr,
            "weight_decay": 0.0, "stage_channels": [8, 16], "stage_repeats": [1, 1], "seed": seed,
            "num_parameters": 100, "val_accuracy": acc, "val_loss": loss, "best_epoch": 1 if acc else None,
            "epochs": 1, "final_train_loss": 2.0, "status": status, "weights": weights if acc else None, "ema": ema,
            "tta": tta}


def test_grid_seeds_train_every_point_once_per_seed():
    cfg = load_config(overrides=SEEDED)
    plan = grid.grid_plan(cfg)
    assert [(r.index, r.seed) for r in plan] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]  # seed fastest
    assert plan[4].name == "gs_001_lr=0.02_wd=0_ch=8-16_rep=1-1_seed=2"
    assert grid.run_config(cfg, plan[4]).train.seed == 2 and grid.run_config(cfg, plan[4]).run_name == plan[4].name
    space = grid.search_space(plan)
    assert space["seed"] == [1, 2, 3] and space["lr"] == [0.001, 0.02]  # one more dimension of the grid
    point = {"lr": 0.02, "weight_decay": 0.0, "stage_channels": "8-16", "stage_repeats": "1-1"}
    assert grid.trial_run({**point, "seed": 2}, plan, "grid", 0) == plan[4]
    for bad in (point, {**point, "seed": 4}, {**point, "seed": "2"}, {**point, "seed": 2.0}):
        with pytest.raises(ValueError, match="not a point of this grid"):
            grid.trial_run(bad, plan, "grid", 0)
    # without seeds: train.seed, names and the space as before
    plain = grid.grid_plan(cfg.replace(["grid.seeds=[]"]))
    assert [r.seed for r in plain] == [None, None] and plain[1].name == "gs_001_lr=0.02_wd=0_ch=8-16_rep=1-1"
    assert "seed" not in grid.search_space(plain) and grid.run_config(cfg, plain[1]).train.seed == cfg.train.seed
    with pytest.raises(ValueError, match="trial params"):
        grid.trial_run({**point, "seed": 1}, plain, "grid", 0)
    # TPE would tune the seed: refused in one line
    with pytest.raises(ConfigError, match=r"^--sampler tpe samples one run per trial .* leave grid.seeds empty$"):
        grid.check_sampler(cfg, "tpe")
    grid.check_sampler(cfg, "grid")
    grid.check_sampler(cfg.replace(["grid.seeds=[]"]), "tpe")


def test_grid_seeds_are_checked_and_counted_in_the_run_limit():
    for bad, message in (("grid.seeds=[1,1]", "must not repeat"), ("grid.seeds=[-1]", ">= 0"),
                         ("grid.seeds=[1.5]", "integers"), ("grid.seeds=[true]", "integers")):
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[bad])
    values = ",".join(f"{0.001 * (i + 1)!r}" for i in range(50))
    square = [f"grid.lr=[{values}]", f"grid.weight_decay=[{values}]", "grid.stage_channels=[[8]]",
              "grid.stage_repeats=[[1]]"]  # 2,500 points
    assert len(grid.grid_plan(load_config(overrides=square + ["grid.seeds=[1,2,3,4]"]))) == grid.MAX_GRID_RUNS
    with pytest.raises(ConfigError, match=r"12,500 runs .*times grid.seeds.*at most 10,000"):
        load_config(overrides=square + ["grid.seeds=[1,2,3,4,5]"])


def test_aggregate_seeds_mean_sample_sd_and_n():
    rows = [_seeded(0, 1, 0.30, 1.5), _seeded(0, 2, 0.34, 1.4), _seeded(0, 3, 0.26, 1.6, weights="ema", ema=True),
            _seeded(1, 1, 0.40, 1.2), _seeded(1, 2, None, None, "diverged"), _seeded(1, 3, None, None, "waiting")]
    points = grid.aggregate_seeds(rows)
    # point 1: one seed finished (40%) beats point 0's mean (30%); its sd is undefined with one seed
    assert [(p["rank"], p["index"], p["n"], p["seeds"]) for p in points] == [(1, 1, 1, 3), (2, 0, 3, 3)]
    one, three = points
    assert one["val_accuracy"] == pytest.approx(0.40) and one["val_accuracy_sd"] is None
    assert one["status"] == "1 finished, 1 diverged, 1 waiting" and one["seeds_done"] == [1]
    # (0.30 + 0.34 + 0.26) / 3 = 0.30; sample sd sqrt((0 + 0.04^2 + 0.04^2) / 2) = 0.04
    assert three["val_accuracy"] == pytest.approx(0.30) and three["val_accuracy_sd"] == pytest.approx(0.04)
    # losses 1.5, 1.4, 1.6: mean 1.5, sd sqrt((0 + 0.01 + 0.01) / 2) = 0.1
    assert three["val_loss"] == pytest.approx(1.5) and three["val_loss_sd"] == pytest.approx(0.1)
    assert three["status"] == "finished" and three["weights"] == "ema 1, raw 2" and three["ema"]
    assert three["name"] == "gs_000_lr=0.001_wd=0_ch=8-16_rep=1-1" and three["runs"] == [r["name"] for r in rows[:3]]
    assert grid.format_spread(three) == "30.00 ± 4.00% (n=3)"
    assert grid.format_spread(three, "val_loss") == "1.5000 ± 0.1000 (n=3)"
    assert grid.format_spread(one) == "40.00% (n=1 of 3)"
    # two seeds: sd = |a - b| / sqrt(2); a point without a finished seed ranks last; equal means: lower loss first
    two = grid.aggregate_seeds([_seeded(0, 1, 0.2, 2.0), _seeded(0, 2, 0.5, 1.0), _seeded(1, 1, 0.35, 1.4),
                                _seeded(1, 2, 0.35, 1.4)])
    assert [p["index"] for p in two] == [1, 0]  # means 0.35 each: losses 1.4 < 1.5
    assert two[1]["val_accuracy_sd"] == pytest.approx(0.3 / math.sqrt(2)) and two[0]["val_accuracy_sd"] == 0
    none_done = grid.aggregate_seeds([_seeded(0, 1, None, None, "running"), _seeded(1, 1, 0.1, 2.0)])
    assert [(p["index"], p["n"]) for p in none_done] == [(1, 1), (0, 0)]
    assert grid.format_spread(none_done[1]) == "- (n=0 of 1)"


def test_seeded_tables_keep_every_run_and_read_back(tmp_path):
    rows = [_seeded(0, 1, 0.30, 1.5), _seeded(0, 2, 0.34, 1.4), _seeded(0, 3, 0.26, 1.6),
            _seeded(1, 1, 0.40, 1.2), _seeded(1, 2, None, None, "diverged"), _seeded(1, 3, 0.16, 1.8)]
    paths = grid.write_results(rows, tmp_path, meta={"title": "t"})
    md = paths["md"].read_text()
    points_part, runs_part = md.split("## Every run")
    table = [line for line in points_part.splitlines() if line.startswith("| ") and "gs_" in line]
    assert [line.split("|")[2].strip() for line in table] == ["gs_000_lr=0.001_wd=0_ch=8-16_rep=1-1",
                                                              "gs_001_lr=0.02_wd=0_ch=8-16_rep=1-1"]
    assert "30.00 ± 4.00% (n=3)" in table[0] and "28.00 ± 16.97% (n=2 of 3)" in table[1]  # 0.4, 0.16: sd 0.1697
    assert "1 diverged" in table[1]
    assert len([line for line in runs_part.splitlines() if "_seed=" in line]) == 6
    rows_csv = list(csv.DictReader(paths["csv"].open()))
    assert [(r["row"], r["rank"], r["seed"]) for r in rows_csv[:2]] == [("mean", "1", ""), ("mean", "2", "")]
    assert [r["n"] for r in rows_csv[:2]] == ["3", "2"] and float(rows_csv[0]["val_accuracy_sd"]) == pytest.approx(0.04)
    assert [r["row"] for r in rows_csv[2:]] == ["run"] * 6 and rows_csv[2]["seed"] == "1"  # 40%: the best run
    data = json.loads(paths["json"].read_text())
    assert data["best"]["name"] == "gs_000_lr=0.001_wd=0_ch=8-16_rep=1-1" and data["best"]["n"] == 3
    assert data["num_runs"] == 6 and data["num_points"] == 2 and len(data["results"]) == 6
    from_json = grid.load_results(tmp_path)
    assert [p["val_accuracy"] for p in from_json["points"]] == pytest.approx([0.30, 0.28])
    paths["json"].unlink()
    from_csv = grid.load_results(tmp_path)  # the points' rows are left out and recomputed from the runs'
    assert sorted((r["name"], r["seed"], r["val_accuracy"]) for r in from_csv["results"]) == \
        sorted((r["name"], r["seed"], r["val_accuracy"]) for r in rows)
    assert [(p["index"], p["n"], p["seeds"]) for p in from_csv["points"]] == [(0, 3, 3), (1, 2, 3)]
    assert from_csv["points"][0]["val_accuracy_sd"] == pytest.approx(0.04)


def test_results_files_written_before_seeds_read_the_same(tmp_path):
    (tmp_path / "results.csv").write_text(
        ",".join(grid.RESULT_COLUMNS) + "\n"
        "1,1,gs_001_lr=0.02_wd=0_ch=8-16_rep=1-1,0.02,0.0,8-16,1-1,100,0.4,1.2,1,1,2.0,finished\n"
        "2,0,gs_000_lr=0.001_wd=0_ch=8-16_rep=1-1,0.001,0.0,8-16,1-1,100,0.3,1.5,1,1,2.0,finished\n")
    old = grid.load_results(tmp_path)
    assert old["points"] is None and [(r["index"], r["seed"], r["val_accuracy"]) for r in old["results"]] == \
        [(1, None, 0.4), (0, None, 0.3)]
    (tmp_path / "results.json").write_text(json.dumps({"results": [_result(0, 0.3, 1.5), _result(1, 0.4, 1.2)]}))
    assert [r["index"] for r in grid.load_results(tmp_path)["results"]] == [1, 0]
    assert grid.load_results(tmp_path)["points"] is None


def test_ema_val_accuracy_is_the_better_weights(tmp_path):
    records = [{"epoch": 1, "val/accuracy": 0.30, "val/loss": 1.9, "val_ema/accuracy": 0.20, "val_ema/loss": 2.1},
               {"epoch": 2, "val/accuracy": 0.31, "val/loss": 1.8, "val_ema/accuracy": 0.35, "val_ema/loss": 1.7,
                "val_ema/top5": 0.8, "tta": "flip"},
               {"epoch": 3, "val/accuracy": 0.35, "val/loss": 1.6, "val_ema/accuracy": 0.35, "val_ema/loss": 1.5}]
    assert grid.val_figures(records[0])["weights"] == "raw"
    assert grid.val_figures(records[2])["weights"] == "raw"  # a tie: the raw weights, as train() keeps
    best = grid.best_val(records)  # 0.35 at epoch 2 (EMA) and epoch 3 (raw): the first
    assert (best["epoch"], best["accuracy"], best["loss"], best["top5"], best["weights"], best["tta"]) == \
        (2, 0.35, 1.7, 0.8, "ema", "flip")
    assert grid.best_record(records)["epoch"] == 2
    run = grid.grid_plan(load_config(overrides=SEEDED))[0]
    (tmp_path / run.name).mkdir()
    (tmp_path / run.name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = grid.run_result(run, tmp_path / run.name, "finished")
    assert (row["val_accuracy"], row["val_loss"], row["weights"], row["ema"], row["tta"], row["seed"]) == \
        (0.35, 1.7, "ema", True, "flip", 1)
    md = grid.results_markdown([row])
    assert "| weights |" in md and "| EMA |" in md and "the better of its raw and its EMA weights'" in md
    assert "measured with flip TTA" in md
    plain = grid.results_markdown([_result(0, 0.3, 1.5)])
    assert "weights" not in plain and "TTA" not in plain  # a grid without EMA or TTA: the table as before
    paths = grid.write_results([row], tmp_path)
    assert list(csv.DictReader(paths["csv"].open()))[-1]["weights"] == "ema"
    paths["json"].unlink()
    back = grid.load_results(tmp_path)["results"][-1]
    assert (back["weights"], back["ema"], back["tta"]) == ("ema", True, "flip")


# ============================================================================= the study: params, storage, refusals

SMALL = ["grid.lr=[0.001,0.02]", "grid.weight_decay=[0,1e-4]", "grid.stage_channels=[[8,16],[16,32]]",
         "grid.stage_repeats=[[1,1]]"]


def test_trial_params_are_checked_against_the_grid():
    cfg = load_config(overrides=SMALL)
    plan = grid.grid_plan(cfg)
    assert grid.search_space(plan) == {"lr": [0.001, 0.02], "weight_decay": [0.0, 1e-4],
                                       "stage_channels": ["8-16", "16-32"], "stage_repeats": ["1-1"]}
    point = {"lr": 0.02, "weight_decay": 0.0, "stage_channels": "16-32", "stage_repeats": "1-1"}
    assert grid.trial_run(point, plan, "grid", 99) == plan[5]  # a grid point keeps its index in the plan
    for bad in ({**point, "lr": 0.03}, {**point, "stage_channels": "8-16-32"}, {"lr": 0.02}, {**point, "lr": "x"}):
        with pytest.raises(ValueError, match="trial params"):
            grid.trial_run(bad, plan, "grid", 0)
    run = grid.trial_run({**point, "lr": 0.0123}, plan, "tpe", 7)  # TPE: within the grid's ranges
    assert run.name == "gs_007_lr=0.0123_wd=0_ch=16-32_rep=1-1" and run.stage_channels == (16, 32)
    assert grid.run_config(cfg, run).train.optimizer.lr == 0.0123
    for bad, index in (({**point, "lr": 0.5}, 1), ({**point, "weight_decay": -1.0}, 1), ({**point, "lr": math.nan}, 1),
                       ({**point, "stage_repeats": "../x"}, 1), (point, -1), (point, "3"), (point, True)):
        with pytest.raises(ValueError, match="outside this grid"):
            grid.trial_run(bad, plan, "tpe", index)


def test_without_optuna_the_search_says_how_to_install_it(monkeypatch, run_recipe):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(ConfigError, match=r'^the grid search runs an Optuna study: pip install "tinycnn\[sweep\]"$'):
        grid.import_optuna()
    proc = run_recipe("grid_search", "--output", "/nonexistent/gs")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'error: the grid search runs an Optuna study: pip install "tinycnn[sweep]"']


def test_storages_and_the_study_of_another_config(tmp_path):
    optuna = pytest.importorskip("optuna")
    db = grid.make_storage(grid.default_storage(tmp_path), heartbeat_interval=5)
    assert isinstance(db, optuna.storages.RDBStorage) and db.heartbeat_interval == 5
    assert db.url == f"sqlite:///{tmp_path.resolve() / 'study.db'}"
    journal = grid.make_storage(str(tmp_path / "shared" / "journal.log"))
    assert isinstance(journal, optuna.storages.JournalStorage) and (tmp_path / "shared" / "journal.log").is_file()
    with pytest.raises(ConfigError, match=r"^--storage nosuchdb://user:\*\*\*@host/x: "):
        grid.make_storage("nosuchdb://user:secret@host/x")
    cfg = load_config(overrides=SMALL)
    study = grid.open_study(db, "s", cfg)
    assert grid.open_study(db, "s", cfg)._study_id == study._study_id  # a second worker joins it
    other = cfg.replace(["train.seed=1"])
    with pytest.raises(ConfigError, match="searches another config or sampler"):
        grid.open_study(db, "s", other)
    with pytest.raises(ConfigError, match="searches another config or sampler"):
        grid.open_study(db, "s", cfg, sampler="tpe")
    assert grid.open_study(db, "s", other, overwrite=True).user_attrs["tinycnn"]["config"]["train.seed"] == 1
    foreign = optuna.create_study(study_name="theirs", storage=db)
    foreign.add_trial(optuna.create_trial(value=1.0, params={"x": 1.0},
                                          distributions={"x": optuna.distributions.FloatDistribution(0, 2)}))
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="was not made by tinycnn's grid search"):
            grid.open_study(db, "theirs", cfg, overwrite=overwrite)
    assert len(optuna.load_study(study_name="theirs", storage=db).trials) == 1  # never deleted
    # a study without grid.seeds records its grid as before they existed (such studies are joined as they were)
    assert "seeds" not in study.user_attrs["tinycnn"]["grid"]
    seeded = grid.open_study(db, "seeded", cfg.replace(["grid.seeds=[1,2]"]))
    assert seeded.user_attrs["tinycnn"]["grid"]["seeds"] == [1, 2]
    with pytest.raises(ConfigError, match="searches another config or sampler"):
        grid.open_study(db, "seeded", cfg)
    with pytest.raises(ConfigError, match="--sampler tpe samples one run per trial"):
        grid.open_study(db, "seeded_tpe", cfg.replace(["grid.seeds=[1,2]"]), sampler="tpe")


def test_worker_arguments():
    argv = ["--gpus", "0,1", "--output", "o", "--workers=2", "grid.epochs=1", "--workers", "3", "--top", "2"]
    assert grid.worker_argv(argv) == ["--output", "o", "grid.epochs=1", "--top", "2"]


def test_a_run_folder_of_another_config_is_refused_before_anything(sample_shards, tmp_path):
    cfg = load_config(REPO / "recipes" / "configs" / "grid_search.yaml", [f"data.root={sample_shards}", *GRID])
    run = grid.grid_plan(cfg)[1]
    d = tmp_path / run.name
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(grid.run_config(cfg.replace(["train.seed=7"]), run).to_dict()))
    (d / "metrics.jsonl").write_text(_epochs([0.5]))
    with pytest.raises(RunFolderError, match="holds a run with another config"):
        grid.run_grid(cfg, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [run.name]  # no study, no run started


# ============================================================================= workers on the sample

GRID = ["grid.lr=[0.001,0.02,0.05]", "grid.weight_decay=[1e-4]", "grid.stage_channels=[[8,16]]",
        "grid.stage_repeats=[[1,1],[2,2]]", "grid.epochs=1", "train.batch_size=32", "train.max_steps=3",
        "train.val_subset_size=96", "data.num_workers=0", "train.optimizer.name=adam", "train.scheduler.name=none"]
NAMES = ["gs_000_lr=0.001_wd=1e-4_ch=8-16_rep=1-1", "gs_001_lr=0.001_wd=1e-4_ch=8-16_rep=2-2",
         "gs_002_lr=0.02_wd=1e-4_ch=8-16_rep=1-1", "gs_003_lr=0.02_wd=1e-4_ch=8-16_rep=2-2",
         "gs_004_lr=0.05_wd=1e-4_ch=8-16_rep=1-1", "gs_005_lr=0.05_wd=1e-4_ch=8-16_rep=2-2"]


def _trials(out, name="grid_search"):
    optuna = pytest.importorskip("optuna")
    return optuna.load_study(study_name=name, storage=grid.default_storage(out)).get_trials()


@pytest.fixture(scope="module")
def study_run(sample_shards, tmp_path_factory, run_recipe):
    """Two worker processes (--workers 2) on one SQLite study of 6 points."""
    pytest.importorskip("optuna")
    out = tmp_path_factory.mktemp("grid") / "gs"
    proc = run_recipe("grid_search", "--workers", "2", "--data", sample_shards, "--output", out, *GRID)
    cfg = load_config(REPO / "recipes" / "configs" / "grid_search.yaml", [f"data.root={sample_shards}", *GRID])
    return cfg, out, proc


@pytest.mark.slow
def test_two_workers_finish_the_grid_and_train_each_point_once(study_run):
    cfg, out, proc = study_run
    logs = "".join(p.read_text() for p in sorted((out / "logs").glob("worker-*.log")))
    assert proc.returncode == 0, proc.stderr + logs
    trials = _trials(out)
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(t.user_attrs["run"] for t in trials) == NAMES  # no point asked twice
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials
    for name in NAMES:  # each run trained once, by one child process
        assert (out / "logs" / f"{name}.log").read_text().count("== trial") == 1
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 1 and records[0]["step"] == 3
        assert (out / name / "tb" / "hparams").is_dir()
        saved = yaml.safe_load((out / name / "config.yaml").read_text())
        assert saved["train"]["optimizer"]["lr"] == float(name.split("_lr=")[1].split("_")[0])
        assert saved["stage_channels"] == [8, 16] and saved["train"]["epochs"] == 1


@pytest.mark.slow
def test_the_results_table_of_the_study(study_run):
    cfg, out, proc = study_run
    rows = list(csv.DictReader((out / "results.csv").open()))
    keys = [(-float(r["val_accuracy"]), float(r["val_loss"])) for r in rows]  # equal accuracy: lower loss first
    assert keys == sorted(keys) and sorted(r["name"] for r in rows) == NAMES
    assert [int(r["rank"]) for r in rows] == list(range(1, 7)) and all(r["status"] == "finished" for r in rows)
    by_trial = {t.user_attrs["run"]: t.value for t in _trials(out)}
    for row in rows:  # the study's values are the table's, and the run folders'
        assert float(row["val_accuracy"]) == pytest.approx(by_trial[row["name"]])
        best = grid.best_record(grid.read_metrics(out / row["name"]))
        assert float(row["val_accuracy"]) == pytest.approx(best["val/accuracy"])
        assert float(row["val_loss"]) == pytest.approx(best["val/loss"])
    md = (out / "results.md").read_text()
    assert md.index(rows[0]["name"]) < md.index(rows[1]["name"])
    data = json.loads((out / "results.json").read_text())
    assert data["best"]["name"] == rows[0]["name"] and data["study"]["sampler"] == "grid"
    assert data["runs_planned"] == 6 and grid.short_name(int(rows[0]["index"])) in proc.stdout
    loaded = grid.load_results(out)
    assert [r["name"] for r in loaded["results"]] == [r["name"] for r in rows]
    (out / "results.json").unlink()
    (out / "results.csv").unlink()
    from_study = grid.load_results(out)  # no tables: the run folders, with the statuses of the study
    assert from_study["source"] == "the gs_* run folders and study.db"
    assert [(r["name"], r["status"]) for r in from_study["results"]] == [(r["name"], "finished") for r in rows]


@pytest.mark.slow
def test_a_finished_study_trains_nothing_again(study_run, monkeypatch):
    cfg, out, proc = study_run
    before = {name: (out / name / "metrics.jsonl").read_text() for name in NAMES}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(grid.subprocess, "Popen", no_training)
    again = grid.run_grid(cfg, out, progress=False)
    assert [r["status"] for r in again] == ["finished"] * 6
    # a new study over the same run folders: each trial finds its run done and records it without training
    (out / "study.db").unlink()
    fresh = grid.run_grid(cfg, out, progress=False)
    assert [(r["name"], r["val_accuracy"], r["status"]) for r in fresh] == \
        [(r["name"], r["val_accuracy"], r["status"]) for r in again]
    assert {name: (out / name / "metrics.jsonl").read_text() for name in NAMES} == before
    assert [t.state.name for t in _trials(out)] == ["COMPLETE"] * 6


@pytest.mark.slow
def test_a_diverged_run_is_recorded_and_the_study_goes_on(sample_shards, tmp_path):
    """SGD with lr 1e6 and weight decay 1e6: the loss is NaN within 3 steps."""
    pytest.importorskip("optuna")
    cfg = load_config(REPO / "recipes" / "configs" / "grid_search.yaml",
                      [f"data.root={sample_shards}", *GRID, "grid.lr=[1e6]", "grid.weight_decay=[1e6]",
                       "grid.stage_repeats=[[1,1]]", "train.optimizer.name=sgd"])
    results = grid.run_grid(cfg, tmp_path, progress=False)
    assert [(r["name"], r["status"]) for r in results] == [("gs_000_lr=1e6_wd=1e6_ch=8-16_rep=1-1", "diverged")]
    assert results[0]["error"].startswith("loss is nan")
    [trial] = _trials(tmp_path)
    assert trial.state.name == "FAIL" and trial.user_attrs["status"] == "diverged"
    assert "loss is nan" in json.loads((tmp_path / results[0]["name"] / "grid_failed.json").read_text())["error"]
    assert grid.run_grid(cfg, tmp_path, progress=False)[0]["status"] == "diverged"  # not trained again
    assert (tmp_path / "logs" / f"{results[0]['name']}.log").read_text().count("== trial") == 1


@pytest.mark.slow
def test_a_grid_with_two_seeds_trains_each_point_twice(sample_shards, tmp_path):
    """One point, grid.seeds=[1,2], train.ema and flip TTA on: two runs with their own seeds, one point of n=2."""
    pytest.importorskip("optuna")
    cfg = load_config(REPO / "recipes" / "configs" / "grid_search.yaml",
                      [f"data.root={sample_shards}", *GRID, "grid.lr=[0.02]", "grid.stage_repeats=[[1,1]]",
                       "grid.seeds=[1,2]", "train.ema=true", "train.ema_decay=0.5", "train.tta=flip"])
    results = grid.run_grid(cfg, tmp_path, progress=False)
    names = ["gs_000_lr=0.02_wd=1e-4_ch=8-16_rep=1-1_seed=1", "gs_000_lr=0.02_wd=1e-4_ch=8-16_rep=1-1_seed=2"]
    assert sorted(r["name"] for r in results) == names and all(r["status"] == "finished" for r in results)
    trials = _trials(tmp_path)
    assert sorted((t.state.name, t.params["seed"], t.user_attrs["run"]) for t in trials) == \
        [("COMPLETE", 1, names[0]), ("COMPLETE", 2, names[1])]
    losses = []
    for seed, name in enumerate(names, 1):
        assert yaml.safe_load((tmp_path / name / "config.yaml").read_text())["train"]["seed"] == seed
        [record] = grid.read_metrics(tmp_path / name)
        assert record["tta"] == "flip" and record["val_ema/accuracy"] is not None
        row = next(r for r in results if r["name"] == name)
        better = max(record["val/accuracy"], record["val_ema/accuracy"])
        assert row["val_accuracy"] == better and row["weights"] == grid.val_figures(record)["weights"]
        assert row["tta"] == "flip" and row["seed"] == seed
        losses.append(record["train/loss"])
    assert losses[0] != losses[1]  # distinct seeds: distinct runs
    accs = sorted(r["val_accuracy"] for r in results)
    data = json.loads((tmp_path / "results.json").read_text())
    [point] = data["points"]
    assert (point["n"], point["seeds"], point["seeds_done"]) == (2, 2, [1, 2])
    assert point["val_accuracy"] == pytest.approx(sum(accs) / 2)
    assert point["val_accuracy_sd"] == pytest.approx((accs[1] - accs[0]) / math.sqrt(2))
    assert data["best"]["name"] == "gs_000_lr=0.02_wd=1e-4_ch=8-16_rep=1-1" and data["base"]["seeds"] == [1, 2]
    md = (tmp_path / "results.md").read_text()
    assert f"{grid.format_spread(point)}" in md and "(n=2)" in md and "measured with flip TTA" in md
    assert [r["row"] for r in csv.DictReader((tmp_path / "results.csv").open())] == ["mean", "run", "run"]
    again = grid.run_grid(cfg, tmp_path, progress=False)  # finished: nothing trained again
    assert [(r["name"], r["val_accuracy"]) for r in again] == [(r["name"], r["val_accuracy"]) for r in results]
    for name in names:
        assert (tmp_path / "logs" / f"{name}.log").read_text().count("== trial") == 1


def _wait(what, timeout=180, poll=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


STOPPABLE = ["grid.lr=[0.001]", "grid.weight_decay=[1e-4]", "grid.stage_channels=[[8,16]]", "grid.epochs=3",
             "train.batch_size=32", "data.train_split=val", "train.val_subset_size=32", "data.num_workers=0",
             "train.optimizer.name=adam", "train.scheduler.name=none", "augment.enabled=false"]


def _epoch_saved(run_dir, epoch=1):
    """the run's epoch in metrics.jsonl and its state saved"""
    return (any(r["epoch"] >= epoch for r in grid.read_metrics(run_dir))
            and (run_dir / "state" / "progress.json").is_file())


def _epochs_once(run_dir, epochs=3):
    return [r["epoch"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == \
        list(range(1, epochs + 1))


@pytest.mark.slow
def test_a_killed_worker_leaves_its_trial_to_the_other(sample_shards, tmp_path):
    """Worker A is SIGKILLed mid-trial; worker B takes the trial over after the grace period and resumes its run."""
    pytest.importorskip("optuna")
    out = tmp_path / "gs"
    args = [sys.executable, str(REPO / "recipes" / "grid_search.py"), "--data", str(sample_shards), "--output", str(out),
            "--no-progress", "--heartbeat-interval", "1", "--grace-period", "2", *STOPPABLE,
            "grid.stage_repeats=[[1,1],[2,2]]"]
    a = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    b = None
    try:
        def running_trial_of_a():
            """a trial of worker A"""
            if not (out / "study.db").is_file():
                return None
            try:
                trials = _trials(out)
            except Exception:  # noqa: BLE001 - the study is being created
                return None
            return next((t for t in trials if t.state.name == "RUNNING" and "run" in t.user_attrs
                         and t.user_attrs.get("worker", "").endswith(f":{a.pid}")), None)

        killed = _wait(running_trial_of_a)
        b = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        run_dir = out / killed.user_attrs["run"]
        _wait(lambda: _epoch_saved(run_dir))
        a.kill()
        a.wait()
        output = b.communicate(timeout=300)[0].decode()
        assert b.returncode == 0, output
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    trials = _trials(out)
    by_run = {}
    for t in trials:
        by_run.setdefault(t.user_attrs["run"], []).append(t)
    assert sorted(by_run) == sorted(r.name for r in grid.grid_plan(load_config(overrides=STOPPABLE + [
        "grid.stage_repeats=[[1,1],[2,2]]"])))
    retried = by_run[killed.user_attrs["run"]]
    assert [t.state.name for t in retried] == ["FAIL", "COMPLETE"]
    assert retried[1].system_attrs["failed_trial"] == killed.number
    assert retried[1].user_attrs["worker"].endswith(f":{b.pid}")
    assert all(t.state.name == "COMPLETE" for name, ts in by_run.items() if name != killed.user_attrs["run"] for t in ts)
    assert "resuming" in (out / "logs" / f"{run_dir.name}.log").read_text()  # from A's saved state
    for name in by_run:
        assert _epochs_once(out / name)  # every epoch once: nothing trained twice or lost


@pytest.mark.slow
def test_sigterm_stops_the_worker_and_the_same_command_continues(sample_shards, tmp_path):
    from tinycnn.train import TrainingStopped

    pytest.importorskip("optuna")
    cfg = load_config(REPO / "recipes" / "configs" / "grid_search.yaml",
                      [f"data.root={sample_shards}", *STOPPABLE, "grid.stage_repeats=[[1,1]]"])
    run_dir = tmp_path / grid.grid_plan(cfg)[0].name

    def stop_after_epoch_1():
        _wait(lambda: _epoch_saved(run_dir))
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=stop_after_epoch_1, daemon=True)
    killer.start()
    with pytest.raises(TrainingStopped, match=r"^SIGTERM: gs_000_\S+ saved its state; run the same command again"):
        grid.run_grid(cfg, tmp_path, progress=False, poll_s=0.2)
    killer.join()
    assert [t.state.name for t in _trials(tmp_path)] == ["FAIL", "WAITING"]  # queued again at once
    assert (run_dir / "state" / "progress.json").is_file()
    results = grid.run_grid(cfg, tmp_path, progress=False)
    assert [r["status"] for r in results] == ["finished"] and _epochs_once(run_dir)
    assert "resuming" in (tmp_path / "logs" / f"{run_dir.name}.log").read_text()
    assert [t.state.name for t in _trials(tmp_path)] == ["FAIL", "COMPLETE"]
