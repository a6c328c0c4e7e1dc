"""tinycnn-prepare's trust boundary: hostile zips, images, folders, output folders and download servers are
refused in one line, within bounded time and memory, and never read or touch anything outside the source
or delete what prepare did not write. Every input is crafted here."""
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
import zlib
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from tinycnn.prepare import PrepareError, scan, download, downloader, ensure_prepared, is_prepared, main, prepare, \
    sources
from tinycnn.prepare.scan import check_jpeg
from tinycnn.tar import tar_samples

from test_prepare import write_dir, write_zip  # the source layouts, written as a zip or a folder

TOP = "tiny-imagenet-200/"
WNIDS = ["n01000000", "n02000000", "n03000000"]
_MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# helpers


def jpeg(color=(200, 30, 30), size=(64, 64)):
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "JPEG")
    return b.getvalue()


def synthetic(n_train=3, n_val=1):
    """{path: bytes} in the tiny-imagenet-200 layout, every image distinct."""
    files = {TOP + "wnids.txt": "\n".join(WNIDS).encode(), TOP + "words.txt": b"n01000000\tfirst\n"}
    ann, v = [], 0
    for c, w in enumerate(WNIDS):
        for i in range(n_train):
            files[f"{TOP}train/{w}/images/{w}_{i}.JPEG"] = jpeg((40 * c + 10, 30 * i + 5, 7))
        for _ in range(n_val):
            files[f"{TOP}val/images/val_{v}.JPEG"] = jpeg((7, 40 * c + 10, 30 * v + 5))
            ann.append(f"val_{v}.JPEG\t{w}\t0\t0\t63\t63")
            v += 1
    files[TOP + "val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    return files


def quick(source, out, **kw):
    return prepare(source, out, holdout_per_class=kw.pop("holdout_per_class", 1), progress=False, **kw)


def refused(match, fn, *args, **kw) -> str:
    """The message of the PrepareError that fn raises: it matches `match` and is one line."""
    with pytest.raises(PrepareError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def packed(out):
    """{key: jpg bytes} of every sample in the shards of a prepared folder, read back with tinycnn.tar."""
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return {s["__key__"]: s["jpg"] for split in manifest["splits"].values() for shard in split["shards"]
            for s in tar_samples(Path(out) / shard["file"])}


def stored(name, data):
    """A zip member stored as it is: (name, chunks, method, crc, compressed size, declared size)."""
    return name, [data], 0, zlib.crc32(data), len(data), len(data)


def zeros_bomb(name, mib=300, declared=None):
    """A deflated member of `mib` MiB of zeros (~300 KB), built in pieces without ever holding it: the deflate
    stream of 1 MiB of zeros, fully flushed, repeats as it is. `declared`: the size its headers claim."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = c.compress(bytes(_MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty last block
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(bytes(_MIB), crc)
    size = mib * _MIB
    return name, [piece] * mib + [final], 8, crc, mib * len(piece) + len(final), size if declared is None else declared


def raw_zip(path, members):
    """A zip written field by field, so that its headers can declare what a test wants them to."""
    central = []
    with open(path, "wb") as f:
        for name, chunks, method, crc, csize, usize in members:
            offset, n = f.tell(), name.encode()
            f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, csize, usize, len(n), 0) + n)
            for chunk in chunks:
                f.write(chunk)
            central.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, csize, usize,
                                       len(n), 0, 0, 0, 0, 0, offset) + n)
        start = f.tell()
        directory = b"".join(central)
        f.write(directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(central), len(central),
                                        len(directory), start, 0))
    return path


def dead_pid():
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------
# zip members: sizes capped before reading


@pytest.mark.parametrize("lies", [False, True], ids=["declares-300MB", "declares-2KB"])
def test_zip_bomb_member_is_refused_fast_with_bounded_memory(tmp_path, lies):
    files = synthetic()
    bomb = TOP + "train/n02000000/images/n02000000_1.JPEG"
    members = [stored(n, d) for n, d in files.items() if n != bomb]
    members.append(zeros_bomb(bomb, declared=2000 if lies else None))
    src = raw_zip(tmp_path / "bomb.zip", members)
    assert src.stat().st_size < 2 * _MIB
    started = time.monotonic()
    tracemalloc.start()
    try:
        msg = refused("bad input", quick, src, tmp_path / "out")
        m = quick(src, tmp_path / "out", skip_bad=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 10
    assert peak < 32 * _MIB, f"peak {peak / _MIB:.0f} MiB: the 300 MiB member was inflated"
    # honest: refused by its declared size, unopened; lying: zipfile stops at the declared size (CRC mismatch)
    reason = "declares 300 MiB, over the 4 MiB limit" if not lies else "cannot read it"
    assert f"{bomb}: {reason}" in msg and "--skip-bad" in msg
    assert [(s["file"], reason in s["reason"]) for s in m["skipped"]] == [(bomb, True)]
    assert "n02000000_1" not in packed(tmp_path / "out") and len(packed(tmp_path / "out")) == 11


@pytest.mark.parametrize("victim", ["train/n01000000/images/n01000000_0.JPEG", "words.txt"])
def test_zip_member_declaring_1_gb_is_refused_unread(tmp_path, victim, monkeypatch):
    files = synthetic()
    members = [stored(n, d) for n, d in files.items()]
    i = [m[0] for m in members].index(TOP + victim)
    name, chunks, method, crc, csize, _ = members[i]
    members[i] = (name, chunks, method, crc, csize, 1 << 30)  # 1 GiB declared, a few bytes stored
    src = raw_zip(tmp_path / "liar.zip", members)
    opened, real_open = [], zipfile.ZipFile.open

    def spy(self, info, *args, **kw):
        opened.append(getattr(info, "filename", info))
        return real_open(self, info, *args, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    if victim == "words.txt":
        refused(f"{TOP}words.txt declares 1 GiB, over the 64 MiB limit.*download it again", quick, src,
                tmp_path / "out")
    else:
        msg = refused("bad input", quick, src, tmp_path / "out")
        assert f"{TOP}{victim}: declares 1 GiB, over the 4 MiB limit" in msg
        m = quick(src, tmp_path / "out", skip_bad=True)
        assert [s["file"] for s in m["skipped"]] == [TOP + victim]
    assert opened and TOP + victim not in opened  # the others are read, the liar never opened


def test_zip_member_count_and_total_size_are_checked_up_front(tmp_path, monkeypatch):
    src = write_zip(synthetic(), tmp_path / "src.zip")
    monkeypatch.setattr(sources, "MAX_MEMBERS", 5)
    refused(r"src.zip: it announces 15 entries, more than the 5 allowed.*download it again", quick, src,
            tmp_path / "out")
    # past the end record (zipfile has parsed the directory): the same caps on what it holds
    monkeypatch.setattr(sources, "_check_zip_directory", lambda path: None)
    refused(r"src.zip: it holds 15 entries, more than the 5 allowed", quick, src, tmp_path / "out")
    monkeypatch.setattr(sources, "MAX_MEMBERS", 500_000)
    monkeypatch.setattr(sources, "MAX_SOURCE_BYTES", 5000)
    refused(r"src.zip: its members declare .* uncompressed, over the 4.883 KiB allowed", quick, src,
            tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_images_are_capped_one_by_one_and_in_total(tmp_path, monkeypatch):
    files = synthetic()
    big = TOP + "train/n03000000/images/n03000000_2.JPEG"
    files[big] = jpeg() + b"\0" * 6000  # a valid JPEG with trailing padding, over the (lowered) cap
    src = write_dir(files, tmp_path / "src")
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 4096)
    m = quick(src, tmp_path / "out", skip_bad=True)
    assert [(s["file"], "over the 4 KiB limit" in s["reason"]) for s in m["skipped"]] == [(big, True)]
    # all images together: a running total, whatever the sizes claim
    monkeypatch.setattr(sources, "MAX_SOURCE_BYTES", 5000)
    refused(r"src: its images hold more than 4.883 KiB.*pass tiny-imagenet-200.zip", quick, src, tmp_path / "o2",
            force=True)


def test_parquet_caps(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    names = sorted(WNIDS)
    meta = {"huggingface": json.dumps({"info": {"features": {"label": {"names": names}}}})}

    def table(labels, big_row=None):
        images = [{"bytes": jpeg((30 * i + 5, 3, 3)) + (b"\0" * 6000 if i == big_row else b""), "path": None}
                  for i in range(len(labels))]
        return pa.table({"image": images, "label": labels}).replace_schema_metadata(meta)

    hf = tmp_path / "hf"
    hf.mkdir()
    pq.write_table(table([0, 1, 2] * 3, big_row=4), hf / "train-00000-of-00001.parquet")
    pq.write_table(table([2, 1, 0]), hf / "valid-00000-of-00001.parquet")
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 4096)
    m = quick(hf, tmp_path / "out", skip_bad=True)
    assert [s["file"] for s in m["skipped"]] == ["train-00000-of-00001.parquet[row 4]"]
    assert "over the 4 KiB limit" in m["skipped"][0]["reason"]

    monkeypatch.setattr(sources, "MAX_MEMBERS", 10)
    refused(r"hf: its parquet files hold 12 rows, more than the 10 allowed", quick, hf, tmp_path / "o2")
    monkeypatch.setattr(sources, "MAX_MEMBERS", 500_000)
    # a footer length that claims more than the file: refused before pyarrow reads it
    f = hf / "valid-00000-of-00001.parquet"
    data = f.read_bytes()
    f.write_bytes(data[:-8] + (1 << 30).to_bytes(4, "little") + b"PAR1")
    refused(r"valid-00000-of-00001.parquet: its parquet footer claims 1 GiB.*Download it again", quick, hf,
            tmp_path / "o3")
    f.write_bytes(b"not parquet at all")
    refused(r"valid-00000-of-00001.parquet: not a parquet file", quick, hf, tmp_path / "o3")


# ---------------------------------------------------------------------------------------------
# image dimensions from the header, before decoding


def forged_sof(data, height=60000, width=60000):
    """`data` (a baseline JPEG) with its frame header claiming another size."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 9:]


@pytest.fixture
def decoded(monkeypatch):
    """The images check_jpeg decodes, recorded."""
    seen = []
    real = scan._decode_shape

    def recording(data):
        seen.append(data)
        return real(data)

    monkeypatch.setattr(scan, "_decode_shape", recording)
    return seen


def test_forged_huge_jpeg_header_is_refused_before_decoding(decoded):
    good = jpeg()
    bomb = forged_sof(good)
    assert check_jpeg(bomb) == "image is 60000x60000, expected 64x64" and decoded == []
    assert check_jpeg(forged_sof(good, 64, 65000)) == "image is 65000x64, expected 64x64" and decoded == []
    assert check_jpeg(good) == 3 and decoded == [good]  # a real one is still decoded
    # no frame header before the scan: refused without decoding too
    no_frame = good.replace(b"\xff\xc0", b"\xff\xe5", 1)
    assert "no frame header" in check_jpeg(no_frame) and len(decoded) == 1
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own decompression-bomb guard stays on


def test_forged_huge_jpeg_in_a_source_is_a_bad_image(tmp_path, decoded):
    files = synthetic()
    bomb = TOP + "val/images/val_1.JPEG"
    files[bomb] = forged_sof(files[bomb])
    src = write_zip(files, tmp_path / "src.zip")
    msg = refused("bad input", quick, src, tmp_path / "out")
    assert f"{bomb}: image is 60000x60000, expected 64x64" in msg
    m = quick(src, tmp_path / "out", skip_bad=True)
    assert [s["file"] for s in m["skipped"]] == [bomb]
    assert files[bomb] not in decoded and "val_1" not in packed(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# a folder source never reads outside itself


def test_folder_source_never_packs_files_behind_links_out_of_it(tmp_path):
    src = write_dir(synthetic(), tmp_path / "src")
    secret = tmp_path / "secret.JPEG"
    secret.write_bytes(jpeg((1, 2, 3)))  # a valid 64x64 JPEG: only the link rule keeps it out
    file_link = f"{TOP}train/n01000000/images/n01000000_9.JPEG"
    (src / file_link).symlink_to(secret)
    # a whole class folder moved out and linked in
    dir_link = f"{TOP}train/n02000000"
    outside = tmp_path / "elsewhere" / "n02000000"
    outside.parent.mkdir()
    shutil.move(src / dir_link, outside)
    (src / dir_link).symlink_to(outside, target_is_directory=True)
    outside_images = {p.read_bytes() for p in outside.rglob("*.JPEG")}
    # a link that stays inside the folder is read as the file it points to
    inner = f"{TOP}train/n03000000/images/n03000000_9.JPEG"
    (src / inner).symlink_to(src / TOP / "train/n03000000/images/n03000000_0.JPEG")

    msg = refused("bad input", quick, src, tmp_path / "out", holdout_per_class=0)
    assert f"{file_link}: a symbolic link to {secret}, outside the source folder: not read" in msg
    assert f"{dir_link}: a symbolic link to the folder {outside} (outside the source folder): not followed" in msg
    m = quick(src, tmp_path / "out", holdout_per_class=0, skip_bad=True)
    assert sorted(s["file"] for s in m["skipped"]) == sorted([file_link, dir_link])
    shards = packed(tmp_path / "out")
    assert secret.read_bytes() not in shards.values() and not outside_images & set(shards.values())
    assert "n01000000_9" not in shards and not [k for k in shards if k.startswith("n02000000_")]
    assert shards["n03000000_9"] == (src / inner).read_bytes()


def test_text_files_and_dataset_folder_behind_links_out_of_the_folder(tmp_path):
    src = write_dir(synthetic(), tmp_path / "src")
    user = tmp_path / "my-words.txt"
    user.write_text("n01000000\tsecret\n")
    (src / TOP / "words.txt").unlink()
    (src / TOP / "words.txt").symlink_to(user)
    refused(f"{TOP}words.txt a symbolic link to {user}, outside the source folder: not read", quick, src,
            tmp_path / "out")
    # the dataset folder itself linked from a parent folder: not followed, and the message says so
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "tiny").symlink_to(tmp_path / "elsewhere-ds", target_is_directory=True)
    write_dir(synthetic(), tmp_path / "elsewhere-ds")
    (tmp_path / "elsewhere-ds" / TOP / "wnids.txt").rename(tmp_path / "elsewhere-ds" / "wnids.txt")
    refused("no wnids.txt.*symbolic links to folders are not followed", quick, parent, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# the lock file, stale folders and --force touch only prepare's own files


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_linked_lock_file_is_refused_and_its_target_untouched(tmp_path, kind, capsys):
    src = write_zip(synthetic(), tmp_path / "src.zip")
    user = tmp_path / "notes.txt"
    user.write_text("precious")
    lock = tmp_path / "out.lock"
    if kind == "symlink":
        lock.symlink_to(user)
        why = "is a symbolic link"
    else:
        os.link(user, lock)
        why = "has other hard links"
    refused(f"out.lock {why}.*remove it|out.lock {why}.*remove the link", quick, src, tmp_path / "out")
    assert main([str(src), "--out", str(tmp_path / "out"), "--holdout", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and why in " ".join(err.split())
    assert user.read_text() == "precious" and (lock.is_symlink() if kind == "symlink" else lock.is_file())
    assert not (tmp_path / "out").exists()


def test_force_replaces_only_tinycnn_output(tmp_path, capsys):
    src = write_zip(synthetic(), tmp_path / "src.zip")
    args = ["--holdout", "1", "--no-progress", "--force"]
    # a folder dressed up as ours: a manifest that says so, beside the user's own files
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"format": "tinycnn-shards", "splits": {}}))
    (fake / "thesis.tex").write_text("mine")
    (fake / "data").mkdir()
    assert main([str(src), "--out", str(fake)] + args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "not a prepared dataset (it holds data, thesis.tex, which tinycnn-prepare does not write)" in err
    assert (fake / "thesis.tex").read_text() == "mine" and (fake / "data").is_dir()

    # our own output with a user's file added: not ours to replace any more
    out = tmp_path / "out"
    quick(src, out)
    (out / "notes.md").write_text("mine")
    refused("not a prepared dataset.*notes.md.*nothing was changed", quick, src, out, force=True)
    assert (out / "notes.md").read_text() == "mine" and is_prepared(out)
    (out / "notes.md").unlink()
    assert quick(src, out, force=True, holdout_per_class=0)["holdout_per_class"] == 0  # ours: replaced

    # --out a link to a prepared folder: the link is never replaced, the folder never deleted through it
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    refused(f"{link} is a symbolic link; pass the folder it points to", quick, src, link, force=True)
    assert link.is_symlink() and is_prepared(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake", "link", "out", "src.zip"]


def test_stale_folder_cleanup_removes_only_prepare_folders(tmp_path, capsys):
    src = write_zip(synthetic(), tmp_path / "src.zip")
    dead = dead_pid()
    user = tmp_path / "mydata"
    user.mkdir()
    (user / "a.txt").write_text("keep")
    (tmp_path / f"out.tmp-{dead}-0123abcd").symlink_to(user, target_is_directory=True)
    old = tmp_path / f"out.old-{dead}-89abcdef"
    old.mkdir()
    (old / "thesis.tex").write_text("keep")
    ours = tmp_path / f"out.tmp-{dead}-00000000"
    ours.mkdir()
    (ours / "train-00000.tar").write_bytes(b"x")
    quick(src, tmp_path / "out")
    err = " ".join(capsys.readouterr().err.split())
    assert f"removed {ours}" in err and f"left {old} in place: it holds thesis.tex" in err
    assert not ours.exists() and (old / "thesis.tex").read_text() == "keep"
    assert (tmp_path / f"out.tmp-{dead}-0123abcd").is_symlink() and (user / "a.txt").read_text() == "keep"


# ---------------------------------------------------------------------------------------------
# the manifest records each shard's size (and hash) for readers to cap and check


@pytest.mark.parametrize("compress", [False, True], ids=["tar", "tar.gz"])
def test_manifest_records_shard_bytes_tar_bytes_and_sha256(tmp_path, compress):
    out = tmp_path / "out"
    m = quick(write_zip(synthetic(), tmp_path / "src.zip"), out, compress=compress)
    for split in m["splits"].values():
        for s in split["shards"]:
            data = (out / s["file"]).read_bytes()
            assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
            if compress:
                assert s["tar_bytes"] == len(gzip.decompress(data)) > s["bytes"]
            else:
                assert "tar_bytes" not in s
    # a manifest from before these fields: still a prepared folder, still a no-op to prepare again
    old = json.loads((out / "manifest.json").read_text())
    for split in old["splits"].values():
        split["shards"] = [{"file": s["file"], "num_samples": s["num_samples"]} for s in split["shards"]]
    (out / "manifest.json").write_text(json.dumps(old))
    assert is_prepared(out) and ensure_prepared(out) == out
    assert quick(tmp_path / "src.zip", out, compress=compress) == old


# ---------------------------------------------------------------------------------------------
# downloads: a deadline and a size cap


class _Hostile(BaseHTTPRequestHandler):
    def __init__(self, *args, behaviour, stop, **kw):
        self.behaviour, self.stop = behaviour, stop
        super().__init__(*args, **kw)

    def log_message(self, *args):
        pass

    def trickle(self, piece: bytes):
        """Send `piece` every 50 ms until the client hangs up or the test ends."""
        while not self.stop.wait(0.05):
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except OSError:
                return

    def do_GET(self):
        if self.behaviour == "slow-body":  # a byte at a time: every read is in time, the whole never
            self.send_response(200)
            self.send_header("Content-Length", str(10 ** 6))
            self.end_headers()
            self.trickle(b"x")
        elif self.behaviour == "slow-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self.trickle(b"X-Slow: 1\r\n")
        elif self.behaviour == "huge":
            self.send_response(200)
            self.send_header("Content-Length", str(5 << 30))
            self.end_headers()
        elif self.behaviour == "endless":  # no Content-Length: a body until the connection closes
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"y" * 1024)


@pytest.fixture
def hostile_server():
    servers = []

    def start(behaviour):
        stop = threading.Event()
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Hostile, behaviour=behaviour, stop=stop))
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append((httpd, stop))
        return f"http://127.0.0.1:{httpd.server_address[1]}/tiny-imagenet-200.zip"

    yield start
    for httpd, stop in servers:
        stop.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("behaviour", ["slow-body", "slow-headers"])
def test_a_trickling_server_is_cut_at_the_deadline(hostile_server, tmp_path, monkeypatch, behaviour):
    monkeypatch.setattr(downloader, "DOWNLOAD_DEADLINE_S", 1.0)
    url = hostile_server(behaviour)
    started = time.monotonic()
    refused(r"download of .*tiny-imagenet-200.zip stopped after 1 s .* too slow or stalled; run the same "
            "command again to resume", download, tmp_path, url, None, progress=False)
    assert time.monotonic() - started < 10
    part = tmp_path / "tiny-imagenet-200.zip.part"
    if behaviour == "slow-body":  # what arrived is kept, to resume from
        assert 0 < part.stat().st_size < 100
    assert not (tmp_path / "tiny-imagenet-200.zip").exists()


def test_a_download_larger_than_the_cap_is_refused(hostile_server, tmp_path, monkeypatch):
    refused(r"is 5368709120 bytes, more than the 1073741824 a Tiny ImageNet zip can be.*check --url", download,
            tmp_path, hostile_server("huge"), None, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(downloader, "MAX_DOWNLOAD_BYTES", 10_000)
    refused(r"sent more than 10000 bytes.*check --url", download, tmp_path, hostile_server("endless"), None,
            progress=False)
    assert not (tmp_path / "tiny-imagenet-200.zip").exists()
    assert (tmp_path / "tiny-imagenet-200.zip.part").stat().st_size == 0  # nothing of it kept


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_linked_partial_download_is_refused_and_its_target_untouched(tmp_path, kind):
    user = tmp_path / "notes.txt"
    user.write_text("precious")
    dl = tmp_path / "dl"
    dl.mkdir()
    part = dl / "tiny-imagenet-200.zip.part"
    if kind == "symlink":
        part.symlink_to(user)
    else:
        os.link(user, part)
    # refused before any request: the port needs no server
    refused(r"tiny-imagenet-200.zip.part is a link or not a plain file.*--download-dir", download, dl,
            "http://127.0.0.1:9/tiny-imagenet-200.zip", None, progress=False)
    assert user.read_text() == "precious"
