"""tinycnn.tar: the shard format, written and read (plain and gzip), against tarfile and webdataset."""
import gzip
import io
import tarfile

import pytest
import webdataset as wds

from tinycnn.tar import _header, iter_samples, tar_bytes, tar_samples, write_shard


def samples(n=5):
    return [{"__key__": f"n0144_{i}", "cls": str(i % 3), "jpg": bytes(j % 251 for j in range(i, i + 700 + 37 * i))}
            for i in range(n)]


def wds_samples(data: bytes):
    """Samples as webdataset's own reader sees them (tarfile underneath; gzip detected by tarfile)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator
    return [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            for s in group_by_keys({**m, "__url__": "x"} for m in tar_file_iterator(io.BytesIO(data)))]


def as_read(sample):
    return {k: v if isinstance(v, bytes) else str(v).encode() for k, v in sample.items() if k != "__key__"} | \
        {"__key__": sample["__key__"]}


@pytest.mark.parametrize("name, size", [("n01443537_12.jpg", 1641), ("val_1.cls", 1), ("x" * 100, 0)])
def test_tar_header_is_tarfiles(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0
    assert _header(name.encode(), size) == info.tobuf(tarfile.USTAR_FORMAT)


def test_header_refuses_long_names():
    with pytest.raises(ValueError, match="too long"):
        _header(b"x" * 101, 1)


@pytest.mark.parametrize("compress", [False, True])
def test_written_shard_reads_back_everywhere(tmp_path, compress):
    path = tmp_path / ("s.tar.gz" if compress else "s.tar")
    size = write_shard(path, samples(), compress=compress)
    data = path.read_bytes()
    assert size == len(data) and (data[:2] == b"\x1f\x8b") == compress
    want = [as_read(s) for s in samples()]
    assert list(iter_samples(data)) == want
    assert list(tar_samples(path)) == want
    assert wds_samples(data) == want
    with tarfile.open(path) as t:  # tarfile's member order and content: cls before jpg, as TarWriter
        assert [m.name for m in t.getmembers()][:2] == ["n0144_0.cls", "n0144_0.jpg"]
        assert t.extractfile("n0144_4.jpg").read() == samples()[4]["jpg"]
    assert list(wds.WebDataset([str(path)], shardshuffle=False))[2]["cls"] == b"2"


def test_same_input_same_bytes(tmp_path):
    # no mtime or file name in the gzip header: a rebuild gives identical shards
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    write_shard(a, samples(), compress=True)
    write_shard(b, samples(), compress=True)
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()) == tar_bytes(samples())


def test_compressed_shard_written_by_other_tools(tmp_path):
    # tarfile's own gzip tar (file name and mtime in the header), read by the fast reader
    path = tmp_path / "tf.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for s in samples(3):
            for ext in ("cls", "jpg"):
                value = s[ext] if isinstance(s[ext], bytes) else s[ext].encode()
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(value)
                t.addfile(info, io.BytesIO(value))
    assert list(tar_samples(path)) == [as_read(s) for s in samples(3)]
    # two gzip members back to back (e.g. `cat a.tar.gz b.tar.gz`-style concatenation of a split tar)
    raw = tar_bytes(samples(4))[:-1024]  # without the end-of-archive blocks
    half = 512 * 4
    data = gzip.compress(raw[:half]) + gzip.compress(raw[half:] + b"\0" * 1024)
    assert list(iter_samples(data)) == [as_read(s) for s in samples(4)]


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_shard_yields_the_intact_samples_then_raises(tmp_path, compress):
    path = tmp_path / "s"
    write_shard(path, samples(8), compress=compress)
    data = path.read_bytes()
    got = []
    with pytest.raises(EOFError, match="truncated"):
        for s in iter_samples(data[: len(data) * 2 // 3], name="s.tar"):
            got.append(s)
    want = [as_read(s) for s in samples(8)]
    assert 1 <= len(got) < 8 and got == want[:len(got)]


def test_damaged_gzip_raises_a_tar_error(tmp_path):
    path = tmp_path / "s.tar.gz"
    write_shard(path, samples(8), compress=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(tarfile.ReadError, match="s.tar.gz: damaged gzip data"):
        list(iter_samples(bytes(data), name="s.tar.gz"))


def test_values_as_text():
    # str and int values are written as their utf-8 text, as webdataset's TarWriter writes .cls
    as_text = tar_bytes([{"__key__": "k", "cls": 17, "txt": "é"}])
    assert as_text == tar_bytes([{"__key__": "k", "cls": b"17", "txt": "é".encode()}])
    assert list(iter_samples(as_text)) == [{"__key__": "k", "cls": b"17", "txt": "é".encode()}]
