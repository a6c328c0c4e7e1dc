"""tinycnn.storage: shards read from a URL (a loopback HTTP server on 127.0.0.1 serving prepared folders, pipe:,
fsspec) give the loader the same batches as the folder; failures are retried or one line."""
import contextlib
import functools
import gzip
import http.server
import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

import tinycnn.storage as storage
from tinycnn.data import ShardStream, build_loader, split_shards
from tinycnn.storage import ShardError, is_url, locate, read_manifest

from test_data import make_shards


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; the server's `fail` maps a path to how many more requests for it get a 503."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests[self.path] += 1
            fail = server.fail.get(self.path, server.fail.get("*", 0))
            if fail:
                server.fail[self.path] = fail - 1
        if fail:
            self.send_error(503, "busy")
        else:
            super().do_GET()


@contextlib.contextmanager
def serve(folder, fail=None):
    """(server, base URL) of an HTTP server on a free loopback port serving `folder`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    server.lock, server.requests, server.fail = threading.Lock(), Counter(), dict(fail or {})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_WAIT", 0.01)  # forked workers inherit it


def batches(root, split, **kw):
    loader = build_loader(root, split, **kw)
    out = [(x, y) for x, y in loader]
    loader.close()
    assert len(out) == len(loader)
    return out


def assert_same_over_http(folder, expected, split, **kw):
    """The batches of `folder`, read from disk and from a loopback HTTP server, equal `expected`."""
    with serve(folder) as (_, url):
        for root in (folder, url):
            got = batches(root, split, **kw)
            assert len(got) == len(expected)
            assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, expected))


def keyed_samples(root, split, rank, world_size, workers):
    """(key, label) of what each (rank, worker) consumer reads, over all of them."""
    manifest = read_manifest(root)
    shards = [(locate(root, s["file"]), s["num_samples"]) for s in manifest["splits"][split]["shards"]]
    stream = ShardStream(shards, batch_size=1, train=False, rank=rank, world_size=world_size)
    out = Counter()
    for w in range(workers):
        parts = split_shards(shards, rank * workers + w, world_size * workers)
        out.update((key, label) for _, key, _, label in stream.samples(parts))
    return out


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_url_reads_the_same_samples_as_the_folder(sample_shards, world_size, num_workers):
    with serve(sample_shards) as (server, url):
        assert read_manifest(url) == read_manifest(sample_shards)
        keyed = {"url": Counter(), "disk": Counter()}
        for rank in range(world_size):
            kw = dict(batch_size=64, train=False, num_workers=num_workers, rank=rank, world_size=world_size)
            remote, local = batches(url + "/", "val", **kw), batches(sample_shards, "val", **kw)
            assert len(remote) == len(local)
            for (rx, ry), (lx, ly) in zip(remote, local):  # eval order: the very same batches
                assert torch.equal(rx, lx) and torch.equal(ry, ly)
            for name, root in (("url", url), ("disk", sample_shards)):
                keyed[name] += keyed_samples(root, "val", rank, world_size, max(1, num_workers))
        assert keyed["url"] == keyed["disk"] and sum(keyed["url"].values()) == 500
        assert len({key for key, _ in keyed["url"]}) == 500  # every sample once
        assert server.requests["/manifest.json"] >= 1


def test_url_train_batches_equal_the_folder_on_two_ranks(sample_shards):
    with serve(sample_shards) as (server, url):
        for rank in range(2):
            kw = dict(batch_size=64, train=True, num_workers=1, rank=rank, world_size=2, seed=3, subset=1024)
            remote, local = batches(url, "train", **kw), batches(sample_shards, "train", **kw)
            assert len(remote) == len(local) == 1024 // 128
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(remote, local))
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(remote, local))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_transient_503s_are_retried(tmp_path, fast_retries, num_workers):
    root = make_shards(tmp_path / "s", num_samples=30, num_shards=3)
    expected = torch.cat([y for _, y in batches(root, "train", batch_size=4, train=False, num_workers=0)])
    # the manifest and one shard each fail twice before they are served
    with serve(root, fail={"/manifest.json": 2, "/train-00001.tar": 2}) as (server, url):
        got = torch.cat([y for _, y in batches(url, "train", batch_size=4, train=False, num_workers=num_workers)])
        assert torch.equal(got, expected)
        assert server.requests["/manifest.json"] == 3 and server.requests["/train-00001.tar"] == 3


@pytest.mark.parametrize("num_workers", [0, 1])
def test_missing_shard_is_one_line_naming_the_url_without_retries(tmp_path, fast_retries, num_workers):
    root = make_shards(tmp_path / "s", num_samples=30, num_shards=3)
    (root / "train-00002.tar").unlink()
    with serve(root) as (server, url):
        loader = build_loader(url, "train", batch_size=4, train=False, num_workers=num_workers)
        with pytest.raises(ShardError) as caught:
            list(loader)
        msg = str(caught.value)
        assert f"{url}/train-00002.tar" in msg and "404" in msg and "\n" not in msg
        assert server.requests["/train-00002.tar"] == 1  # a 404 is not retried
        loader.close()


def test_shard_that_keeps_failing_names_the_url_and_the_tries(tmp_path, fast_retries):
    root = make_shards(tmp_path / "s", num_samples=30, num_shards=3)
    with serve(root, fail={"/train-00000.tar": 100}) as (server, url):
        with pytest.raises(ShardError, match=rf"cannot read shard {url}/train-00000\.tar: HTTP 503 .*after 3 tries"):
            list(build_loader(url, "train", batch_size=4, train=False, num_workers=0, retries=2))
        assert server.requests["/train-00000.tar"] == 3


def test_unreachable_or_wrong_url_fails_with_one_line(tmp_path, fast_retries):
    root = make_shards(tmp_path / "s", num_samples=30, num_shards=3)
    with serve(root) as (_, url):
        with pytest.raises(FileNotFoundError, match=rf"no manifest at {url}/nowhere/manifest\.json \(HTTP 404"):
            read_manifest(url + "/nowhere")
        (root / "junk").mkdir()
        (root / "junk" / "manifest.json").write_text("<html>not json</html>")
        with pytest.raises(ValueError, match="not a tinycnn manifest"):
            read_manifest(url + "/junk")
    # the server is gone: connection refused, retried, then one line
    with pytest.raises(ShardError, match=rf"cannot read {url}/manifest\.json: .*refused.*after 2 tries"):
        read_manifest(url, retries=1)
    with pytest.raises(FileNotFoundError, match="URL made into a Path"):
        read_manifest(Path(url))


def test_failing_pipe_command_reports_its_stderr(tmp_path, fast_retries):
    flaky = tmp_path / "flaky.sh"  # fails twice, then serves the file
    flaky.write_text('n=$(cat "$0.count" 2>/dev/null || echo 0); echo $((n + 1)) > "$0.count"\n'
                     'if [ "$n" -lt 2 ]; then echo "try $n: busy" >&2; exit 1; fi; cat "$1"\n')
    root = make_shards(tmp_path / "s", num_samples=30, num_shards=3)
    assert read_manifest(f"pipe:sh {flaky} {root}/{{}}") == read_manifest(root)
    assert (tmp_path / "flaky.sh.count").read_text().strip() == "3"
    with pytest.raises(ShardError, match=r"`sh -c 'exit 3'/manifest\.json` exited with status \d+: .*after 2 tries"):
        read_manifest("pipe:sh -c 'exit 3'", retries=1)
    # a command that does not exist is not retried
    with pytest.raises(ShardError, match=r"exited with status 127: .*not found$"):
        read_manifest("pipe:no-such-command-here {}")


def test_gzip_shards_read_the_same_locally_and_over_http(tmp_path):
    plain = make_shards(tmp_path / "plain", num_samples=30, num_shards=3)
    packed = tmp_path / "gz"
    packed.mkdir()
    manifest = json.loads((plain / "manifest.json").read_text())
    for s in manifest["splits"]["train"]["shards"]:
        (packed / (s["file"] + ".gz")).write_bytes(gzip.compress((plain / s["file"]).read_bytes()))
        s["file"] += ".gz"
    (packed / "manifest.json").write_text(json.dumps(manifest))
    kw = dict(batch_size=4, train=False, num_workers=0)
    assert_same_over_http(packed, batches(plain, "train", **kw), "train", **kw)


def test_pipe_and_fsspec_roots(tmp_path):
    root = make_shards(tmp_path / "s", num_samples=30, num_shards=3)
    kw = dict(batch_size=4, train=False, num_workers=0)
    expected = torch.cat([y for _, y in batches(root, "train", **kw)])
    for url in (f"pipe:cat {root}/{{}}", f"file://{root}"):  # a command with the file name in it; fsspec
        assert torch.equal(torch.cat([y for _, y in batches(url, "train", **kw)]), expected), url
    shutil.copy(root / "train-00000.tar", root / "copy.tar")
    (root / "train-00000.tar").unlink()
    with pytest.raises(ShardError, match=r"shard file://.*/train-00000\.tar is missing"):
        list(build_loader(f"file://{root}", "train", **kw))


def test_prepare_compress_shards_read_the_same_over_http(sample_zip, sample_shards, tmp_path):
    from tinycnn.prepare import prepare

    packed = tmp_path / "gz"
    manifest = prepare(sample_zip, packed, compress=True, progress=False)
    assert all(s["file"].endswith(".tar.gz") for s in manifest["splits"]["val"]["shards"])
    kw = dict(batch_size=64, train=False, num_workers=1)
    assert_same_over_http(packed, batches(sample_shards, "val", **kw), "val", **kw)


@pytest.mark.slow
def test_training_and_evaluation_from_a_url(sample_shards, tmp_path):
    """train() and evaluate_checkpoint() given the URL instead of the folder (the loader tests above show the
    batches are the same): a run trains, and its evaluation from the URL equals the one from the folder."""
    from tinycnn.config import load_config
    from tinycnn.evaluation import evaluate_checkpoint
    from tinycnn.train import train

    small = ["stage_channels=[8,16,32]", "stage_repeats=[1,1,1]", "data.num_workers=1", "train.batch_size=64",
             "train.max_steps=4", "train.val_subset_size=128", "train.device=cpu"]
    with serve(sample_shards) as (server, url):
        summary = train(load_config(None, [f"data.root={url}", *small]), tmp_path / "run", progress=False)
        weights = tmp_path / "run" / "last.safetensors"
        remote = evaluate_checkpoint(weights, url, "test", num_workers=1)
        assert any(path.startswith("/train-") for path in server.requests) and server.requests["/test-00000.tar"] == 1
    local = evaluate_checkpoint(weights, sample_shards, "test", num_workers=1)
    assert summary["steps"] == 4 and remote["num_samples"] == local["num_samples"] == 500
    assert (remote["accuracy"], remote["loss"], remote["top5"]) == (local["accuracy"], local["loss"], local["top5"])


def test_is_url():
    for url in ("http://host/shards", "https://host/a/b/", "s3://bucket/shards", "gs://b/x", "file:///tmp/x",
                "pipe:curl -s https://host/shards/{}"):
        assert is_url(url), url
    for path in ("shards/tiny-imagenet", "/abs/path", "C:\\shards", "c:/shards", "./http:x"):
        assert not is_url(path), path
