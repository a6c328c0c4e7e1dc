"""Decoding workers started by `spawn`, macOS's start method (Linux's is fork until Python 3.14): each worker gets a
pickled copy of the stream and imports tinycnn afresh, so anything that only fork carries over (a closure, a lambda,
state set in the parent after import) breaks there. A fresh interpreter whose start method is spawn, as on a Mac,
reads the shards and trains; both are checked against the same work done here (fork, or no workers)."""
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tinycnn.data import build_loader

REPO = Path(__file__).resolve().parents[1]

# the loader test's interpreter: every eval sample and two train epochs, as digests, on one JSON line
LOADER = """
import hashlib, json, multiprocessing, sys
multiprocessing.set_start_method(sys.argv[1])
from tinycnn.data import build_loader

def digests(batches):
    return [[hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16], int(y)] for xs, ys in batches for x, y in zip(xs, ys)]

root = sys.argv[2]
once = build_loader(root, "train", batch_size=5, train=False, num_workers=2)
once_batches = list(once)
train = build_loader(root, "train", batch_size=4, train=True, num_workers=1, seed=3)  # one: each costs an import
epochs = []
for epoch in (0, 1):
    train.set_epoch(epoch)  # the workers are persistent: they must see it through the shared value
    epochs.append(digests(train))
print(json.dumps({"start_method": multiprocessing.get_start_method(), "workers": [once.num_workers, train.num_workers],
                  "once": digests(once_batches), "epochs": epochs,
                  "batches": [len(once_batches), len(once), len(train)]}))
"""

# a recipe run in an interpreter whose start method is argv[1], the recipe's command line after it
RECIPE = """
import multiprocessing, runpy, sys
multiprocessing.set_start_method(sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def python(code, *args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def digests(batches):
    return [[hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16], int(y)] for xs, ys in batches for x, y in zip(xs, ys)]


def test_spawned_workers_deliver_every_sample_once_and_follow_set_epoch(tiny_shards):
    got = json.loads(python(LOADER, "spawn", tiny_shards).stdout.splitlines()[-1])
    assert got["start_method"] == "spawn" and got["workers"] == [2, 1]

    # exactly once: the same samples as one process reading alone, none twice, none missing
    alone = build_loader(tiny_shards, "train", batch_size=5, train=False, num_workers=0)
    expected = digests(alone)
    assert len(expected) == alone.num_samples == 36 and len(set(map(tuple, expected))) == 36
    assert Counter(map(tuple, got["once"])) == Counter(map(tuple, expected))
    assert got["batches"][0] == got["batches"][1]  # as many batches as len() announced

    # training: full epochs, reshuffled by set_epoch, batch for batch what a forked worker reads
    forked = build_loader(tiny_shards, "train", batch_size=4, train=True, num_workers=1, seed=3)
    try:
        reference = []
        for epoch in (0, 1):
            forked.set_epoch(epoch)
            reference.append(digests(forked))
    finally:
        forked.close()
    assert [len(e) for e in got["epochs"]] == [got["batches"][2] * 4] * 2 == [len(forked) * 4] * 2
    assert got["epochs"][0] != got["epochs"][1]
    assert got["epochs"] == reference


@pytest.mark.slow
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="compares with fork")
def test_a_short_training_under_spawn_equals_one_under_fork(tiny_shards, tmp_path):
    """The course's recipe on the tiny model, 3 steps with 2 decoding workers: spawn gives the same run as fork."""
    runs = {}
    for method in ("spawn", "fork"):
        out = tmp_path / method
        python(RECIPE, method, "recipes/train.py", "--data", tiny_shards, "--output", out, "--no-progress",
               "train.epochs=1", "train.max_steps=3", "train.batch_size=8", "train.device=cpu",
               "stage_channels=[8,16,32]", "stage_repeats=[1,1,1]", "data.num_workers=2")
        runs[method] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in runs["spawn"] + runs["fork"]:
        for key in ("images_per_sec", "epoch_seconds"):
            record.pop(key, None)
    assert runs["spawn"][-1]["step"] == 3 and "val/accuracy" in runs["spawn"][-1]
    assert runs["spawn"] == runs["fork"]


def test_a_loader_dropped_while_a_worker_is_busy_ends_its_workers(tiny_shards, monkeypatch):
    """Workers busy when their loader goes (a slow spawn start, a shard still downloading): torch's clean-up would
    only send the SIGTERM they ignore, and the program's exit would then wait for them forever."""
    import time

    from tinycnn.data import ShardStream

    read = ShardStream._read_part

    def slow_for_worker_1(self, part):
        if self.consumer()[0] == 1:
            time.sleep(120)
        return read(self, part)

    monkeypatch.setattr(ShardStream, "_read_part", slow_for_worker_1)  # forked workers inherit it
    loader = build_loader(tiny_shards, "train", batch_size=4, train=False, num_workers=2)
    batches = iter(loader)
    next(batches)  # worker 0's first batch; worker 1 is asleep in its first shard
    workers = list(loader._loader._iterator._workers)
    assert all(w.is_alive() for w in workers)
    del loader, batches
    assert not any(w.is_alive() for w in workers)
    # killed at once, the idle one too: not asked to finish a batch nobody will read (torch's clean-up would wait
    # 5 s for each, then 5 s more, on whatever thread the garbage collector happens to run)
    assert [w.exitcode for w in workers] == [-signal.SIGKILL] * 2
