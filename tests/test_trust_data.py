"""The data path's trust boundary: manifests, shard names, shard bytes and URLs are untrusted. Crafted inputs only:
names that are paths or shell words are refused before anything is opened or run, hostile tars and gzip bombs end
in one error quickly and in bounded memory, slow or oversized HTTP bodies are cut, forged JPEG headers are refused
before decoding, and a bad manifest is one line naming the field and where it came from."""
import contextlib
import functools
import http.server
import json
import os
import threading
import time
import tracemalloc
import zlib

import pytest
import torch
from torchvision.io import encode_jpeg

import tinycnn.data as data
import tinycnn.storage as storage
from tinycnn.data import build_loader, jpeg_frame
from tinycnn.storage import ShardError, check_manifest, locate, read_manifest, read_shard
from tinycnn.tar import iter_samples, tar_bytes, write_shard

BAD_NAMES = ["../x.tar", "/etc/passwd", "$(touch PWNED).tar", "a;b.tar", "a/b.tar", "..", "a..b.tar", "-rf.tar",
             "x.tar\n", "", "C:\\x.tar"]


def jpeg(value=128):
    return encode_jpeg(torch.full((3, 64, 64), value, dtype=torch.uint8), quality=90).numpy().tobytes()


def samples(n, jpgs=None, labels=None):
    return [{"__key__": f"s{i}", "cls": str(labels[i] if labels else i % 3), "jpg": jpgs[i] if jpgs else jpeg()}
            for i in range(n)]


def write_folder(root, shards, num_classes=3, **extra):
    """A shards folder: `shards` maps a file name to its samples (written) or to its bytes (written as they are)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, content in shards.items():
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
            entries.append({"file": name, "num_samples": 1})
        else:
            write_shard(root / name, content)
            entries.append({"file": name, "num_samples": len(content)})
    manifest = {"num_classes": num_classes, "input_shape": [3, 64, 64],
                "splits": {"train": {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries}}}
    manifest.update(extra)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def manifest_naming(root, file):
    """A folder whose manifest lists one shard called `file` (no such file is written)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(
        {"num_classes": 3, "splits": {"train": {"num_samples": 1, "shards": [{"file": file, "num_samples": 1}]}}}))
    return root


def one_line(error) -> str:
    message = str(error)
    assert "\n" not in message and message.strip(), message
    return message


def ends_within(seconds, fn, *args, **kwargs):
    """(the exception `fn` raises, seconds it took), failing the test if it returns or has not ended within
    `seconds` (a hang in the code under test leaves a daemon thread behind rather than a stuck test run)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    assert "error" in outcome, f"no error, returned {outcome.get('value')!r}"
    return outcome["error"], time.monotonic() - start


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler, **attributes):
    """Base URL of a loopback HTTP server (127.0.0.1, a free port) with `handler`; `attributes` set on the server;
    server.stop is set before it closes, for handlers that would otherwise keep writing."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.stop = threading.Event()
    for name, value in attributes.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()


def serving_folder(folder):
    return serving(functools.partial(_Quiet, directory=str(folder)))


# --- names are data ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BAD_NAMES)
def test_shard_names_that_are_not_plain_names_are_refused_in_a_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    root = manifest_naming(tmp_path / "s", name)
    with pytest.raises(ValueError) as caught:
        build_loader(root, "train", batch_size=1, train=False, num_workers=0)
    message = one_line(caught.value)
    assert str(root / "manifest.json") in message and "splits.train.shards[0].file" in message
    assert not (tmp_path / "PWNED").exists() and not list(tmp_path.glob("PWNED*"))


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "$(touch PWNED).tar", "a;b.tar"])
def test_shard_names_that_are_not_plain_names_are_refused_over_http(tmp_path, name):
    root = manifest_naming(tmp_path / "s", name)
    with serving_folder(root) as url:
        with pytest.raises(ValueError) as caught:
            build_loader(url, "train", batch_size=1, train=False, num_workers=0)
    message = one_line(caught.value)
    assert f"{url}/manifest.json" in message and "splits.train.shards[0].file" in message


@pytest.mark.parametrize("name", ["$(touch PWNED).tar", "a;touch PWNED;b.tar", "`touch PWNED`", "x.tar|touch PWNED"])
def test_no_command_runs_from_a_name_under_a_pipe_root(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    root = manifest_naming(tmp_path / "s", name)
    pipe = f"pipe:cat {root}/{{}}"
    assert locate(pipe, "manifest.json") == f"pipe:cat {root}/manifest.json"
    with pytest.raises(ValueError, match=r"splits\.train\.shards\[0\]\.file"):
        build_loader(pipe, "train", batch_size=1, train=False, num_workers=0)
    with pytest.raises(ValueError, match="not a plain file name"):
        locate(pipe, name)
    assert not (tmp_path / "PWNED").exists() and not (root / "PWNED").exists()


@pytest.mark.parametrize("root", ["shards", "http://host/shards/", "https://host/{}?sig=x", "pipe:cat shards/{}",
                                  "s3://bucket/shards"])
def test_locate_takes_plain_names_only(root):
    assert "/train-00000.tar" in locate(root, "train-00000.tar") or root.startswith("pipe:cat")
    for name in BAD_NAMES + [None, 3, "%2e%2e", "a b.tar", "a?b.tar", "a#b.tar", "x" * 202]:
        with pytest.raises(ValueError, match="not a plain file name"):
            locate(root, name)


def test_split_names_are_plain_names_too(tmp_path):
    manifest = {"num_classes": 3, "splits": {"../train": {"num_samples": 0, "shards": []}}}
    with pytest.raises(ValueError, match=r"m\.json is not a valid tinycnn manifest: split name '\.\./train'"):
        check_manifest(manifest, "m.json")


# --- the manifest --------------------------------------------------------------------------------------------------

def _manifest(**changes):
    good = {"num_classes": 3, "input_shape": [3, 64, 64], "classes": [{"wnid": f"n{i}", "name": "x"} for i in range(3)],
            "splits": {"train": {"num_samples": 2, "class_counts": [1, 1, 0],
                                 "shards": [{"file": "train-00000.tar", "num_samples": 2, "bytes": 10}]}}}
    for path, value in changes.items():
        *outer, last = path.split("__")
        node = good
        for key in outer:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is KeyError:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return good


@pytest.mark.parametrize("content, field", [
    (b"<html>not json</html>", "not JSON"),
    (b"[" * 100_000, "not JSON"),  # nested beyond the parser's recursion limit
    (b"\xff\xfe\x00garbage", "not JSON"),
    (b"[1, 2]", "the whole file is [1, 2], not a mapping"),
    (b'"text"', "not a mapping"),
    (json.dumps(_manifest(splits__train__num_samples=-1)).encode(), "splits.train.num_samples is -1"),
    (json.dumps(_manifest(splits__train__shards__0__num_samples=-5)).encode(), "splits.train.shards[0].num_samples"),
    (json.dumps(_manifest(splits__train__shards__0__num_samples=True)).encode(), "splits.train.shards[0].num_samples"),
    (json.dumps(_manifest(splits__train__shards__0__bytes=-1)).encode(), "splits.train.shards[0].bytes"),
    (json.dumps(_manifest(splits__train__shards__0__file=7)).encode(), "splits.train.shards[0].file"),
    (json.dumps(_manifest(splits__train__shards=KeyError)).encode(), "splits.train.shards is missing"),
    (json.dumps(_manifest(splits__train__shards={"a": 1})).encode(), "splits.train.shards is {'a': 1}, not a list"),
    (json.dumps(_manifest(splits__train__class_counts=[1, 1])).encode(), "class_counts has 2 entries"),
    (json.dumps(_manifest(splits=KeyError)).encode(), "splits is missing"),
    (json.dumps(_manifest(splits=[1])).encode(), "splits is [1], not a mapping"),
    (json.dumps(_manifest(num_classes=0)).encode(), "num_classes is 0"),
    (json.dumps(_manifest(num_classes="3")).encode(), "num_classes is '3'"),
    (json.dumps(_manifest(num_classes=10 ** 9)).encode(), "num_classes is 1000000000"),
    (json.dumps(_manifest(classes=[{"wnid": "n0"}])).encode(), "classes lists 1 classes"),
    (json.dumps(_manifest(classes__1__wnid="a\nb")).encode(), "classes[1].wnid"),
    (json.dumps(_manifest(input_shape=[3, 60000, 60000])).encode(), "input_shape[1] (height) is 60000"),
    (json.dumps(_manifest(input_shape=[4, 64, 64])).encode(), "input_shape is [4, 64, 64]"),
    (json.dumps(_manifest(input_shape="3x64x64")).encode(), "input_shape"),
])
def test_a_bad_manifest_is_one_line_naming_the_field(tmp_path, content, field):
    root = tmp_path / "s"
    root.mkdir()
    (root / "manifest.json").write_bytes(content)
    with pytest.raises(ValueError) as caught:
        read_manifest(root)
    message = one_line(caught.value)
    assert message.startswith(str(root / "manifest.json")) and field in message, message
    assert len(message) < 400


def test_a_good_manifest_passes_as_it_is():
    manifest = _manifest()
    assert check_manifest(manifest) is manifest
    check_manifest({"num_classes": 7, "splits": {}})  # classes, input_shape, class_counts: optional


def test_a_100_mb_manifest_is_refused_without_reading_it(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    with open(root / "manifest.json", "wb") as f:
        f.truncate(100 << 20)  # sparse: 100 MB long, nothing on disk
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"manifest\.json is larger than 64 MiB: not a tinycnn manifest"):
            read_manifest(root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


class _HugeBody(http.server.BaseHTTPRequestHandler):
    """Streams server.size bytes of JSON whitespace, with or without a Content-Length."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        if self.server.declare:
            self.send_header("Content-Length", str(self.server.size))
        self.end_headers()
        chunk, left = b" " * 65536, self.server.size
        with contextlib.suppress(OSError):
            while left > 0 and not self.server.stop.is_set():
                self.wfile.write(chunk[:left])
                left -= len(chunk)


def test_a_manifest_url_with_a_100_mb_body_is_refused(monkeypatch):
    with serving(_HugeBody, size=100 << 20, declare=True) as url:  # refused from its Content-Length
        with pytest.raises(ValueError, match=r"manifest\.json is larger than 64 MiB"):
            read_manifest(url)
    monkeypatch.setattr(storage, "MAX_MANIFEST_BYTES", 1 << 20)
    with serving(_HugeBody, size=3 << 20, declare=False) as url:  # no length given: cut while reading
        with pytest.raises(ValueError, match=r"manifest\.json is larger than 1 MiB"):
            read_manifest(url)


# --- hostile tars --------------------------------------------------------------------------------------------------

def raw_header(name=b"a.jpg", size=b"00000000001", kind=b"0"):
    """A ustar header with any size field and kind, and a correct checksum (so only the crafted field is wrong)."""
    head = (name.ljust(100, b"\0") + b"0000444\0" + b"0000000\0" * 2 + size.ljust(12, b"\0")[:12] + b"00000000000\0"
            + b" " * 8 + kind + b"\0" * 100 + b"ustar\x0000").ljust(512, b"\0")
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


def member(name, content, kind=b"0"):
    return raw_header(name, b"%011o" % len(content), kind) + content + b"\0" * (-len(content) % 512)


def pax(records: bytes):
    return member(b"././@PaxHeader", records, b"x")


def record(text: bytes) -> bytes:
    """A well-formed pax record '<len> key=value\\n' (its length counts its own digits)."""
    length = len(text) + 2
    while len(b"%d %s\n" % (length, text)) != length:
        length += 1
    return b"%d %s\n" % (length, text)


GOOD = member(b"k.cls", b"1") + member(b"k.jpg", b"x")
END = b"\0" * 1024


@pytest.mark.parametrize("tar", [
    pytest.param(GOOD + raw_header(size=b"-1000") + b"\0" * 4096 + END, id="negative size (moves back a block)"),
    pytest.param(GOOD + raw_header(size=b"-1") + b"\0" * 4096 + END, id="negative size -1"),
    pytest.param(GOOD + raw_header(size=b"\x80" + b"\0" * 7 + b"\x01\0\0\0") + END, id="base-256 size"),
    pytest.param(GOOD + raw_header(size=b"0x10") + END, id="hex size"),
    pytest.param(GOOD + pax(b"0 path=x.jpg\n") + member(b"b.jpg", b"y") + END, id="pax record of length 0"),
    pytest.param(GOOD + pax(b"3 x\n") + member(b"b.jpg", b"y") + END, id="pax record shorter than its text"),
    pytest.param(GOOD + pax(b"-9 path=x.jpg\n") + member(b"b.jpg", b"y") + END, id="pax record of negative length"),
    pytest.param(GOOD + pax(b"99 path=x.jpg\n") + member(b"b.jpg", b"y") + END, id="pax record past its header"),
    pytest.param(GOOD + pax(b"garbage") + member(b"b.jpg", b"y") + END, id="pax garbage"),
    pytest.param(GOOD + pax(record(b"size=-512")) + member(b"b.jpg", b"y") + END, id="pax negative size"),
    pytest.param(GOOD + pax(record(b"path=../../etc/x.jpg")) + member(b"b.jpg", b"y") + END, id="pax path with .."),
    pytest.param(GOOD + pax(record(b"path=/etc/x.jpg")) + member(b"b.jpg", b"y") + END, id="pax absolute path"),
    pytest.param(GOOD + member(b"././@LongLink", b"../x.jpg\0", b"L") + member(b"b.jpg", b"y") + END,
                 id="GNU long name with .."),
    pytest.param(GOOD + member(b"a\nb.jpg", b"y") + END, id="name with a newline"),
    pytest.param(GOOD + member(b"s.jpg", b"sparse", b"S") + END, id="GNU sparse member"),
    pytest.param(GOOD + pax(record(b"GNU.sparse.realsize=99999")) + member(b"b.jpg", b"y") + END,
                 id="pax sparse member"),
])
def test_a_hostile_tar_is_an_error_within_seconds(tar):
    got = []
    error, elapsed = ends_within(10, lambda: got.extend(iter_samples(tar, name="evil.tar")))
    assert isinstance(error, (ValueError, EOFError, OSError)) or type(error).__name__ == "ReadError", repr(error)
    one_line(error)
    assert elapsed < 10


def test_a_negative_size_in_a_shard_fails_the_loader_in_one_line(tmp_path):
    root = write_folder(tmp_path / "s", {"train-00000.tar": tar_bytes(samples(2))[:-1024]
                                         + raw_header(size=b"-1000") + END})
    error, _ = ends_within(10, lambda: list(build_loader(root, "train", batch_size=2, train=False, num_workers=0)))
    assert isinstance(error, ShardError) and "bad size field" in one_line(error)


def test_header_sum_is_the_exact_sum_of_the_bytes():
    import random

    from tinycnn.tar import _header_sum

    rng = random.Random(0)
    headers = [bytes(512), b"\xff" * 512, raw_header()] + [rng.randbytes(512) for _ in range(200)]
    assert all(_header_sum(h) == sum(h) for h in headers)


def test_links_and_folders_are_skipped_not_followed():
    tar = (member(b"dir", b"", b"5") + member(b"a.cls", b"1") + raw_header(b"a.jpg", b"00000001000", b"2")
           + member(b"b.cls", b"2") + member(b"b.jpg", b"y") + END)  # a symlink's size field does not count
    assert list(iter_samples(tar)) == [{"__key__": "a", "cls": b"1"}, {"__key__": "b", "cls": b"2", "jpg": b"y"}]


# --- gzip bombs ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gzip_bomb():
    """200 MB of zeros, gzip-compressed (under 1 MB at level 1, the fastest to build)."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(z.compress(zeros) for _ in range(200)) + z.flush()


def _peak_while(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_gzip_bomb_is_refused_without_allocating_it(gzip_bomb):
    assert len(gzip_bomb) < 1 << 20  # 200x smaller than what it decompresses to

    def read():
        with pytest.raises(Exception, match=r"bomb\.tar\.gz: decompresses to more than 3145728 bytes"):
            list(iter_samples(gzip_bomb, name="bomb.tar.gz", max_tar_bytes=3 << 20))
    assert _peak_while(read) < 30 << 20


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_gzip_bomb_shard_is_one_line_in_bounded_memory(tmp_path, gzip_bomb, skip_bad):
    root = write_folder(tmp_path / "s", {"train-00000.tar.gz": gzip_bomb})  # the manifest: 1 sample
    loader = build_loader(root, "train", batch_size=1, train=False, num_workers=0, skip_bad=skip_bad)

    def run():
        if skip_bad:
            with pytest.warns(UserWarning, match="decompresses to more than"):
                assert list(loader) == []
            assert loader.skipped == 1
        else:
            with pytest.raises(ShardError) as caught:
                list(loader)
            assert "decompresses to more than" in one_line(caught.value) and "skip_bad" in str(caught.value)
    assert _peak_while(run) < 100 << 20


def test_an_empty_split_is_an_empty_loader(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    empty = {"num_classes": 3, "splits": {"train": {"num_samples": 0, "shards": []}}}
    (root / "manifest.json").write_text(json.dumps(empty))
    loader = build_loader(root, "train", batch_size=2, train=False, num_workers=0)
    assert len(loader) == 0 and list(loader) == []
    with pytest.raises(ValueError, match="no full batch"):
        build_loader(root, "train", batch_size=2, train=True, num_workers=0)


def test_the_manifest_tar_bytes_tighten_the_gzip_limit(tmp_path):
    data = zlib.compressobj(6, zlib.DEFLATED, 31)
    tar = tar_bytes(samples(2))
    packed = data.compress(tar) + data.flush()
    root = write_folder(tmp_path / "s", {"train-00000.tar.gz": packed})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0].update(num_samples=2, tar_bytes=len(tar))
    manifest["splits"]["train"]["num_samples"] = 2
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert sum(len(y) for _, y in build_loader(root, "train", batch_size=2, train=False, num_workers=0)) == 2
    manifest["splits"]["train"]["shards"][0]["tar_bytes"] = len(tar) - 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"decompresses to more than {len(tar) - 1} bytes"):
        list(build_loader(root, "train", batch_size=2, train=False, num_workers=0))


# --- shard files and URL bodies ------------------------------------------------------------------------------------

def test_a_shard_larger_than_its_manifest_entry_is_refused_from_a_folder_and_a_url(tmp_path):
    root = write_folder(tmp_path / "s", {"train-00000.tar": samples(3)})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["bytes"] = 1000
    (root / "manifest.json").write_text(json.dumps(manifest))
    with serving_folder(root) as url:
        for where in (root, url):
            with pytest.raises(ShardError, match=r"train-00000\.tar is larger than 1000 bytes, more than its manifest"):
                list(build_loader(where, "train", batch_size=3, train=False, num_workers=0))


def test_an_http_body_over_the_cap_is_cut_when_no_length_is_given():
    with serving(_HugeBody, size=50 << 20, declare=False) as url:
        error, elapsed = ends_within(10, read_shard, url + "/x.tar", retries=0, max_bytes=1 << 20)
    assert isinstance(error, ShardError) and "is larger than 1 MiB" in one_line(error)


def test_a_shard_that_is_no_regular_file_is_refused_without_blocking(tmp_path):
    (tmp_path / "zero.tar").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.tar")
    for name in ("zero.tar", "fifo.tar"):
        error, _ = ends_within(10, read_shard, str(tmp_path / name))
        assert isinstance(error, ShardError) and "is not a regular file" in one_line(error)


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Sends a byte every 50 ms forever: in the status line and headers (server.phase == 'headers') or the body."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.server.phase == "headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        else:
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
        with contextlib.suppress(OSError):
            while not self.server.stop.is_set():
                self.wfile.write(b"x")
                time.sleep(0.05)


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_trickling_server_is_cut_at_the_deadline(monkeypatch, phase):
    monkeypatch.setattr(storage, "URL_DEADLINE", 1)
    with serving(_Trickle, phase=phase) as url:
        error, elapsed = ends_within(10, read_shard, url + "/train-00000.tar", retries=3)
    assert isinstance(error, ShardError) and "not complete after 1 s" in one_line(error)
    assert "URL_DEADLINE" in str(error) and "tries" not in str(error)  # not retried
    assert elapsed < 5


def test_a_pipe_command_is_cut_at_the_deadline_and_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "URL_DEADLINE", 1)
    error, elapsed = ends_within(10, read_shard, "pipe:sleep 30; cat x", retries=0)
    assert isinstance(error, ShardError) and "not complete after 1 s" in one_line(error) and elapsed < 5
    error, elapsed = ends_within(10, read_shard, "pipe:yes", retries=0, max_bytes=1 << 20)
    assert isinstance(error, ShardError) and "is larger than 1 MiB" in one_line(error) and elapsed < 5


# --- JPEG headers --------------------------------------------------------------------------------------------------

def forged(height, width):
    """A real 64x64 JPEG whose frame header claims height x width."""
    good = jpeg()
    at = good.index(b"\xff\xc0")
    assert jpeg_frame(good) == (64, 64, 3)
    return good[:at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + good[at + 9:]


def test_jpeg_frame_walks_segments_rather_than_searching_bytes():
    good = jpeg()
    # an APP1 segment holding bytes that look like a 64x64 frame header (an EXIF thumbnail would): skipped over
    decoy = b"\xff\xc0\x00\x11\x08\x00\x40\x00\x40\x03" + b"\0" * 8
    disguised = forged(60000, 60000)
    disguised = disguised[:2] + b"\xff\xe1" + (len(decoy) + 2).to_bytes(2, "big") + decoy + disguised[2:]
    assert jpeg_frame(disguised) == (60000, 60000, 3)
    assert jpeg_frame(b"\x89PNG\r\n\x1a\n" + good) is None
    assert jpeg_frame(good[:good.index(b"\xff\xc0")]) is None  # cut before its frame header
    started = time.monotonic()
    assert jpeg_frame(b"\xff\xd8" + b"\xff\xe0\x00\x00" * 10 ** 5) is None  # zero-length segments: still forward
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_forged_jpeg_header_is_refused_before_decoding(tmp_path, monkeypatch, skip_bad):
    bomb = forged(60000, 60000)
    root = write_folder(tmp_path / "s", {"train-00000.tar": samples(3, jpgs=[jpeg(), bomb, jpeg()])})
    real_decode = data.decode_jpeg

    def decode_unless_forged(inputs, **kw):  # would allocate 60000 x 60000 x 3 bytes: never reached
        for t in inputs if isinstance(inputs, list) else [inputs]:
            assert bytes(t.numpy()) != bomb, "the forged JPEG reached the decoder"
        return real_decode(inputs, **kw)
    monkeypatch.setattr(data, "decode_jpeg", decode_unless_forged)
    loader = build_loader(root, "train", batch_size=3, train=False, num_workers=0, skip_bad=skip_bad)
    if skip_bad:
        with pytest.warns(UserWarning, match="s1.*60000x60000"):
            batches = list(loader)
        assert [len(y) for _, y in batches] == [2] and loader.skipped == 1
    else:
        with pytest.raises(ShardError, match=r"sample s1: a JPEG of 60000x60000 with 3 channels, expected 64x64"):
            list(loader)


def test_labels_outside_the_classes_are_bad_samples(tmp_path):
    root = write_folder(tmp_path / "s", {"train-00000.tar": samples(4, labels=[0, 999, -1, -7])}, num_classes=3)
    loader = build_loader(root, "train", batch_size=4, train=False, num_workers=0, skip_bad=True)
    with pytest.warns(UserWarning, match="not a class index"):
        ys = torch.cat([y for _, y in loader])
    assert ys.tolist() == [0, -1] and loader.skipped == 2  # -1: unlabeled, as tinycnn-prepare writes it
