"""tinycnn.cache: shards read from a URL are kept on local disk, checked against the manifest. Measured against a
loopback HTTP server that counts what it serves: after the first read, epochs and loaders read no shard byte over
the network. The cache trusts nothing it finds: damaged copies are fetched again, planted symlinks are never
followed, concurrent fillers never see partial files, and the size bound evicts the least recently used shards."""
import contextlib
import functools
import hashlib
import http.server
import json
import multiprocessing
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg

import tinycnn.cache as cache
from tinycnn.cache import MARKER, ShardCache, cache_key
from tinycnn.data import build_loader
from tinycnn.storage import ShardError, check_manifest, locate, read_manifest
from tinycnn.tar import write_shard


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; counts GET requests and body bytes per path (the server's `gets` and `sent`)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.gets[self.path] += 1
        if self.server.delay:
            time.sleep(self.server.delay)
        super().do_GET()

    def copyfile(self, source, outputfile):
        data = source.read()
        with self.server.lock:
            self.server.sent[self.path] += len(data)
        outputfile.write(data)


@contextlib.contextmanager
def serve(folder, delay=0.0):
    """(server, base URL) of an HTTP server on a free loopback port serving `folder`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_CountingHandler, directory=str(folder)))
    server.lock, server.gets, server.sent, server.delay = threading.Lock(), Counter(), Counter(), delay
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def shard_traffic(server):
    """(GET requests, body bytes) the server answered for anything but the manifest."""
    with server.lock:
        return (sum(n for p, n in server.gets.items() if p != "/manifest.json"),
                sum(n for p, n in server.sent.items() if p != "/manifest.json"))


def jpeg(value):
    return encode_jpeg(torch.full((3, 64, 64), value, dtype=torch.uint8), quality=90).numpy().tobytes()


def write_dataset(root, num_shards=4, per_shard=24, num_classes=3):
    """A shards folder as tinycnn-prepare writes it: each entry with its `bytes` and `sha256`."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for j in range(num_shards):
        name = f"train-{j:05d}.tar"
        samples = [{"__key__": f"s{j}-{i}", "cls": str(i % num_classes), "jpg": jpeg(10 * j + i)}
                   for i in range(per_shard)]
        size = write_shard(root / name, samples)
        entries.append({"file": name, "num_samples": per_shard, "bytes": size,
                        "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()})
    manifest = {"num_classes": num_classes, "input_shape": [3, 64, 64],
                "splits": {"train": {"num_samples": num_shards * per_shard, "shards": entries}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def read_all(root, cache_dir, **kw):
    kw = {"batch_size": 8, "train": False, "num_workers": 0, **kw}
    loader = build_loader(root, "train", cache_dir=cache_dir, **kw)
    out = list(loader)
    loader.close()
    return out


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def cached_files(cache_dir, url):
    folder = Path(cache_dir) / cache_key(url)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def one_line(error) -> str:
    message = str(error)
    assert "\n" not in message and message.strip(), message
    return message


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "served")


# ----------------------------------------------------------------------------------------------
# Each shard crosses the network once


@pytest.mark.parametrize("num_workers", [0, 2])
def test_later_epochs_and_loaders_read_nothing_over_the_network(dataset, tmp_path, num_workers):
    expected = read_all(dataset, None, num_workers=num_workers)
    cache_dir = tmp_path / "cache"
    with serve(dataset) as (server, url):
        loader = build_loader(url, "train", batch_size=8, train=True, num_workers=num_workers, seed=1,
                              cache_dir=cache_dir)
        loader.set_epoch(0)
        assert len(list(loader)) == len(loader)
        first_requests, first_bytes = shard_traffic(server)
        # each shard once, by whichever process read it first
        assert first_requests == 4 and first_bytes == sum(p.stat().st_size for p in dataset.glob("*.tar"))
        for epoch in (1, 2):  # a new shard -> worker assignment: workers read what others cached
            loader.set_epoch(epoch)
            assert len(list(loader)) == len(loader)
        loader.close()
        # a second loader (another run on this node): the same batches as the folder, no shard byte served
        again = read_all(url, cache_dir, num_workers=num_workers)
        assert same_batches(again, expected)
        assert shard_traffic(server) == (first_requests, first_bytes)
        assert server.gets["/manifest.json"] >= 2  # the manifest is read each time, never cached
    names = cached_files(cache_dir, url)
    assert names == sorted([MARKER] + [p.name for p in dataset.glob("*.tar")])
    for name in names[1:]:
        assert (cache_dir / cache_key(url) / name).read_bytes() == (dataset / name).read_bytes()


def test_prepared_shards_second_epoch_reads_no_byte(sample_shards, tmp_path):
    cache_dir = tmp_path / "cache"
    with serve(sample_shards) as (server, url):
        loader = build_loader(url, "train", batch_size=64, train=True, num_workers=2, subset=1024,
                              cache_dir=cache_dir)
        first = list(loader)
        requests, sent = shard_traffic(server)
        assert requests >= 1 and sent > 0
        loader.set_epoch(1)
        assert len(list(loader)) == len(first)
        loader.close()
        assert shard_traffic(server) == (requests, sent)
        uncached = read_all(sample_shards, None, batch_size=64, subset=1024)
        assert same_batches(read_all(url, cache_dir, batch_size=64, subset=1024), uncached)
        assert shard_traffic(server) == (requests, sent)


def test_a_pipe_root_is_cached_by_its_command(dataset, tmp_path):
    log = tmp_path / "runs.log"
    root = f"pipe:echo run >> {log}; cat {dataset}/{{}}"
    expected = read_all(dataset, None)
    assert same_batches(read_all(root, tmp_path / "cache"), expected)
    runs = len(log.read_text().splitlines())
    assert runs == 1 + 4  # the manifest, then each shard once
    assert same_batches(read_all(root, tmp_path / "cache"), expected)
    assert len(log.read_text().splitlines()) == runs + 1  # only the manifest again


def test_without_cache_dir_nothing_is_written(dataset, tmp_path, monkeypatch):
    empty = {name: tmp_path / name for name in ("cwd", "home", "xdg", "tmp")}
    for folder in empty.values():
        folder.mkdir()
    monkeypatch.chdir(empty["cwd"])
    monkeypatch.setenv("HOME", str(empty["home"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty["xdg"]))
    monkeypatch.setattr("tempfile.tempdir", str(empty["tmp"]))
    with serve(dataset) as (server, url):
        for _ in range(2):
            assert same_batches(read_all(url, None, num_workers=1), read_all(dataset, None))
        assert shard_traffic(server)[0] == 2 * 4  # every read crosses the network
    # a folder root is local already: a cache_dir is not used for it
    read_all(dataset, tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
    assert all(not any(folder.iterdir()) for folder in empty.values())


# ----------------------------------------------------------------------------------------------
# Nothing in the cache is trusted


def fill(url, cache_dir):
    read_all(url, cache_dir)
    return Path(cache_dir) / cache_key(url)


@pytest.mark.parametrize("damage", ["shorter", "longer", "same size, other bytes"])
@pytest.mark.parametrize("new_process", [False, True])
def test_a_damaged_cached_shard_is_fetched_again(dataset, tmp_path, monkeypatch, damage, new_process):
    expected = read_all(dataset, None)
    with serve(dataset) as (server, url):
        folder = fill(url, tmp_path / "cache")
        victim = folder / "train-00002.tar"
        before = victim.stat()
        good = victim.read_bytes()
        with open(victim, "r+b") as f:
            if damage == "shorter":
                f.truncate(len(good) - 512)
            elif damage == "longer":
                f.seek(0, os.SEEK_END)
                f.write(b"\0" * 512)
            else:
                f.seek(700)
                f.write(bytes([good[700] ^ 0xFF]))
        if new_process:  # a fresh process has hashed nothing yet, whatever the file's times say
            os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
            monkeypatch.setattr(cache, "_VERIFIED", {})
        else:  # in this process, a change of mtime makes the hash checked again
            os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns + 10 ** 9))
        requests = shard_traffic(server)[0]
        assert same_batches(read_all(url, tmp_path / "cache"), expected)
        assert server.gets["/train-00002.tar"] == 2 and shard_traffic(server)[0] == requests + 1
        assert victim.read_bytes() == good


def test_a_planted_symlink_is_never_followed(dataset, tmp_path):
    expected = read_all(dataset, None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "copy.tar").write_bytes((dataset / "train-00000.tar").read_bytes())  # would be a "hit"
    (outside / "victim").write_bytes(b"not yours")
    cache_dir = tmp_path / "cache"
    with serve(dataset) as (server, url):
        folder = cache_dir / cache_key(url)
        folder.mkdir(parents=True)
        (folder / "train-00000.tar").symlink_to(outside / "copy.tar")   # read through?
        (folder / "train-00001.tar").symlink_to(outside / "victim")     # written through?
        (folder / "train-00002.tar").symlink_to(outside)                # a folder
        os.mkfifo(folder / "train-00003.tar")                           # would block a plain open
        assert same_batches(read_all(url, cache_dir), expected)
        assert all(server.gets[f"/train-{j:05d}.tar"] == 1 for j in range(4))  # all misses
    for j in range(4):
        shard = folder / f"train-{j:05d}.tar"
        assert not shard.is_symlink() and shard.is_file()
        assert shard.read_bytes() == (dataset / shard.name).read_bytes()
    assert (outside / "victim").read_bytes() == b"not yours"
    assert sorted(p.name for p in outside.iterdir()) == ["copy.tar", "victim"]


def test_a_planted_symlink_for_the_root_folder_is_replaced(dataset, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    with serve(dataset) as (server, url):
        (cache_dir / cache_key(url)).symlink_to(elsewhere, target_is_directory=True)
        read_all(url, cache_dir)
        folder = cache_dir / cache_key(url)
        assert not folder.is_symlink() and folder.is_dir() and len(cached_files(cache_dir, url)) == 5
    assert not any(elsewhere.iterdir())


def test_a_fetched_shard_that_does_not_match_its_manifest_is_an_error_and_not_cached(dataset, tmp_path):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["sha256"] = "0" * 64
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with serve(dataset) as (server, url):
        with pytest.raises(ShardError) as e:
            read_all(url, tmp_path / "cache")
        assert "train-00001.tar does not have the sha256 of its manifest entry" in one_line(e.value)
    assert "train-00001.tar" not in cached_files(tmp_path / "cache", url)


def test_manifest_sha256_must_be_hex():
    manifest = {"num_classes": 1, "splits": {"train": {"num_samples": 1, "shards": [
        {"file": "a.tar", "num_samples": 1, "sha256": "$(rm -rf ~)"}]}}}
    with pytest.raises(ValueError, match=r"splits\.train\.shards\[0\]\.sha256 is '\$\(rm -rf ~\)', not 64"):
        check_manifest(manifest)
    manifest["splits"]["train"]["shards"][0]["sha256"] = "ab" * 32
    assert check_manifest(manifest) is manifest


def test_an_unusable_cache_dir_is_one_line(dataset, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with serve(dataset) as (_, url):
        with pytest.raises(ValueError) as e:
            build_loader(url, "train", batch_size=8, train=False, num_workers=0, cache_dir=not_a_folder)
    assert "data.cache_dir" in one_line(e.value) and str(not_a_folder) in str(e.value)


# ----------------------------------------------------------------------------------------------
# Shared by the processes of a node, bounded in size


def _fill_in_another_process(url, cache_dir, start):
    start.wait(120)
    return len(read_all(url, cache_dir))


@pytest.mark.slow  # two fresh interpreters importing torch
def test_two_processes_filling_at_once_leave_complete_files_and_no_temporary_ones(dataset, tmp_path):
    cache_dir = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    # slow answers: both processes ask for each shard while the other's copy is still on its way
    with serve(dataset, delay=0.3) as (server, url), context.Pool(2) as pool, context.Manager() as manager:
        start = manager.Barrier(2)  # both processes start reading together, whenever their imports end
        results = [pool.apply_async(_fill_in_another_process, (url, str(cache_dir), start)) for _ in range(2)]
        assert [r.get(120) for r in results] == [len(read_all(dataset, None))] * 2
        assert max(server.gets[f"/train-{j:05d}.tar"] for j in range(4)) == 2  # filled at the same time
    folder = cache_dir / cache_key(url)
    assert cached_files(cache_dir, url) == sorted([MARKER] + [p.name for p in dataset.glob("*.tar")])
    for shard in dataset.glob("*.tar"):
        assert (folder / shard.name).read_bytes() == shard.read_bytes()


def test_the_size_bound_evicts_the_least_recently_used_shards(tmp_path):
    dataset = write_dataset(tmp_path / "served", num_shards=3)
    manifest = read_manifest(dataset)
    sizes = [s["bytes"] for s in manifest["splits"]["train"]["shards"]]
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "notes.txt").write_text("the user's own")  # never evicted: not the cache's
    foreign = cache_dir / ("f" * 64)
    foreign.mkdir()
    (foreign / "train-00000.tar").write_bytes(b"x" * 10 * max(sizes))  # no marker: not the cache's either
    with serve(dataset) as (server, url):
        entries = {locate(url, s["file"]): s for s in manifest["splits"]["train"]["shards"]}
        shard_cache = ShardCache(cache_dir, url, entries, max_bytes=sizes[0] + sizes[1] + sizes[2] // 2)
        shard_cache.check()
        a, b, c = (locate(url, f"train-{j:05d}.tar") for j in range(3))
        folder = cache_dir / cache_key(url)
        stale, fresh = folder / ".train-00009.tar.tmp-1-abc", folder / ".train-00008.tar.tmp-2-def"
        stale.write_bytes(b"left by a killed process")
        fresh.write_bytes(b"")  # being written right now
        os.utime(stale, (time.time() - 2 * cache.STALE_TEMP_SECONDS,) * 2)
        shard_cache.read(a, 0)
        shard_cache.read(b, 0)
        now = time.time()
        # access times after the mtimes: a filesystem's own relatime updates leave them, only the cache sets them
        os.utime(folder / "train-00000.tar", (now - 200, now - 300))  # a: the older...
        os.utime(folder / "train-00001.tar", (now - 100, now - 300))
        assert shard_cache.read(a, 0) == (dataset / "train-00000.tar").read_bytes()  # ...but just used
        assert os.stat(folder / "train-00000.tar").st_atime > now - 10
        shard_cache.read(c, 0)
        assert server.gets["/train-00000.tar"] == 1  # the second read was a hit
        assert cached_files(cache_dir, url) == sorted([MARKER, fresh.name, "train-00000.tar", "train-00002.tar"])
        assert (cache_dir / "notes.txt").read_text() == "the user's own"
        assert (foreign / "train-00000.tar").stat().st_size == 10 * max(sizes)
        # a shard larger than the bound is streamed, never cached
        tiny = ShardCache(tmp_path / "tiny", url, entries, max_bytes=sizes[0] // 2)
        assert tiny.read(a, 0) == (dataset / "train-00000.tar").read_bytes()
        assert cached_files(tmp_path / "tiny", url) == [MARKER]



@pytest.mark.slow
def test_training_with_data_cache_dir_reads_each_shard_over_the_network_once(sample_shards, tmp_path):
    """data.cache_dir reaches train()'s loaders: a second run on the node reads no shard byte over the network."""
    from tinycnn.config import load_config
    from tinycnn.cli import RESUMABLE_KEYS
    from tinycnn.train import train

    assert {"data.cache_dir", "data.cache_max_bytes"} <= set(RESUMABLE_KEYS)  # how data is read, not what
    cache_dir = tmp_path / "cache"
    with serve(sample_shards) as (server, url):
        cfg = load_config(None, [f"data.root={url}", f"data.cache_dir={cache_dir}", "data.num_workers=0",
                                 "stage_channels=[8,16,32]", "stage_repeats=[1,1,1]", "train.max_steps=2",
                                 "train.batch_size=32", "train.val_subset_size=64", "train.compile=false"])
        train(cfg, tmp_path / "run1", progress=False)
        first = shard_traffic(server)
        assert first[0] > 0 and len(cached_files(cache_dir, url)) > 1
        train(cfg, tmp_path / "run2", progress=False)
        assert shard_traffic(server) == first
