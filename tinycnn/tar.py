"""The shard tar format, written and read in one place (layout: shards/README.md).

Shards are plain tars (optionally gzip-compressed) of many small members, three 512-byte blocks of
header and padding around each tiny JPEG. Python's tarfile (and webdataset, which uses it) costs
~150 us a member to read and ~40 us to write, more than decoding the JPEG itself; walking the
512-byte headers directly is several times faster both ways (benchmarks/test_bench_tar.py). The reader
also takes tars written by other tools (pax and GNU long names, links and folders, which it skips as
webdataset does), and treats every byte as untrusted: each header moves the walk forward or is an error,
and gzip data decompresses to a bounded size.
"""
from __future__ import annotations

import os
import tarfile
import zlib
from typing import Dict, Iterable, Iterator, Mapping, Tuple, Union

__all__ = ["write_shard", "tar_bytes", "iter_samples", "tar_samples"]

_BLOCK = 512
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_LEVEL = 6  # JPEG bytes hardly compress: what shrinks is headers and padding, at any level
MAX_TAR_BYTES = 4 << 30  # what a gzip shard may decompress to when the caller sets no tighter limit


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


# Member kinds: the header's type flag (a byte value), as tarfile reads them
_REGULAR = frozenset(b"0\x007")         # files (7: contiguous, a file to every reader)
_NO_CONTENT = frozenset(b"123456")      # links, devices, folders, FIFOs: no content (their size does not count)
_PAX, _GNU_LONG_NAME, _SPARSE = b"x"[0], b"L"[0], b"S"[0]  # sparse files are refused (holes fill memory)
_ZERO_BLOCK = bytes(_BLOCK)


def _header_sum(header: bytes) -> int:
    """The sum of the 512 bytes of a header. zlib.adler32's first half is 1 + the sum of its bytes modulo 65521:
    exact for 256 bytes (at most 65280), and far cheaper than sum() over the bytes."""
    view = memoryview(header)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def _pax_records(content: bytes, at: int) -> Dict[str, str]:
    """'<len> key=value\n' records of a pax extended header (at byte `at`); tarfile.ReadError unless every record
    is well formed, so that the walk always advances."""
    out, pos, end = {}, 0, len(content)
    while pos < end and content[pos] != 0:  # some writers pad the records with NULs
        space = content.find(b" ", pos, min(end, pos + 21))
        digits = content[pos:space]
        length = int(digits) if space > pos and digits.isdigit() else 0
        if length <= len(digits) + 1 or pos + length > end or content[pos + length - 1] != 0x0A:
            raise tarfile.ReadError(f"bad pax record in the tar header at byte {at}")
        key, equals, value = content[space + 1:pos + length - 1].partition(b"=")
        if not equals:
            raise tarfile.ReadError(f"bad pax record in the tar header at byte {at}")
        out[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return out


def _check_name(name: str, at: int) -> str:
    """A member name that is no path out of a folder, and fits a one-line message."""
    if name[:1] == "/" or (".." in name and ".." in name.split("/")) or not name.isprintable():
        raise tarfile.ReadError(f"tar member at byte {at} has an absolute name, '..' or control characters: "
                                f"{name[:80]!r}")
    return name


def _plain_tar_members(data: bytes) -> Iterator[Tuple[str, bytes]]:
    """(name, content) of the regular files of a ustar/pax/GNU tar held in memory.

    Untrusted bytes: the walk always moves forward or fails. A size field that is not octal digits (negative,
    base-256), a malformed pax record, a sparse member, a member running past the end or a name with '..', an
    absolute name or control characters raise tarfile.ReadError (EOFError for a cut). Links, devices and folders
    are skipped, as webdataset skips them.
    """
    pos, end, at = 0, len(data), 0
    override: Dict[str, str] = {}  # from a pax or GNU long-name header, for the next member
    try:
        while pos + _BLOCK <= end:
            at = pos
            header = data[pos:pos + _BLOCK]
            if header == _ZERO_BLOCK:  # end-of-archive block
                return
            stored = header[148:156].strip(b"\0 ")
            if not stored.isdigit() or int(stored, 8) != _header_sum(header) - sum(header[148:156]) + 256:
                raise tarfile.ReadError(f"bad tar header checksum at byte {at}")
            size_field = header[124:136].strip(b"\0 ")
            if not size_field.isdigit():
                if size_field:
                    raise tarfile.ReadError(f"bad size field in the tar header at byte {at} (not octal digits)")
                size_field = b"0"
            size = int(size_field, 8)
            kind = header[156]
            if override:
                if "size" in override:
                    if not override["size"].isdigit():
                        raise tarfile.ReadError(f"bad pax size for the tar member at byte {at}")
                    size = int(override["size"])
                if any(key.startswith("GNU.sparse.") for key in override):
                    kind = _SPARSE
            if kind in _NO_CONTENT:
                size = 0  # tarfile's rule
            elif kind == _SPARSE:
                raise tarfile.ReadError(f"sparse tar member at byte {at}: not a shard member")
            pos += _BLOCK
            if pos + size > end:
                raise EOFError(f"a member runs past the end of the file at byte {pos} (truncated shard)")
            content = data[pos:pos + size]
            pos += (size + _BLOCK - 1) // _BLOCK * _BLOCK
            if kind not in _REGULAR:
                if kind == _PAX:
                    override = _pax_records(content, at)
                elif kind == _GNU_LONG_NAME:
                    override = {"path": content.split(b"\0", 1)[0].decode("utf-8")}
                else:  # global pax headers, GNU long link names, links, folders, unknown kinds: skipped
                    override = {}
                continue
            name = override.get("path") if override else None
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
            if override:
                override = {}
            if name[:1] == "/" or ".." in name or not name.isprintable():
                _check_name(name, at)
            yield name, content
    except UnicodeDecodeError:
        raise tarfile.ReadError(f"the tar header at byte {at} has a name or pax record that is not UTF-8") from None
    except ValueError:  # octal digits 8 or 9
        raise tarfile.ReadError(f"bad number in the tar header at byte {at}") from None


def _gunzip(data: bytes, name: str, limit: int) -> Tuple[bytes, Exception | None]:
    """The decompressed bytes of gzip `data` (all members), and the error that cut them short, if any.

    Never more than `limit` bytes: zlib stops there (max_length), so a decompression bomb costs `limit` at most.
    """
    out, total = [], 0
    while data:
        z = zlib.decompressobj(wbits=31)
        try:
            part = z.decompress(data, limit - total + 1)  # max_length >= 1 (0 would mean no limit)
        except zlib.error as e:
            return b"".join(out), tarfile.ReadError(f"{name or 'shard'}: damaged gzip data ({e})")
        total += len(part)
        if total > limit:
            return b"", tarfile.ReadError(f"{name or 'shard'}: decompresses to more than {limit} bytes, more "
                                          "than its manifest entry allows (a damaged shard or a decompression bomb)")
        out.append(part)
        if not z.eof:  # below max_length: zlib used all the input
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


def iter_samples(data: bytes, name: str = "", max_tar_bytes: int = MAX_TAR_BYTES) -> Iterator[Dict[str, bytes]]:
    """WebDataset samples {'__key__': key, ext: bytes, ...} of a shard held in memory.

    gzip data (found by its magic bytes) is decompressed first, to `max_tar_bytes` at most (more is a
    tarfile.ReadError). A damaged shard yields the samples before the damage, then raises (tarfile.ReadError or
    EOFError); `name` goes into the messages.
    """
    error = None
    if data[:2] == _GZIP_MAGIC:
        data, error = _gunzip(data, name, max_tar_bytes)
    members = []
    try:
        for member in _plain_tar_members(data):
            members.append(member)
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
