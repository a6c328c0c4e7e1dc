"""Runs never lose or mix results: fresh run folders, the lock, resume from the folder alone, refusals that leave
nothing behind, stopping through the launcher, progress in a log file."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinycnn.progress import RunProgress
from tinycnn.runs import RunFolderError, RunLock, claim_folder, holds_results

REPO = Path(__file__).resolve().parents[1]
TINY = ["stage_channels=[8,16]", "stage_repeats=[1,1]", "train.batch_size=32", "data.num_workers=0",
        "train.overfit_small=true", "train.overfit_small_size=128", "train.val_subset_size=64", "train.log_every=1"]


# ============================================================================= the folder and its lock

def test_a_folder_holding_results_is_never_reused(tmp_path):
    said = []
    first, lock = claim_folder(tmp_path / "run", say=said.append)
    assert first == tmp_path / "run" and not said
    (first / "metrics.jsonl").write_text("{}\n")
    lock.release()
    second, lock2 = claim_folder(tmp_path / "run", say=said.append)
    assert second == tmp_path / "run-2" and "writing this one to" in said[0] and str(second) in said[0]
    (second / "metrics.jsonl").write_text("{}\n")
    lock2.release()
    assert claim_folder(tmp_path / "run", say=said.append)[0] == tmp_path / "run-3"
    assert (first / "metrics.jsonl").read_text() == "{}\n"  # untouched


def test_resume_and_overwrite(tmp_path):
    with pytest.raises(RunFolderError, match="holds no run to continue"):
        claim_folder(tmp_path / "none", resume=True)
    folder, lock = claim_folder(tmp_path / "run")
    (folder / "best.safetensors").write_bytes(b"x")
    (folder / "state").mkdir()
    lock.release()
    again, lock = claim_folder(tmp_path / "run", resume=True)
    assert again == folder and (folder / "best.safetensors").exists()
    lock.release()
    said = []
    again, lock = claim_folder(tmp_path / "run", overwrite=True, say=said.append)
    assert again == folder and not holds_results(folder) and "removed the earlier run" in said[0]
    lock.release()
    with pytest.raises(RunFolderError, match="pass one of them"):
        claim_folder(tmp_path / "run", resume=True, overwrite=True)


@pytest.mark.slow
def test_a_second_process_stops_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tinycnn.runs import RunLock; "
                               f"lock = RunLock({str(tmp_path / 'run')!r}).acquire(); print('locked', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError) as e:
            RunLock(tmp_path / "run").acquire()
        assert f"process {holder.pid}" in str(e.value) and str(tmp_path / "run") in str(e.value)
        assert "--output" in str(e.value)
        (tmp_path / "run" / "metrics.jsonl").write_text("")  # a run in progress: not stepped around either
        with pytest.raises(RunFolderError, match=f"process {holder.pid}"):
            claim_folder(tmp_path / "run")
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock
        holder.wait()
    folder, lock = claim_folder(tmp_path / "run", resume=True)
    assert folder == tmp_path / "run"
    lock.release()


# ============================================================================= progress in a log file

def test_progress_prints_plain_lines_off_a_terminal():
    out = io.StringIO()  # not a TTY, like a job log
    with RunProgress(10, interval_s=0.0, stream=out) as bar:
        bar.start_epoch(0, 2, 5)
        for step in range(1, 6):
            bar.advance(step, f"loss {1 / step:.3f}  100 img/s")
        bar.end_epoch()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("epoch 1/2 step 5/10 loss 0.200 100 img/s ETA")
    quiet = io.StringIO()
    with RunProgress(10, enabled=False, interval_s=0.0, stream=quiet) as bar:
        bar.start_epoch(0, 2, 5)
        bar.advance(1, "loss 1")
    assert quiet.getvalue() == ""


# ============================================================================= the train recipe, end to end

def run_train(args, **kw):
    """recipes/train.py in a fresh interpreter: for what needs one (resuming from the folder alone)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "recipes/train.py", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, **kw)


def one_line(text):
    """rich wraps long lines at 80 columns when stdout is a pipe (or a file): the text as one line."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def first_run(sample_shards, tmp_path_factory, run_recipe):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    proc = run_recipe("train", "--data", sample_shards, "--output", out, "train.epochs=1",
                      "train.progress_seconds=0.01", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_the_same_command_twice_keeps_both_runs(first_run, sample_shards, run_recipe):
    out, proc = first_run
    # stdout is not a terminal here, as in a job log: plain progress lines, then the summary
    assert "epoch 1/1 step" in proc.stdout and "ETA" in proc.stdout and "best val accuracy" in proc.stdout
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = run_recipe("train", "--data", sample_shards, "--output", out, "train.epochs=1", "--no-progress", *TINY)
    assert again.returncode == 0, again.stderr[-3000:]
    second = out.with_name(out.name + "-2")
    assert f"writing this one to {second}" in one_line(again.stdout)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the first run is intact
    assert (second / "best.safetensors").is_file() and len((second / "metrics.jsonl").read_text().splitlines()) == 1
    # --no-progress: no progress lines, still the one-line summary, last
    assert "ETA" not in again.stdout and " step " not in again.stdout
    assert again.stdout.strip().splitlines()[-1].startswith("best val accuracy")


def test_a_refused_config_leaves_nothing_on_disk(sample_shards, tmp_path, run_recipe):
    for bad in ("train.label_smoothing=abc", "model=resnet10", "train.optimizer.name=lamb", "stage_channels=abc"):
        proc = run_recipe("train", "--data", sample_shards, "--output", tmp_path / "run", bad)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and bad.split("=")[0] in proc.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_needs_only_the_folder_and_refuses_changes(first_run, sample_shards, run_recipe):
    out, _ = first_run
    refused = run_recipe("train", "--resume", "--output", out, "train.optimizer.lr=0.1")
    assert refused.returncode == 2 and "train.optimizer.lr=0.1 (saved: 0.003)" in refused.stderr
    assert "train.epochs" in refused.stderr  # says what may change
    refused = run_recipe("train", "--resume", "--output", out, "--config", "recipes/configs/original.yaml")
    assert refused.returncode == 2 and "drop --config" in refused.stderr
    metrics_before = (out / "metrics.jsonl").read_text()
    # a fresh interpreter: nothing but the folder carries the run (config, weights, optimizer, RNG, step)
    more = run_train(["--resume", "--output", out, "train.epochs=2", "--no-progress"])  # more epochs: allowed
    assert more.returncode == 0, more.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "metrics.jsonl").read_text().startswith(metrics_before)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 2 * 128 // 32


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_the_trainer_with_state_saved(sample_shards, tmp_path):
    # slow for a reason: the launcher and the trainer are two real processes, which is what it tests
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--cpu",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.Popen(launcher + ["recipes/train.py", "--data", str(sample_shards), "--output", str(out),
                                        "train.epochs=50", "--no-progress", *TINY],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    trainers = psutil.Process(proc.pid).children(recursive=True)
    assert trainers
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(trainers, timeout=120)
    assert not alive, f"trainer outlived its launcher: {alive}"
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert progress["reason"] == "SIGTERM" and progress["step"] >= 4


# ============================================================================= data provenance at the recipe

def test_a_source_that_does_not_match_the_shards_is_refused(sample_shards, sample_parquet, tmp_path, run_recipe):
    proc = run_recipe("train", "--data", sample_shards, "--output", tmp_path / "run", f"data.source={sample_parquet}",
                      *TINY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(sample_parquet) in proc.stderr and "--force" in proc.stderr and "--data" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_empty_data_folder_is_an_error_not_a_download(tmp_path, run_recipe):
    (tmp_path / "empty").mkdir()
    proc = run_recipe("train", "--data", tmp_path / "empty", "--output", tmp_path / "run")
    assert proc.returncode == 2 and "empty" in proc.stderr and "tinycnn-prepare" in proc.stderr, proc.stderr
    assert "download" not in proc.stdout.lower() and not (tmp_path / "downloads").exists()
    assert not (tmp_path / "run").exists()


def test_an_unreachable_data_url_is_an_error_before_a_run_folder(tmp_path, run_recipe, monkeypatch):
    import tinycnn.storage

    monkeypatch.setattr(tinycnn.storage, "RETRY_WAIT", 0.0)
    proc = run_recipe("train", "--data", "http://127.0.0.1:9/shards", "--output", tmp_path / "run")
    assert proc.returncode == 2 and "http://127.0.0.1:9/shards/manifest.json" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
