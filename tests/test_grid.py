"""Grid search (tinycnn.grid, recipes/grid_search.py): naming and planning, reading results back, and the
recipe on the 10-class sample with a 2-stage 8/16-channel model and a handful of steps."""
import csv
import json
from pathlib import Path

import pytest
import yaml

from tinycnn import grid
from tinycnn.config import load_config

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


def test_parts_split_the_plan_and_child_arguments():
    plan = grid.grid_plan(load_config())
    assert grid.parse_part("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="i/N"):
            grid.parse_part(bad)
    parts = [grid.select_part(plan, (i, 4)) for i in range(4)]
    assert sorted(r.index for p in parts for r in p) == list(range(36))
    assert [r.index for r in parts[1]] == list(range(1, 36, 4))
    assert grid.select_part(plan, None) == plan
    argv = ["--gpus", "0,1", "--output", "o", "--part=1/2", "--gpus=2", "grid.epochs=1", "--part", "0/3"]
    assert grid.child_argv(argv) == ["--output", "o", "grid.epochs=1"]


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
    # the tables once written: results.csv, then the parts' tables merged, then results.json
    grid.write_results(rows, tmp_path)
    (tmp_path / "results.json").unlink()
    from_csv = grid.load_results(tmp_path)
    assert from_csv["source"] == "results.csv"
    for key in grid.RESULT_COLUMNS:
        assert [r[key] for r in from_csv["results"]] == [r[key] for r in rows], key
    grid.write_results(rows[:1], tmp_path, "results-part-0-of-2", meta={"base": {"seed": 3}})
    grid.write_results(rows[1:], tmp_path, "results-part-1-of-2", meta={"base": {"seed": 3}})
    parts = grid.load_results(tmp_path)
    assert parts["source"] == "results-part-0-of-2.json, results-part-1-of-2.json" and parts["base"] == {"seed": 3}
    assert [r["name"] for r in parts["results"]] == [r["name"] for r in rows]
    grid.write_results(rows[:2], tmp_path, meta={"runs_planned": 3})
    whole = grid.load_results(tmp_path)
    assert whole["source"] == "results.json" and whole["runs_planned"] == 3 and len(whole["results"]) == 2


def test_best_record_is_the_first_of_the_best():
    records = [{"epoch": 1}, {"epoch": 2, "val/accuracy": 0.5}, {"epoch": 3, "val/accuracy": 0.5},
               {"epoch": 4, "val/accuracy": 0.4}]
    assert grid.best_record(records)["epoch"] == 2
    assert grid.best_record(records[:1]) is None and grid.best_record([]) is None


# ============================================================================= the recipe on the sample

GRID = ["grid.lr=[0.001,0.02]", "grid.weight_decay=[1e-4]", "grid.stage_channels=[[8,16]]",
        "grid.stage_repeats=[[1,1]]", "grid.epochs=1", "train.batch_size=32", "train.max_steps=3",
        "train.val_subset_size=96", "data.num_workers=0", "train.optimizer.name=adam", "train.scheduler.name=none"]
NAMES = ["gs_000_lr=0.001_wd=1e-4_ch=8-16_rep=1-1", "gs_001_lr=0.02_wd=1e-4_ch=8-16_rep=1-1"]


@pytest.fixture(scope="module")
def grid_run(sample_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    cfg = load_config(REPO / "recipes" / "configs" / "grid_search.yaml", [f"data.root={sample_shards}", *GRID])
    results = grid.run_grid(cfg, out, progress=False)
    return cfg, out, results


def test_grid_search_on_sample(grid_run):
    cfg, out, results = grid_run
    assert sorted(r["name"] for r in results) == NAMES
    assert all(r["status"] == "finished" and r["epochs"] == 1 and r["steps"] == 3 for r in results)
    for name in NAMES:
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 1 and records[0]["step"] == 3
        assert (out / name / "tb" / "hparams").is_dir()
        saved = yaml.safe_load((out / name / "config.yaml").read_text())
        assert saved["train"]["optimizer"]["lr"] == (0.001 if "lr=0.001" in name else 0.02)
        assert saved["stage_channels"] == [8, 16]
    rows = list(csv.DictReader((out / "results.csv").open()))
    keys = [(-float(r["val_accuracy"]), float(r["val_loss"])) for r in rows]  # equal accuracy: lower loss first
    assert keys == sorted(keys) and sorted(r["name"] for r in rows) == NAMES
    assert [int(r["rank"]) for r in rows] == [1, 2]
    by_name = {r["name"]: r for r in results}
    for row in rows:
        assert float(row["val_accuracy"]) == pytest.approx(by_name[row["name"]]["val_accuracy"])
        assert float(row["val_loss"]) == pytest.approx(by_name[row["name"]]["val_loss"])
    md = (out / "results.md").read_text()
    assert md.index(rows[0]["name"]) < md.index(rows[1]["name"])
    assert json.loads((out / "results.json").read_text())["best"]["name"] == rows[0]["name"]


def test_grid_search_skips_finished_runs(grid_run, monkeypatch):
    cfg, out, results = grid_run
    import tinycnn.train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(tinycnn.train, "train", no_training)
    again = grid.run_grid(cfg, out, progress=False)
    assert [(r["name"], r["val_accuracy"]) for r in again] == [(r["name"], r["val_accuracy"]) for r in results]
    # a part runs its slice only
    part = grid.run_grid(cfg, out, part=(1, 2), progress=False)
    assert [r["name"] for r in part] == [NAMES[1]]
    assert (out / "results-part-1-of-2.md").is_file()
    merged = grid.collect_results(cfg, out)
    assert [r["name"] for r in merged] == [r["name"] for r in results]


def test_grid_search_recipe_part_and_merge(grid_run, run_recipe):
    """The command line a --gpus part process gets, then --merge: the merged table of every run folder."""
    cfg, out, results = grid_run
    (out / "results.md").unlink()
    args = ["--data", cfg.data.root, "--output", str(out), "--gpus", "0,1", *GRID]
    part = grid.child_argv(args) + ["--part", "0/2", "--no-progress"]
    proc = run_recipe("grid_search", *part)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout
    assert f"{NAMES[0]}: finished before, skipped" in printed and NAMES[1] not in printed
    rows = list(csv.DictReader((out / "results-part-0-of-2.csv").open()))
    assert [r["name"] for r in rows] == [NAMES[0]]
    assert not (out / "results.md").exists()
    assert run_recipe("grid_search", *grid.child_argv(args), "--merge").returncode == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == [r["name"] for r in results]
    assert NAMES[0] in (out / "results.md").read_text()


def test_launch_parts_runs_one_process_per_gpu(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text("import json, os, sys\n"
                      "print(json.dumps({'gpu': os.environ['CUDA_VISIBLE_DEVICES'], 'argv': sys.argv[1:]}))\n"
                      "sys.exit(3 if '1/3' in sys.argv else 0)\n")
    codes = grid.launch_parts(script, ["--gpus", "4,5,6", "--output", str(tmp_path), "a=1"], ["4", "5", "6"],
                              tmp_path, console=None)
    assert codes == [0, 3, 0]
    for i, gpu in enumerate("456"):
        seen = json.loads((tmp_path / "logs" / f"part-{i}-of-3.log").read_text())
        assert seen == {"gpu": gpu, "argv": ["--output", str(tmp_path), "a=1", "--part", f"{i}/3", "--no-progress"]}
