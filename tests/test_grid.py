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
