"""The shard tar format, written and read in one place (layout: shards/README.md).

Shards are plain tars (optionally gzip-compressed) of many small members, three 512-byte blocks of
header and padding around each tiny JPEG. Python's tarfile (and webdataset, which uses it) costs
~150 us a member to read and ~40 us to write, more than decoding the JPEG itself; walking the
512-byte headers directly is several times faster both ways (benchmarks/test_bench_tar.py). Tars
written by other tools, with member kinds our shards never hold, go through webdataset's reader.
"""
from __future__ import annotations

import io
import os
import tarfile
import zlib
from typing import Dict, Iterable, Iterator, Mapping, Tuple, Union

from webdataset.tariterators import group_by_keys, tar_file_iterator

__all__ = ["write_shard", "tar_bytes", "iter_samples", "tar_samples"]

_BLOCK = 512
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_LEVEL = 6  # JPEG bytes hardly compress: what shrinks is headers and padding, at any level


# ----------------------------------------------------------------------------------------------
# Writing


def _header(name: bytes, size: int) -> bytes:
    """The USTAR header tarfile writes for a regular file (mode 0444, mtime 0, no owner names).

    Tests check that it is byte-identical to tarfile's.
    """
    if len(name) > 100:
        raise ValueError(f"member name too long for a tar header: {name!r}")
    head = (name.ljust(100, b"\0") + b"0000444\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"00000000000\0"
            + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000").ljust(_BLOCK, b"\0")
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


def _as_bytes(value: Union[bytes, str, int]) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def tar_bytes(samples: Iterable[Mapping[str, Union[bytes, str, int]]]) -> bytes:
    """A tar of webdataset-style samples {'__key__': key, ext: value}: members <key>.<ext> in sorted
    ext order (as webdataset's TarWriter), values as bytes (str and int as their utf-8 text)."""
    parts = []
    for sample in samples:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("__")):
            value = _as_bytes(sample[ext])
            parts += (_header(f"{key}.{ext}".encode("utf-8"), len(value)), value, b"\0" * (-len(value) % _BLOCK))
    parts.append(b"\0" * (2 * _BLOCK))  # end-of-archive marker: two zero blocks
    return b"".join(parts)


def _gzip(data: bytes) -> bytes:
    # zlib's gzip wrapper (wbits 31): no file name and mtime 0 in the header, so equal input gives equal bytes
    z = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


def write_shard(path: Union[str, os.PathLike], samples: Iterable[Mapping[str, Union[bytes, str, int]]], *,
                compress: bool = False) -> int:
    """Write `samples` as one shard at `path` (gzip-compressed with compress=True); return the bytes written.

    Not atomic: the caller writes into a temporary folder (as tinycnn-prepare does).
    """
    data = tar_bytes(samples)
    if compress:
        data = _gzip(data)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


# ----------------------------------------------------------------------------------------------
# Reading


class _NotPlainTar(Exception):
    """A tar feature the fast reader leaves to webdataset (links, devices, pax sizes...)."""


def _pax_records(content: bytes) -> Dict[str, str]:
    """'<len> key=value\n' records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(content):
        length = int(content[pos:content.index(b" ", pos)])
        key, _, value = content[content.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return out


def _plain_tar_members(data: bytes) -> Iterator[Tuple[str, bytes]]:
    """(name, content) of the regular files of a ustar/pax/GNU tar held in memory.

    Member kinds other than files, folders, pax and GNU long-name headers raise _NotPlainTar.
    """
    pos, end = 0, len(data)
    override: Dict[str, str] = {}  # from a pax or GNU long-name header, for the next member
    while pos + _BLOCK <= end:
        header = data[pos:pos + _BLOCK]
        if header.count(0) == _BLOCK:  # end-of-archive block
            return
        stored = header[148:156].split(b"\0", 1)[0].strip()
        if not stored or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.ReadError(f"bad tar header checksum at byte {pos}")
        kind = header[156:157]
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        pos += _BLOCK
        if pos + size > end:
            raise EOFError(f"a member runs past the end of the file at byte {pos} (truncated shard)")
        content = data[pos:pos + size]
        pos += (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind == b"x":
            override = _pax_records(content)
            if "size" in override:
                raise _NotPlainTar  # sizes over 8 GiB: not in our shards
            continue
        if kind == b"L":
            override = {"path": content.rstrip(b"\0").decode("utf-8")}
            continue
        if kind == b"g":
            continue
        if kind not in (b"0", b"\0", b"5"):
            raise _NotPlainTar
        name = override.get("path")
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        override = {}
        if kind != b"5":
            yield name, content


def _gunzip(data: bytes, name: str) -> Tuple[bytes, Exception | None]:
    """The decompressed bytes of gzip `data` (all members), and the error that cut them short, if any."""
    out = []
    while data:
        z = zlib.decompressobj(wbits=31)
        try:
            out.append(z.decompress(data))
        except zlib.error as e:
            return b"".join(out), tarfile.ReadError(f"{name or 'shard'}: damaged gzip data ({e})")
        if not z.eof:
            return b"".join(out), EOFError(f"{name or 'shard'}: gzip data ends early (truncated shard)")
        data = z.unused_data.lstrip(b"\0")  # concatenated members; some tools pad with zeros
    return b"".join(out), None


def _group(members: Iterable[Tuple[str, bytes]]) -> Iterator[Dict[str, bytes]]:
    """Consecutive members with the same key as one sample (webdataset's rule: the key ends at the first dot)."""
    sample: Dict[str, bytes] = {}
    for name, content in members:
        folder, _, base = name.rpartition("/")
        if "." not in base or base.startswith("__"):
            continue
        key, ext = base.split(".", 1)
        key = f"{folder}/{key}" if folder else key
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[ext.lower()] = content
    if sample:
        yield sample


def iter_samples(data: bytes, name: str = "") -> Iterator[Dict[str, bytes]]:
    """WebDataset samples {'__key__': key, ext: bytes, ...} of a shard held in memory.

    gzip data (found by its magic bytes) is decompressed first. A damaged shard yields the samples
    before the damage, then raises (tarfile.ReadError or EOFError); `name` goes into the messages.
    """
    error = None
    if data[:2] == _GZIP_MAGIC:
        data, error = _gunzip(data, name)
    members = []
    try:
        for member in _plain_tar_members(data):
            members.append(member)
    except _NotPlainTar:  # tars written by other tools: webdataset's reader
        stream = tar_file_iterator(io.BytesIO(data))
        for sample in group_by_keys({**m, "__url__": name} for m in stream):
            sample.pop("__url__", None)
            yield sample
        if error is not None:
            raise error
        return
    except (tarfile.ReadError, EOFError, ValueError) as e:
        error = e  # yield the samples before the damage, then report it
    samples = list(_group(members))
    if error is not None and samples:
        samples.pop()  # a sample cut by the damage may be incomplete
    yield from samples
    if error is not None:
        raise error


def tar_samples(path: Union[str, os.PathLike]) -> Iterator[Dict[str, bytes]]:
    """iter_samples of the shard file at `path`."""
    with open(path, "rb") as f:
        data = f.read()
    yield from iter_samples(data, str(path))
