"""A stop signal to the whole process group (SLURM, `timeout`, Ctrl-C in a terminal) reaches the decoding
workers too: they ignore it and only the main process decides, so a loop over a loader with workers stops
cleanly, and no worker outlives it. Real processes: the process group and the signals are what is under test."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_data import make_shards

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc: Linux")

# Loops over an endless train loader with 2 workers; prints the workers' pids, then a line per batch.
# MODE term: a SIGTERM handler sets a flag, the loop stops and closes the loader ("clean stop", exit 0).
# MODE int: no handler: Ctrl-C is a KeyboardInterrupt in the main process ("interrupted", exit 3).
# MODE orphan: like term; the test kills this process alone.
LOOP = textwrap.dedent("""
    import signal, sys, time
    sys.path.insert(0, {repo!r})
    from tinycnn.data import build_loader

    mode = sys.argv[1]
    stop = []
    if mode != "int":
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    loader = build_loader({root!r}, "train", batch_size=8, train=True, num_workers=2, shuffle_buffer=16)
    try:
        epoch = 0
        while not stop:
            loader.set_epoch(epoch)
            for batch in loader:
                if loader._loader._iterator is not None and epoch == 0:
                    print("workers", *[w.pid for w in loader._loader._iterator._workers], flush=True)
                    epoch = -1  # printed once
                print("batch", flush=True)
                time.sleep(0.02)
                if stop:
                    break
            epoch = max(epoch, 0) + 1
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(3)
    loader.close()
    print("clean stop", flush=True)
""")


def gone(pid: int) -> bool:
    """True when `pid` has exited (no such process, or a zombie waiting for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def all_gone(pids, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(gone(p) for p in pids)


def start_loop(tmp_path, mode):
    """(process, worker pids) of LOOP in a session (process group) of its own, once it has served 3 batches."""
    root = make_shards(tmp_path / "shards", num_samples=96, num_shards=4)
    script = tmp_path / "loop.py"
    script.write_text(LOOP.format(repo=str(REPO), root=str(root)))
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    workers, batches = [], 0
    try:
        while batches < 3:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the loop ended early: {proc.wait(10)=} {proc.stderr.read()[-2000:]}")
            if line.startswith("workers"):
                workers = [int(p) for p in line.split()[1:]]
            elif line.startswith("batch"):
                batches += 1
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert len(workers) == 2 and all(not gone(p) for p in workers)
    return proc, workers


def finish(proc, timeout=30):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running {timeout} s after the signal: {err[-2000:]}")
    return out, err


def test_sigterm_to_the_group_stops_the_loop_cleanly(tmp_path):
    """Before the workers ignored it: "DataLoader worker (pid ...) is killed by signal: Terminated"."""
    proc, workers = start_loop(tmp_path, "term")
    os.killpg(proc.pid, signal.SIGTERM)  # what SLURM and `timeout` do: every process of the group
    out, err = finish(proc)
    assert proc.returncode == 0, err[-2000:]
    assert "clean stop" in out
    assert "killed by signal" not in err
    assert all_gone(workers), [p for p in workers if not gone(p)]


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_ctrl_c_to_the_group_interrupts_the_main_process(tmp_path):
    proc, workers = start_loop(tmp_path, "int")
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
    out, err = finish(proc)
    assert proc.returncode == 3 and "interrupted" in out, err[-2000:]
    assert all_gone(workers), [p for p in workers if not gone(p)]


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_workers_die_with_their_process(tmp_path):
    proc, workers = start_loop(tmp_path, "orphan")
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up at all: only the workers' own watch can end them
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert all_gone(workers, within=10), [p for p in workers if not gone(p)]


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_a_script_that_never_closes_its_loader_still_exits(tmp_path):
    """multiprocessing's exit handler SIGTERMs daemon workers and waits for them: workers that ignore SIGTERM
    would make it wait forever, unless the loaders are closed first."""
    root = make_shards(tmp_path / "shards", num_samples=96, num_shards=4)
    script = tmp_path / "no_close.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tinycnn.data import build_loader
        loader = build_loader({str(root)!r}, "train", batch_size=8, train=True, num_workers=2)
        next(iter(loader))
        print("workers", *[w.pid for w in loader._loader._iterator._workers], flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert all_gone([int(p) for p in out.split()[1:]])
