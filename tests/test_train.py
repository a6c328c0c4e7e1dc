"""End to end on the sample: train under accelerate (1 and 2 CPU processes), evaluate, resume, failures."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tinycnn.config import load_config
from tinycnn.train import TrainingStopped, train

REPO = Path(__file__).resolve().parents[1]
SMALL = ["stage_channels=[16,32,64]", "stage_repeats=[1,1,1]", "data.num_workers=1", "train.log_every=5"]


def run(args, check=True, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def accelerate_launch(n):
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(n), "--cpu",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0"]  # a free port: other tests may train beside this one


@pytest.fixture(scope="module")
def two_process_run(sample_shards, tmp_path_factory):
    """The course project's config file, unchanged, with small-model overrides, on 2 CPU processes (gloo).

    Slow for a reason (a launcher, torchrun and two trainers, 3 epochs): DDP needs real processes. Every test
    that needs a trained checkpoint shares this one run."""
    out = tmp_path_factory.mktemp("runs") / "original-2proc"
    run(accelerate_launch(2) + ["recipes/train.py", "--config", "recipes/configs/original.yaml",
                                "--data", str(sample_shards), "--output", str(out), "--max_epochs", "3", *SMALL])
    return out


@pytest.mark.slow
def test_two_processes_learn_well_above_chance(two_process_run):
    rows = metrics(two_process_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"epoch", "train/loss", "val/loss", "val/accuracy", "lr", "images_per_sec"} <= set(r)
        assert r["lr"] == pytest.approx(0.002)  # the original: constant lr
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] < math.log(10)
    assert max(r["val/accuracy"] for r in rows) > 0.25  # chance is 0.10 for the 10-class sample
    # 4500 train images, batch 128 per process, 2 processes: 17 steps an epoch
    assert rows[-1]["step"] == 3 * (4500 // 256)
    for name in ("best.safetensors", "last.safetensors", "config.yaml"):
        assert (two_process_run / name).is_file()
    assert list((two_process_run / "tb").rglob("events.out.tfevents*"))


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_evaluate_reproduces_the_best_val_accuracy(two_process_run, sample_shards, processes, tmp_path, run_recipe):
    best = max(r["val/accuracy"] for r in metrics(two_process_run))
    out = tmp_path / "val.json"
    args = ["--checkpoint", str(two_process_run / "best.safetensors"), "--data", str(sample_shards), "--split", "val",
            "--json", str(out), "--num_workers", "1"]
    if processes > 1:  # each rank evaluates its part and the sums are all-reduced: real processes
        run(accelerate_launch(processes) + ["recipes/evaluate.py", *args])
    else:
        proc = run_recipe("evaluate", *args)
        assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["num_samples"] == 500
    assert res["accuracy"] == pytest.approx(best, abs=1e-9)
    assert len(res["per_class"]) == 10 and res["top5"] >= res["accuracy"]


@pytest.mark.slow
def test_sigterm_saves_state_and_resume_finishes_with_the_same_steps(sample_shards, tmp_path, run_recipe,
                                                                     monkeypatch):
    import tinycnn.train

    # SIGTERM to this process right after epoch 1's evaluation (as `kill PID` would): a fixed point in the run,
    # so no waiting for files and no race with the end of the run. The launcher test in test_runs.py sends it
    # from another process.
    evaluate, calls = tinycnn.train.evaluate, []

    def evaluate_then_sigterm(*args, **kwargs):
        calls.append(args)
        result = evaluate(*args, **kwargs)
        if len(calls) == 1:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                pytest.fail("training does not handle SIGTERM: the signal would end pytest")
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(tinycnn.train, "evaluate", evaluate_then_sigterm)
    out = tmp_path / "interrupted"
    proc = run_recipe("train", "--config", "recipes/configs/original.yaml", "--data", sample_shards, "--output", out,
                      *SMALL, "train.batch_size=64", "train.overfit_small=true", "train.overfit_small_size=1024",
                      "train.val_subset_size=100", "train.epochs=3")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "SIGTERM" in text and "--resume" in text, text[-2000:]
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert 16 <= progress["step"] < 3 * 16 and progress["reason"] == "SIGTERM"
    # the folder alone: its saved config (model, data, schedule) without repeating the original overrides
    monkeypatch.setattr(tinycnn.train, "evaluate", evaluate)
    proc = run_recipe("train", "--resume", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == list(range(1, 4))
    assert rows[-1]["step"] == 3 * (1024 // 64)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_best(sample_shards, tmp_path):
    cfg = load_config(REPO / "recipes/configs/original.yaml", [
        f"data.root={sample_shards}", *SMALL, "train.batch_size=64", "train.overfit_small=true",
        "train.overfit_small_size=256", "train.val_subset_size=64", "train.epochs=1", "train.log_every=1"])
    first = train(cfg, tmp_path / "run", progress=False)
    assert first["best_epoch"] is not None
    best = (tmp_path / "run" / "best.safetensors").read_bytes()
    cfg = cfg.replace(["train.optimizer.lr=1e30", "train.optimizer.name=sgd"])  # diverges at once
    with pytest.raises(TrainingStopped, match=r"loss is (nan|inf).*best checkpoint"):
        train(cfg, tmp_path / "run2", progress=False)
    assert (tmp_path / "run" / "best.safetensors").read_bytes() == best


def test_missing_data_says_how_to_prepare(tmp_path, run_recipe):
    proc = run_recipe("train", "--data", tmp_path / "none", "--no-download", "--output", tmp_path / "o")
    assert proc.returncode == 2
    assert "tinycnn-prepare" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_for_other_classes_is_refused(sample_shards, tmp_path, run_recipe):
    import timm

    from tinycnn import save_model
    other = tmp_path / "other.safetensors"
    save_model(timm.create_model("tinycnn", num_classes=10), other, classes=[f"n{i:08d}" for i in range(10)])
    proc = run_recipe("evaluate", "--checkpoint", other, "--data", sample_shards, "--split", "val")
    assert proc.returncode == 2 and "trained on 10 classes" in proc.stderr and "Traceback" not in proc.stderr
