"""End to end on the real sample: train under accelerate (1 and 2 CPU processes), evaluate, resume, failures."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinycnn.config import load_config
from tinycnn.train import TrainingStopped, train

REPO = Path(__file__).resolve().parents[1]
SMALL = ["stage_channels=[16,32,64]", "stage_repeats=[1,1,1]", "data.num_workers=1", "train.log_every=5"]
pytestmark = [pytest.mark.real_data, pytest.mark.slow]


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
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def two_process_run(sample_shards, tmp_path_factory):
    """The course project's config file, unchanged, with small-model overrides, on 2 CPU processes (gloo)."""
    out = tmp_path_factory.mktemp("runs") / "original-2proc"
    run(accelerate_launch(2) + ["recipes/train.py", "--config", "recipes/configs/original.yaml",
                                "--data", str(sample_shards), "--output", str(out), "--max_epochs", "3", *SMALL])
    return out


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


@pytest.mark.parametrize("processes", [1, 2])
def test_evaluate_reproduces_the_best_val_accuracy(two_process_run, sample_shards, processes, tmp_path):
    best = max(r["val/accuracy"] for r in metrics(two_process_run))
    out = tmp_path / "val.json"
    launcher = accelerate_launch(processes) if processes > 1 else [sys.executable]
    run(launcher + ["recipes/evaluate.py", "--checkpoint", str(two_process_run / "best.safetensors"),
                    "--data", str(sample_shards), "--split", "val", "--json", str(out), "--num_workers", "1"])
    res = json.loads(out.read_text())
    assert res["num_samples"] == 500
    assert res["accuracy"] == pytest.approx(best, abs=1e-9)
    assert len(res["per_class"]) == 10 and res["top5"] >= res["accuracy"]


def test_sigterm_saves_state_and_resume_finishes_with_the_same_steps(sample_shards, tmp_path):
    out = tmp_path / "interrupted"
    args = [sys.executable, "recipes/train.py", "--config", "recipes/configs/original.yaml", "--data",
            str(sample_shards), "--output", str(out), *SMALL, "train.batch_size=64", "train.overfit_small=true",
            "train.overfit_small_size=1024", "train.val_subset_size=100", "train.epochs=8"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists():  # wait for epoch 1 to end, then stop it soon after
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.2)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "SIGTERM" in text and "--resume" in text, text[-2000:]
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert 16 <= progress["step"] < 8 * 16 and progress["reason"] == "SIGTERM"
    # the folder alone: its saved config (model, data, schedule) without repeating the original overrides
    run([sys.executable, "recipes/train.py", "--resume", "--output", str(out)])
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert rows[-1]["step"] == 8 * (1024 // 64)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_best(sample_shards, tmp_path):
    cfg = load_config(REPO / "recipes/configs/original.yaml", [
        f"data.root={sample_shards}", *SMALL, "train.batch_size=64", "train.overfit_small=true",
        "train.overfit_small_size=256", "train.val_subset_size=64", "train.epochs=3", "train.log_every=1"])
    first = train(cfg, tmp_path / "run", progress=False)
    assert first["best_epoch"] is not None
    best = (tmp_path / "run" / "best.safetensors").read_bytes()
    cfg = cfg.replace(["train.optimizer.lr=1e30", "train.optimizer.name=sgd"])  # diverges at once
    with pytest.raises(TrainingStopped, match=r"loss is (nan|inf).*best checkpoint"):
        train(cfg, tmp_path / "run2", progress=False)
    assert (tmp_path / "run" / "best.safetensors").read_bytes() == best


def test_missing_data_says_how_to_prepare(tmp_path):
    proc = run([sys.executable, "recipes/train.py", "--data", str(tmp_path / "none"), "--no-download",
                "--output", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2
    assert "tinycnn-prepare" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_for_other_classes_is_refused(two_process_run, sample_shards, tmp_path):
    import timm

    from tinycnn import save_model
    other = tmp_path / "other.safetensors"
    save_model(timm.create_model("tinycnn", num_classes=10), other, classes=[f"n{i:08d}" for i in range(10)])
    proc = run([sys.executable, "recipes/evaluate.py", "--checkpoint", str(other), "--data", str(sample_shards),
                "--split", "val"], check=False)
    assert proc.returncode == 2 and "trained on 10 classes" in proc.stderr and "Traceback" not in proc.stderr
