"""Several nodes and restarts: `accelerate launch --cpu --num_machines M` runs one job across M machines (here two
"machines" on loopback), where only the global main process claims and writes the run folder; and a job that
torchrun restarts (`--max-restarts`) continues its own folder from its saved state instead of a fresh one."""
import argparse
import contextlib
import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tinycnn import cli as recipe_cli
from tinycnn.runs import MARKER_NAME, claim_folder

REPO = Path(__file__).resolve().parents[1]
TINY = ["stage_channels=[8,16,32]", "stage_repeats=[1,1,1]", "train.batch_size=32", "data.num_workers=0",
        "train.overfit_small=true", "train.overfit_small_size=256", "train.val_subset_size=64", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(folder):
    """The base URL of a loopback HTTP server serving `folder`."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def node_launcher(rank: int, port: int, machines: int = 2, processes: int = 2):
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_machines", str(machines),
            "--num_processes", str(processes), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]


def run_nodes(script_args, machines=2, processes=2, timeout=300):
    """Start every node's `accelerate launch` at once; their (returncode, output) once all have ended."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TINYCNN_TRACEBACK", None)
    procs = [subprocess.Popen(node_launcher(rank, port, machines, processes) + script_args, cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(machines)]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ============================================================================= the layout handed to torchrun

def test_one_machine_stays_standalone_and_several_name_their_node():
    one = {"num_processes": 4, "num_machines": 1, "machine_rank": 0, "main_process_ip": None,
           "main_process_port": None}
    assert recipe_cli._torchrun_options(one) == ["--standalone", "--nproc_per_node", "4"]
    two = {"num_processes": 4, "num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1",
           "main_process_port": "29555"}
    assert recipe_cli._torchrun_options(two) == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
                                             "--master_port", "29555", "--nproc_per_node", "2"]


def test_the_launcher_command_line_gives_the_layout(monkeypatch):
    line = ["python", "/venv/bin/accelerate", "launch", "--cpu", "--num_machines=2", "--num-processes", "4",
            "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29555", "train.py"]
    monkeypatch.setattr(recipe_cli, "_accelerate_launcher_args", lambda: line)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert recipe_cli._accelerate_cpu_layout() == {"num_processes": 4, "num_machines": 2, "machine_rank": 1,
                                               "main_process_ip": "10.0.0.1", "main_process_port": "29555"}
    assert recipe_cli._accelerate_cpu_processes() == 4
    uneven = [a if a != "4" else "3" for a in line]
    monkeypatch.setattr(recipe_cli, "_accelerate_launcher_args", lambda: uneven)
    with pytest.raises(recipe_cli.ConfigError, match="multiple of --num_machines 2"):
        recipe_cli._accelerate_cpu_layout()


def test_the_launched_process_runs_torchrun_and_ends_as_it_does(monkeypatch, capsys):
    """torchrun's agent runs in the process accelerate started (no second interpreter importing torch again): the
    script under it, its exit code; a signal or a failed rank ends it without torchrun's traceback."""
    import signal as signals

    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    monkeypatch.setattr(recipe_cli, "die_with_launcher", lambda: None)
    monkeypatch.setattr(recipe_cli, "_accelerate_cpu_layout", lambda: {
        "num_processes": 2, "num_machines": 1, "machine_rank": 0, "main_process_ip": None, "main_process_port": None})
    monkeypatch.setattr(sys, "argv", ["recipes/train.py", "--data", "d"])
    calls = []
    outcomes = iter([None, SignalException("got signal: 2", sigval=signals.SIGINT),
                     ChildFailedError("recipes/train.py", {0: ProcessFailure(0, pid=1, exitcode=2, error_file="")})])

    def torchrun(args):
        calls.append(args)
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(torch.distributed.run, "main", torchrun)
    for code in (0, 130, 1):
        with pytest.raises(SystemExit) as ended:
            recipe_cli.relaunch_multi_cpu()
        assert ended.value.code == code
    assert calls == [["--standalone", "--nproc_per_node", "2", "recipes/train.py", "--data", "d"]] * 3
    err = capsys.readouterr().err
    assert "recipes/train.py FAILED" in err and "Traceback" not in err


# ============================================================================= restarts: whose folder is it

def restart_env(monkeypatch, run_id, count=1):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(count))
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def claim(folder, resume=False, overwrite=False):
    args = argparse.Namespace(resume=resume, overwrite=overwrite)
    path, lock = recipe_cli.claim_output(str(folder), args, say=lambda m: None)
    lock.release()
    return path, args.resume


def write_result(folder, saved_state=True):
    (folder / "config.yaml").write_text("{}\n")
    if saved_state:
        (folder / "state").mkdir()
        (folder / "state" / "progress.json").write_text('{"epoch": 1}')


def test_a_restart_of_the_same_job_resumes_its_own_folder(tmp_path, monkeypatch):
    restart_env(monkeypatch, "job-a", count=0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "user.txt").write_text("an earlier run's")  # the first attempt took run-2
    first, resumed = claim(tmp_path / "run")
    assert first == tmp_path / "run-2" and not resumed
    assert json.loads((first / MARKER_NAME).read_text())["job"]["run_id"] == "job-a"
    write_result(first)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again, resumed = claim(tmp_path / "run")
    assert again == first and resumed
    assert not (tmp_path / "run-3").exists()


def test_a_restart_before_any_saved_state_starts_its_own_folder_again(tmp_path, monkeypatch):
    restart_env(monkeypatch, "job-a", count=0)
    first, _ = claim(tmp_path / "run")
    write_result(first, saved_state=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again, resumed = claim(tmp_path / "run")
    assert again == first and not resumed and not (first / "config.yaml").exists()


@pytest.mark.parametrize("other", ["another run id", "the same default id, another agent"])
def test_a_restart_of_another_job_never_resumes_its_folder(tmp_path, monkeypatch, other):
    restart_env(monkeypatch, "none" if "default" in other else "job-a", count=0)
    first, _ = claim(tmp_path / "run")
    write_result(first)
    if "default" in other:  # torchrun's default --rdzv-id "none": only the agent (this process's parent) tells
        marker = json.loads((first / MARKER_NAME).read_text())
        marker["job"]["agent_pid"] += 1
        (first / MARKER_NAME).write_text(json.dumps(marker))
    else:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again, resumed = claim(tmp_path / "run")
    assert again == tmp_path / "run-2" and not resumed
    assert (first / "config.yaml").is_file()


def test_outside_torchrun_nothing_is_resumed(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path, lock = claim_folder(tmp_path / "run")
    lock.release()
    write_result(path)
    again, resumed = claim(tmp_path / "run")
    assert again == tmp_path / "run-2" and not resumed


# ============================================================================= end to end (real processes)

@pytest.mark.slow
# a URL with 1 process a node; a folder with 2, not prepared yet: the job prepares it once, then trains (a prepared
# folder with 1 a node: the evaluation test below)
@pytest.mark.parametrize("served, per_node", [("http", 1), ("folder", 2)])
def test_two_nodes_on_loopback_train_into_one_run_folder(sample_shards, sample_zip, tmp_path, served, per_node):
    out = tmp_path / "run"
    with contextlib.ExitStack() as stack:
        if served == "http":
            data = [stack.enter_context(serve(sample_shards))]
        else:  # missing: the global main process prepares it from data.source while the others wait
            data = [str(tmp_path / "shards"), f"data.source={sample_zip}"]
        results = run_nodes(["recipes/train.py", "--data", *data, "--output", str(out), "train.epochs=1", *TINY],
                            processes=2 * per_node)
    for code, text in results:
        assert code == 0, text[-3000:]
    assert "machine 0 of 2" in results[0][1] and "machine 1 of 2" in results[1][1]
    rows = metrics(out)
    # 256 images, 32 per process, 2 or 4 processes (1 or 2 per node): 4 or 2 steps, logged once
    assert [r["epoch"] for r in rows] == [1] and rows[0]["step"] == 256 // (32 * 2 * per_node)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run"] if served == "http" else ["run", "shards"])
    assert (out / "best.safetensors").is_file()
    if served == "folder":
        assert (tmp_path / "shards" / "manifest.json").is_file()


@pytest.mark.slow
def test_a_worker_killed_under_torchrun_max_restarts_resumes_its_folder(sample_shards, tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TINYCNN_TRACEBACK", None)
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "1", "--nproc_per_node",
         "1", "recipes/train.py", "--data", str(sample_shards), "--output", str(out), "train.epochs=3", *TINY],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        progress, log = out / "state" / "progress.json", out / "metrics.jsonl"
        # epoch 1 saved and logged (the state is committed first, then the epoch's line)
        while not (progress.is_file() and log.is_file() and log.read_text().count("\n") >= 1):
            assert torchrun.poll() is None and time.time() < deadline, torchrun.communicate()[0][-3000:]
            time.sleep(0.05)
        workers = psutil.Process(torchrun.pid).children()
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGKILL)
        text = torchrun.communicate(timeout=240)[0]
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
    assert torchrun.returncode == 0, text[-3000:]
    assert "torchrun restart 1 of this job: resuming" in text, text[-3000:]
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((out / "state" / "progress.json").read_text())["epoch"] == 3


@pytest.mark.slow
def test_evaluation_on_two_nodes_equals_one_process(sample_shards, tmp_path, run_recipe):
    run = tmp_path / "run"
    trained = run_recipe("train", "--data", sample_shards, "--output", run, "train.epochs=1", *TINY)
    assert trained.returncode == 0, trained.stderr[-3000:]
    args = ["--checkpoint", str(run / "best.safetensors"), "--data", str(sample_shards), "--split", "val",
            "--num_workers", "0", "--batch_size", "64"]
    alone = run_recipe("evaluate", *args, "--json", tmp_path / "one.json")
    assert alone.returncode == 0, alone.stderr[-3000:]
    for code, text in run_nodes(["recipes/evaluate.py", *args, "--json", str(tmp_path / "two.json")]):
        assert code == 0, text[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert one["num_samples"] == two["num_samples"] == 500
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-9)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
