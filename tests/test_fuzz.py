"""Fuzzing the readers of untrusted input: shards, manifests, safetensors weights, YAML configs.

Every input, however mangled, must end in a result or a clean refusal: an exception of the reader's
documented error types whose message is one line. Never a hang, a MemoryError or RecursionError, an
IndexError/TypeError/KeyError/UnicodeDecodeError/AttributeError leaking from a parser, a shell command
run, a file read from outside a shards folder or a connection opened. `run_bounded` enforces the time
and memory bounds on each example, from a timer signal, so a reader that loops forever fails the test
instead of hanging it.

Hypothesis runs derandomized (the same examples on every run) with no example database; the known
hostile inputs are also listed one by one, so each shows up as its own test.
"""
import contextlib
import io
import json
import random
import resource
import shlex
import signal
import socket
import struct
import tarfile
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Optional, Tuple

import pytest
import timm
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinycnn  # noqa: F401  (registers the tinycnn models with timm)
from tinycnn.config import Config, ConfigError, load_config, read_yaml
from tinycnn.data import build_loader
from tinycnn.storage import ShardError, read_manifest
from tinycnn.tar import iter_samples, tar_bytes
from tinycnn.weights import WeightsError, load_model, read_metadata, save_model

# ---------------------------------------------------------------------------------------------- bounds

DEADLINE_S = 10.0                    # a reader still running after this long hangs (generous: a loaded CI machine)
PYTHON_MEMORY_LIMIT = 200 * 2 ** 20  # peak Python allocations of one call (tracemalloc)
RSS_GROWTH_LIMIT = 512 * 2 ** 20     # resident memory growth of one call: what torch and zlib allocate in C
ADDRESS_SPACE_MARGIN = 4 * 2 ** 30   # one allocation larger than this fails at once instead of filling memory
TICK_S = 0.05                        # how often the bounds are checked while a reader runs


class _OutOfBounds(BaseException):
    """Raised into a reader from the timer signal. A BaseException, so a reader's `except Exception` cannot
    swallow it."""


class _NetworkAttempt(BaseException):
    """A reader opened a connection (it has no reason to: everything it reads is local)."""


def _memory_pages() -> Optional[Tuple[int, int]]:
    """(address space, resident) bytes of this process, or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            size, resident = f.read().split()[:2]
    except OSError:
        return None
    page = resource.getpagesize()
    return int(size) * page, int(resident) * page


@contextlib.contextmanager
def _address_space_cap():
    """Cap the address space a little above its current size, so a hostile size makes one huge allocation fail
    (an error the test reports) instead of filling the machine's memory."""
    pages = _memory_pages()
    if pages is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = pages[0] + ADDRESS_SPACE_MARGIN
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_bounded(what: str, call, trace_python: bool = True):
    """Run call() within DEADLINE_S and the memory limits; return (its result, None) or (None, the Exception
    it raised). Running past a bound fails the test with what happened.

    trace_python=False: bound the resident memory only (it holds Python objects too), for calls that build torch
    modules, which tracemalloc slows down about five times."""
    was_tracing = tracemalloc.is_tracing()
    if trace_python and not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    python_base = tracemalloc.get_traced_memory()[0]
    pages = _memory_pages()
    rss_base = pages[1] if pages else None
    started = time.monotonic()

    def check_bounds(signum, frame):
        if time.monotonic() - started > DEADLINE_S:
            raise _OutOfBounds(f"hung: still running after {DEADLINE_S:g} s")
        python = tracemalloc.get_traced_memory()[0] - python_base
        if python > PYTHON_MEMORY_LIMIT and tracemalloc.is_tracing():
            raise _OutOfBounds(f"holds {python / 2 ** 20:.0f} MiB of Python objects")
        now = _memory_pages()
        if rss_base is not None and now and now[1] - rss_base > RSS_GROWTH_LIMIT:
            raise _OutOfBounds(f"grew the resident memory by {(now[1] - rss_base) / 2 ** 20:.0f} MiB")

    previous = signal.signal(signal.SIGALRM, check_bounds)
    previous_timer = signal.setitimer(signal.ITIMER_REAL, TICK_S, TICK_S)
    result = error = None
    try:
        with _address_space_cap():
            result = call()
    except _OutOfBounds as e:
        raise AssertionError(f"{what} {e}") from None
    except _NetworkAttempt as e:
        raise AssertionError(f"{what} opened a connection to {e}") from None
    except Exception as e:
        error = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
        if previous_timer[0]:  # another timer was running (pytest-timeout's, say): it gets what it had left
            left = previous_timer[0] - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), previous_timer[1])
        peak = tracemalloc.get_traced_memory()[1] - python_base if tracemalloc.is_tracing() else 0
        if trace_python and not was_tracing:
            tracemalloc.stop()
    seconds = time.monotonic() - started
    assert seconds <= DEADLINE_S, f"{what} took {seconds:.1f} s (in C code the timer could not interrupt)"
    assert peak <= PYTHON_MEMORY_LIMIT, f"{what} peaked at {peak / 2 ** 20:.0f} MiB of Python objects"
    return result, error


def assert_clean_refusal(what: str, error: Exception, allowed: tuple):
    """`error` is one of the documented types (a UnicodeError is a ValueError leaking from a decoder, never a
    refusal), with a one-line message."""
    if isinstance(error, UnicodeError) or not isinstance(error, allowed):
        raise AssertionError(f"{what} leaked {type(error).__name__}: {str(error)[:300]}") from error
    message = str(error).strip()
    assert message and "\n" not in message, f"{what}: the refusal is not one line: {message[:300]!r}"


def fuzz_settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt (other than to this host) fails the test."""
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and self.family != socket.AF_UNIX:
            raise _NetworkAttempt(str(address))
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        raise _NetworkAttempt(f"{host} (name lookup)")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_bounds_catch_a_hang_and_a_memory_hog(monkeypatch):
    # the harness itself: a reader that never returns, or never stops allocating, fails instead of hanging
    def hog():
        held = []
        while True:
            held.append(bytes(2 ** 20))

    def spin():
        while True:
            pass

    with pytest.raises(AssertionError, match="hog holds .* MiB of Python objects"):
        run_bounded("hog", hog)
    monkeypatch.setitem(globals(), "DEADLINE_S", 0.5)  # not the whole deadline for a loop known to spin
    with pytest.raises(AssertionError, match="spin hung"):
        run_bounded("spin", spin)
    assert type(run_bounded("refusal", lambda: int("x"))[1]) is ValueError
    assert run_bounded("result", lambda: 7) == (7, None)


# ---------------------------------------------------------------------------------------------- tar shards

BLOCK = 512
TAR_ERRORS = (tarfile.TarError, EOFError, ValueError)  # iter_samples: tarfile.ReadError or EOFError (ValueErrors too)
HEADER_FIELDS = {"name": (0, 100), "mode": (100, 108), "uid": (108, 116), "gid": (116, 124), "size": (124, 136),
                 "mtime": (136, 148), "chksum": (148, 156), "typeflag": (156, 157), "linkname": (157, 257),
                 "magic": (257, 265), "uname": (265, 297), "prefix": (345, 500)}
TYPEFLAGS = [b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K", b"S", b"D", b"M",
             b"N", b"V", b"A", b"X"]


def _payload(i: int) -> bytes:
    size = (300, 1024, 1500)[i % 3]  # ends mid-block, on a block boundary, across blocks
    return bytes((i * 7 + j) % 256 for j in range(size))


BASE_SAMPLES = [{"__key__": f"n0144_{i}", "cls": str(i), "jpg": _payload(i)} for i in range(3)]
BASE_TAR = tar_bytes(BASE_SAMPLES)


def _member_offsets(samples) -> list:
    """Where the header of each member of tar_bytes(samples) starts."""
    offsets, pos = [], 0
    for sample in samples:
        for ext in sorted(k for k in sample if not k.startswith("__")):
            offsets.append(pos)
            size = len(sample[ext] if isinstance(sample[ext], bytes) else str(sample[ext]).encode())
            pos += BLOCK + -(-size // BLOCK) * BLOCK
    return offsets


BASE_HEADERS = _member_offsets(BASE_SAMPLES)


def fix_checksum(data: bytearray, at: int):
    """Rewrite the checksum of the header at `at`, so that a mutated header reaches the parser."""
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(data[at:at + BLOCK])


def tar_header(name: bytes, size: int, typeflag: bytes = b"0", linkname: bytes = b"") -> bytes:
    """A USTAR header as tarfile writes it, with any name, kind and link target."""
    head = bytearray(BLOCK)
    head[0:len(name[:100])] = name[:100]
    head[100:136] = b"0000444\0" + b"0000000\0" * 2 + b"%011o\0" % size
    head[136:148] = b"00000000000\0"
    head[156:157] = typeflag
    head[157:157 + len(linkname[:100])] = linkname[:100]
    head[257:265] = b"ustar\x0000"
    fix_checksum(head, 0)
    return bytes(head)


def tar_member(name: bytes, content: bytes, typeflag: bytes = b"0", linkname: bytes = b"") -> bytes:
    """One member: header, content, padding."""
    return tar_header(name, len(content), typeflag, linkname) + content + b"\0" * (-len(content) % BLOCK)


def gzip_bytes(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


def read_shard_bytes(data: bytes, bound: Optional[int] = None):
    """iter_samples(data) consumed fully under the bounds: the samples, and the refusal (checked clean) or None.
    `bound`: the most member bytes the samples may hold (each byte of the tar belongs to one member at most)."""
    samples = []

    def consume():
        for sample in iter_samples(data, name="fuzz.tar"):
            samples.append(sample)

    _, error = run_bounded("iter_samples", consume)
    if error is not None:
        assert_clean_refusal("iter_samples", error, TAR_ERRORS)
    for sample in samples:
        assert isinstance(sample, dict) and isinstance(sample.get("__key__"), str), f"not a sample: {sample!r:.200}"
        for key, value in sample.items():
            assert key == "__key__" or isinstance(value, bytes), f"sample member {key!r} is {type(value).__name__}"
    held = sum(len(v) for s in samples for k, v in s.items() if k != "__key__")
    if bound is not None:
        assert held <= bound, f"iter_samples yielded {held} member bytes from a {bound}-byte tar"
    return samples, error


def test_base_shards_read_back():
    # the fuzzing starts from shards that read: mutations, not the base, are what fails
    samples, error = read_shard_bytes(BASE_TAR, len(BASE_TAR))
    assert error is None and [s["__key__"] for s in samples] == ["n0144_0", "n0144_1", "n0144_2"]
    assert read_shard_bytes(gzip_bytes(BASE_TAR))[0] == samples


def _with_field(field: str, value: bytes, member: int = 0, fix: bool = True) -> bytes:
    data = bytearray(BASE_TAR)
    start, end = HEADER_FIELDS[field]
    at = BASE_HEADERS[member]
    data[at + start:at + end] = value[:end - start].ljust(end - start, b"\0")
    if fix:
        fix_checksum(data, at)
    return bytes(data)


def _before_member(member: int, *inserted: bytes) -> bytes:
    at = BASE_HEADERS[member]
    return BASE_TAR[:at] + b"".join(inserted) + BASE_TAR[at:]


def _pax(records: bytes, member: int = 0) -> bytes:
    return _before_member(member, tar_member(b"././@PaxHeader", records, b"x"))


HOSTILE_TARS = {
    "pax-record-of-length-0": _pax(b"0 path=x\n"),
    "pax-record-of-negative-length": _pax(b"-20 path=x\n" + b"0" * 30),
    "pax-record-without-space": _pax(b"12path=x\n"),
    "pax-record-longer-than-header": _pax(b"999 path=x\n"),
    "pax-record-length-not-a-number": _pax(b"ab path=x\n"),
    "pax-path-not-utf8": _pax(b"14 path=\xff\xfe.jpg\n"),
    "pax-key-not-utf8": _pax(b"10 \xff\xfe=abc\n"),
    "pax-size-record": _pax(b"12 size=100\n"),
    "pax-global-header": _before_member(0, tar_member(b"pax_global_header", b"10 path=a\n", b"g")),
    "gnu-long-name-not-utf8": _before_member(1, tar_member(b"././@LongLink", b"\xff\xfe.jpg\0", b"L")),
    "gnu-long-name-empty": _before_member(1, tar_member(b"././@LongLink", b"", b"L")),
    "size-negative-one-block": _with_field("size", b"-1000"),
    "size-negative-two-blocks": _with_field("size", b"-2000", member=2),
    "size-negative-one": _with_field("size", b"-1"),
    "size-past-the-end": _with_field("size", b"77777777777"),
    "size-base-256": _with_field("size", b"\x80" + b"\0" * 7 + b"\x00\x00\x10\x00"),
    "size-not-octal": _with_field("size", b"9zz"),
    "size-blank": _with_field("size", b"   "),
    "checksum-not-octal": _with_field("chksum", b"zzzzzz\0 ", fix=False),
    "checksum-blank": _with_field("chksum", b"", fix=False),
    "checksum-wrong": _with_field("chksum", b"000001\0 ", fix=False),
    "name-not-utf8": _with_field("name", b"\xff\xfe\xfd.jpg"),
    "name-empty": _with_field("name", b""),
    "name-without-dot": _with_field("name", b"noext"),
    "name-dot-only": _with_field("name", b".jpg"),
    "name-traversal": _with_field("name", b"../../etc/n0144_0.cls"),
    "name-absolute": _with_field("name", b"/etc/n0144_0.cls"),
    "prefix-not-utf8": _with_field("prefix", b"\xff\xfe"),
    "magic-not-ustar-with-prefix": _with_field("magic", b"xxxxx\x0000"),
    "symlink-to-passwd": _before_member(0, tar_member(b"n0144_0.txt", b"", b"2", b"/etc/passwd")),
    "hard-link-to-passwd": _before_member(0, tar_member(b"n0144_0.txt", b"", b"1", b"/etc/passwd")),
    "hard-link": _with_field("typeflag", b"1"),
    "character-device": _with_field("typeflag", b"3"),
    "fifo": _with_field("typeflag", b"6"),
    "gnu-sparse": _with_field("typeflag", b"S"),
    "unknown-typeflag": _with_field("typeflag", b"\xff"),
    "header-cut-in-the-middle": BASE_TAR[:BASE_HEADERS[2] + 200],
    "member-cut-in-the-middle": BASE_TAR[:BASE_HEADERS[1] + BLOCK + 100],
    "no-end-of-archive": BASE_TAR[:-2 * BLOCK],
    "empty": b"",
    "one-byte": b"\0",
    "zeros-short-of-a-block": bytes(BLOCK - 1),
    "header-repeated": BASE_TAR[:BLOCK] * 4 + BASE_TAR,
    "gzip-cut": gzip_bytes(BASE_TAR)[:200],
    "gzip-magic-only": b"\x1f\x8b",
    "gzip-with-trailing-garbage": gzip_bytes(BASE_TAR) + b"garbage!",
    "gzip-of-a-damaged-tar": gzip_bytes(_pax(b"0 path=x\n")),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tars_end_cleanly(case):
    data = HOSTILE_TARS[case]
    read_shard_bytes(data, len(data) if data[:2] != b"\x1f\x8b" else None)


def _octal_size(n: int) -> bytes:
    return b"%o" % n if n >= 0 else b"-%o" % -n


def field_values(field: str, width: int):
    """Values for one header field: plausible, boundary and garbage."""
    garbage = st.binary(max_size=width)
    if field == "size":
        return st.one_of(st.integers(-2 ** 14, 2 ** 14).map(_octal_size),
                         st.integers(-2 ** 40, 2 ** 40).map(_octal_size),
                         st.sampled_from([b"", b" ", b"-1", b"-1000", b"77777777777", b"0o17", b"1_0", b"+10",
                                          b"\x80" + bytes(7) + b"\x7f\xff\xff\xff", b"\xff" * 12]), garbage)
    if field == "typeflag":
        return st.one_of(st.sampled_from(TYPEFLAGS), st.binary(min_size=1, max_size=1))
    if field in ("name", "prefix", "linkname"):
        return st.one_of(st.sampled_from([b"", b".", b"..", b"/", b"noext", b".jpg", b"a.b.c", b"__key__.cls",
                                          b"../../etc/x.jpg", b"/abs/x.jpg", b"\xff\xfe.jpg", b"x" * width,
                                          b"dir/" * 20 + b"y.cls", b"a\x00b.jpg"]),
                         st.text(max_size=30).map(lambda s: s.encode("utf-8")), garbage)
    return st.one_of(st.integers(-2 ** 20, 2 ** 40).map(_octal_size), garbage)


pax_keys = st.sampled_from(["path", "size", "linkpath", "mtime", "uid", "comment", "hdrcharset", "GNU.sparse.size",
                            "GNU.sparse.map", "SCHILY.xattr.a", "", "=", "\xe9"])
pax_values = st.one_of(st.text(max_size=20), st.integers(-10, 2 ** 70).map(str),
                       st.sampled_from(["n0144_0.jpg", "../x.cls", "/abs.jpg", "", "a\nb"]))


def _pax_record(key: str, value: str) -> bytes:
    """A well-formed '<length> key=value\\n' record (the length counts its own digits)."""
    body = b" %s=%s\n" % (key.encode(), value.encode())
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return b"%d%s" % (length, body)


pax_records = st.one_of(
    st.builds(_pax_record, pax_keys, pax_values),
    st.builds(lambda n, rest: b"%d %s\n" % (n, rest), st.integers(-5, 300), st.binary(max_size=40)),
    st.binary(max_size=40),
)


@st.composite
def tar_mutations(draw):
    """A list of mutations of the base tar (applied by `mutate_tar`): header fields rewritten (checksum mostly
    recomputed), a pax, GNU long-name or other member inserted, blocks duplicated or dropped, bits flipped, the
    end cut. Small values, so that a failing example prints readably."""
    ops = []
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(sorted(HEADER_FIELDS)))
        start, end = HEADER_FIELDS[field]
        fix = field != "chksum" and draw(st.sampled_from([True, True, True, False]))  # else it stops at the checksum
        ops.append(("field", draw(st.integers(0, len(BASE_HEADERS) - 1)), field, draw(field_values(field, end - start)),
                    fix))
    inserted = draw(st.sampled_from([None, "pax", "long-name", "member"]))
    if inserted == "pax":
        ops.append(("insert", draw(st.integers(0, len(BASE_HEADERS) - 1)), b"././@PaxHeader",
                    b"".join(draw(st.lists(pax_records, max_size=4))), draw(st.sampled_from([b"x", b"g"]))))
    elif inserted == "long-name":
        ops.append(("insert", draw(st.integers(0, len(BASE_HEADERS) - 1)), b"././@LongLink",
                    draw(field_values("name", 200)), draw(st.sampled_from([b"L", b"K"]))))
    elif inserted == "member":
        ops.append(("insert", draw(st.integers(0, len(BASE_HEADERS) - 1)), draw(field_values("name", 100)),
                    draw(st.binary(max_size=600)), draw(st.sampled_from(TYPEFLAGS))))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["duplicate-block", "drop-block", "flip"]))
        ops.append((kind, draw(st.integers(0, 2 ** 16)), draw(st.integers(1, 255))))
    if draw(st.booleans()):
        ops.append(("cut", draw(st.integers(0, 2 ** 16))))
    return ops


def mutate_tar(ops) -> bytes:
    """The base tar with `ops` (from tar_mutations) applied in order; offsets wrap around the current length."""
    data = bytearray(BASE_TAR)
    for op in ops:
        if op[0] == "field":
            _, member, field, value, fix = op
            start, end = HEADER_FIELDS[field]
            at = BASE_HEADERS[member]
            data[at + start:at + end] = value[:end - start].ljust(end - start, b"\0")
            if fix:
                fix_checksum(data, at)
        elif op[0] == "insert":
            _, member, name, content, typeflag = op
            at = BASE_HEADERS[member]
            data[at:at] = tar_member(name, content, typeflag)
        elif op[0] == "flip":
            data[op[1] % len(data)] ^= op[2]
        elif op[0] in ("duplicate-block", "drop-block"):
            block = op[1] % max(1, len(data) // BLOCK) * BLOCK
            if op[0] == "duplicate-block":
                data[block:block] = data[block:block + BLOCK]
            else:
                del data[block:block + BLOCK]
        elif op[0] == "cut":
            del data[op[1] % (len(data) + 1):]
    return bytes(data)


@fuzz_settings(150)
@given(ops=tar_mutations(), compress=st.booleans())
def test_mutated_tars_end_cleanly(ops, compress):
    data = mutate_tar(ops)
    read_shard_bytes(gzip_bytes(data) if compress else data, len(data))


@fuzz_settings(60)
@given(edits=st.lists(st.tuples(st.integers(0, 2 ** 20), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.none() | st.integers(0, 2 ** 20))
def test_mutated_gzip_streams_end_cleanly(edits, cut):
    data = bytearray(gzip_bytes(BASE_TAR))
    for at, value in edits:
        data[at % len(data)] = value
    if cut is not None:
        del data[cut % (len(data) + 1):]
    read_shard_bytes(bytes(data))


def test_randomly_mutated_tars_end_cleanly():
    """Plain seeded random mutations, many and cheap: bytes overwritten, mostly inside headers, checksums
    recomputed so that most of them reach the parser."""
    rng = random.Random(20240601)
    failures = {}
    for i in range(400):
        data = bytearray(BASE_TAR)
        for _ in range(rng.randint(1, 6)):
            start, end = rng.choice(list(HEADER_FIELDS.values())) if rng.random() < 0.7 else (0, BLOCK)
            data[rng.choice(BASE_HEADERS) + rng.randrange(start, end)] = rng.randrange(256)
        if rng.random() < 0.8:
            for at in BASE_HEADERS:
                fix_checksum(data, at)
        if rng.random() < 0.2:
            del data[rng.randrange(len(data)):]
        if rng.random() < 0.3:
            data = bytearray(gzip_bytes(bytes(data)))
        try:
            read_shard_bytes(bytes(data), None if data[:2] == b"\x1f\x8b" else len(data))
        except AssertionError as e:
            failures.setdefault(str(e).split(":")[0][:120], (i, str(e)[:200]))
            if "hung" in str(e):
                break  # each hang costs the whole deadline: one is enough to report
    assert not failures, "mutations that fail (kind: first iteration, message):\n" + "\n".join(
        f"  {i}: {message}" for i, message in failures.values())


# ---------------------------------------------------------------------------------------------- manifests

MANIFEST_ERRORS = (ShardError, ValueError)
SECRET_LABEL = 199  # the label of the shard outside the shards folder: seen in a batch, a file outside was read


BASE_MANIFEST = {  # as tinycnn-prepare writes it, for the folder `shards_folder` makes
    "format": "tinycnn-shards", "format_version": 2, "tinycnn_version": "0.1.0",
    "source": {"kind": "folder", "path": "/data/tiny-imagenet-200", "size": 1000, "fingerprint": "sha256:00"},
    "seed": 0, "holdout_per_class": 50, "compress": False, "num_classes": 3, "input_shape": [3, 64, 64],
    "classes": [{"wnid": f"n0000000{i}", "name": f"class {i}"} for i in range(3)],
    "splits": {
        "train": {"num_samples": 5, "grayscale": 0, "class_counts": [2, 2, 1],
                  "shards": [{"file": "train-00000.tar", "num_samples": 3},
                             {"file": "train-00001.tar", "num_samples": 2}]},
        "val": {"num_samples": 2, "grayscale": 0, "class_counts": [0, 0, 2],
                "shards": [{"file": "val-00000.tar", "num_samples": 2}]},
    },
    "skipped": [],
}


def _jpeg(shade: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (shade, 255 - shade, 80)).save(buffer, "JPEG")
    return buffer.getvalue()


def _shard_samples(prefix: str, labels) -> list:
    return [{"__key__": f"{prefix}_{i}", "cls": str(label), "jpg": _jpeg(40 * i)} for i, label in enumerate(labels)]


@pytest.fixture(scope="module")
def shards_folder(tmp_path_factory):
    """A small prepared folder (its manifest rewritten by each example), a valid shard outside it, and the path
    of a file a shell command smuggled into a manifest would create."""
    base = tmp_path_factory.mktemp("fuzz-manifest")
    root, outside = base / "shards", base / "outside"
    root.mkdir()
    outside.mkdir()
    layout = {"train-00000.tar": [0, 1, 2], "train-00001.tar": [1, 0], "val-00000.tar": [2, 2]}
    for file, labels in layout.items():
        (root / file).write_bytes(tar_bytes(_shard_samples(file.split(".")[0], labels)))
    (outside / "secret.tar").write_bytes(tar_bytes(_shard_samples("secret", [SECRET_LABEL] * 2)))
    return {"root": root, "outside": outside / "secret.tar", "marker": base / "ran-a-command",
            "manifest": BASE_MANIFEST}


def _placeholders(value, folder):
    """Fill {marker} and {outside} in generated strings with this run's paths."""
    if isinstance(value, str):
        return value.replace("{marker}", str(folder["marker"])).replace("{outside}", str(folder["outside"]))
    if isinstance(value, list):
        return [_placeholders(v, folder) for v in value]
    if isinstance(value, dict):
        return {_placeholders(k, folder): _placeholders(v, folder) for k, v in value.items()}
    return value


def load_split(folder, manifest_bytes: bytes, *, through_pipe: bool = False):
    """Write the manifest, then read_manifest and build_loader(root, "train", ...) and every batch, under the bounds.

    through_pipe: read the folder through a `pipe:cat DIR/{}` root, so that a file name becomes part of a
    shell command (as webdataset's pipe: URLs do)."""
    root = folder["root"]
    (root / "manifest.json").write_bytes(manifest_bytes)
    folder["marker"].unlink(missing_ok=True)
    location = f"pipe:cat {shlex.quote(str(root))}/{{}}" if through_pipe else root
    options = {"retries": 0} if through_pipe else {}  # a failed command is retried with backoff otherwise
    batches = []

    def read():
        read_manifest(location, **options)
        loader = build_loader(location, "train", batch_size=2, train=False, num_workers=0, **options)
        for batch in loader:
            batches.append(batch)

    _, error = run_bounded("read_manifest + build_loader", read)
    assert not folder["marker"].exists(), "a file name in the manifest ran a shell command"
    if error is not None:
        no_split = isinstance(error, KeyError) and "has no split" in str(error)  # build_loader's documented refusal
        if not no_split:
            assert_clean_refusal("read_manifest + build_loader", error, MANIFEST_ERRORS)
    for images, labels in batches:
        assert images.dtype == torch.uint8 and images.dim() == 4 and labels.shape == (len(images),)
        assert SECRET_LABEL not in labels.tolist(), "the manifest made the loader read a shard outside its folder"
    return batches, error


def _manifest_with(folder, edit) -> bytes:
    manifest = json.loads(json.dumps(folder["manifest"]))
    edit(manifest)
    return json.dumps(_placeholders(manifest, folder)).encode()


def test_base_manifest_loads(shards_folder):
    batches, error = load_split(shards_folder, json.dumps(shards_folder["manifest"]).encode())
    assert error is None and sum(len(labels) for _, labels in batches) == 5


def _set(path, value, *more):
    """An edit of a manifest: the value at `path` replaced (then the next path, value pair in `more`)."""
    def edit(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        if more:
            _set(*more)(manifest)
    return edit


SHARD0 = ("splits", "train", "shards", 0)
HOSTILE_MANIFESTS = {
    "not-utf8": b'{"splits": {"train": {"shards": [], "num_samples": 0}}, "x": "\xff\xfe"}',
    "utf16": json.dumps({"splits": {}}).encode("utf-16"),
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep-nesting-in-a-split": b'{"splits": {"train": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
    "huge-number": b'{"splits": {"train": {"num_samples": 1' + b"0" * 5000 + b"}}}",
    "not-an-object": b"[1, 2, 3]",
    "null": b"null",
    "empty": b"",
    "binary": bytes(range(256)),
}
HOSTILE_MANIFEST_EDITS = {
    "splits-a-list": _set(("splits",), []),
    "split-a-string": _set(("splits", "train"), "train-00000.tar"),
    "shards-a-dict": _set(("splits", "train", "shards"), {"file": "train-00000.tar"}),
    "shard-a-string": _set(SHARD0, "train-00000.tar"),
    "shard-without-file": _set(SHARD0, {"num_samples": 3}),
    "file-a-number": _set(SHARD0 + ("file",), 7),
    "file-null": _set(SHARD0 + ("file",), None),
    "file-empty": _set(SHARD0 + ("file",), ""),
    "file-the-folder-itself": _set(SHARD0 + ("file",), "."),
    "file-traversal": _set(SHARD0 + ("file",), "../outside/secret.tar"),
    "file-absolute": _set(SHARD0 + ("file",), "{outside}"),
    "file-nul-byte": _set(SHARD0 + ("file",), "train-00000.tar\0"),
    "file-very-long": _set(SHARD0 + ("file",), "x" * 5000),
    "count-negative": _set(SHARD0 + ("num_samples",), -3),
    "count-huge": _set(SHARD0 + ("num_samples",), 10 ** 30),
    "count-past-float": _set(SHARD0 + ("num_samples",), 10 ** 400),
    "count-infinite": _set(SHARD0 + ("num_samples",), float("inf")),
    "count-nan": _set(SHARD0 + ("num_samples",), float("nan")),
    "count-a-float": _set(SHARD0 + ("num_samples",), 2.5),
    "count-a-string": _set(SHARD0 + ("num_samples",), "3"),
    "count-too-high": _set(SHARD0 + ("num_samples",), 1000),
    "split-without-shards": _set(("splits", "train", "shards"), [], ("splits", "train", "num_samples"), 0),
    "shard-bytes-below-its-size": _set(SHARD0 + ("bytes",), 10),
    "shard-bytes-negative": _set(SHARD0 + ("bytes",), -1),
    "shard-tar-bytes-huge": _set(SHARD0 + ("tar_bytes",), 2 ** 62),
    "input-shape-a-number": _set(("input_shape",), 64),
    "input-shape-huge": _set(("input_shape",), [3, 10 ** 9, 10 ** 9]),
    "input-shape-strings": _set(("input_shape",), "abc"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS) + sorted(HOSTILE_MANIFEST_EDITS))
def test_hostile_manifests_end_cleanly(shards_folder, case):
    if case in HOSTILE_MANIFESTS:
        data = HOSTILE_MANIFESTS[case]
    else:
        data = _manifest_with(shards_folder, HOSTILE_MANIFEST_EDITS[case])
    load_split(shards_folder, data)


def test_gzip_bomb_shard_is_refused_within_bounds(shards_folder):
    # one 256 MiB member in ~1 MiB of gzip, listed as one sample: a shard costs memory in proportion to what
    # its manifest entry says it holds, not to what it decompresses to
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunk = bytes(2 ** 20)
    bomb = b"".join([z.compress(tar_header(b"a.jpg", 256 * len(chunk)))] + [z.compress(chunk) for _ in range(256)]
                    + [z.compress(bytes(2 * BLOCK)), z.flush()])
    assert len(bomb) < 2 ** 21
    (shards_folder["root"] / "bomb-00000.tar.gz").write_bytes(bomb)
    manifest = _manifest_with(shards_folder, _set(("splits", "train", "shards"),
                                                  [{"file": "bomb-00000.tar.gz", "num_samples": 1}]))
    batches, error = load_split(shards_folder, manifest)
    assert error is not None and not batches


@pytest.mark.parametrize("name", ["$(touch {marker})", "`touch {marker}`", "x; touch {marker}", "x && touch {marker}",
                                  "x | touch {marker}", "x\ntouch {marker}"])
def test_shard_names_never_run_commands(shards_folder, name):
    # the manifest comes from the data's publisher; the pipe: root is the user's own command
    load_split(shards_folder, _manifest_with(shards_folder, _set(SHARD0 + ("file",), name)), through_pipe=True)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
hostile_names = st.sampled_from([
    "train-00000.tar", "../outside/secret.tar", "{outside}", "sub/../train-00000.tar", "/", ".", "..", "",
    "$(touch {marker})", "`touch {marker}`", "x; touch {marker}", "pipe:touch {marker}", "http://127.0.0.1:9/x.tar",
    "train-00000.tar\0", "\xe9.tar", "x" * 300, "val-00000.tar"])
hostile_numbers = st.sampled_from([-1, 0, 1, 2, 3, 10 ** 18, -10 ** 18, 10 ** 400, 1e308, float("inf"),
                                   float("nan"), 2.5, True, "5", None])


def _paths(node, prefix=()):
    """Every path into a JSON value."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


@st.composite
def mutated_manifests(draw, base):
    manifest = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(manifest))[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        value = draw(st.one_of(hostile_names, hostile_numbers, json_values))
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["file", "num_samples", "bytes", "tar_bytes", "shards", "train", "splits",
                                         "input_shape", "extra"]))] = value
        elif kind == "add":
            parent.append(value)
        else:
            parent[path[-1]] = value
    return manifest


@fuzz_settings(80)
@given(manifest=mutated_manifests(BASE_MANIFEST), through_pipe=st.sampled_from([False, False, True]))
def test_mutated_manifests_end_cleanly(shards_folder, manifest, through_pipe):
    data = json.dumps(_placeholders(manifest, shards_folder), allow_nan=True).encode()
    load_split(shards_folder, data, through_pipe=through_pipe)


@fuzz_settings(60)
@given(manifest=json_values)
def test_generated_json_manifests_end_cleanly(shards_folder, manifest):
    load_split(shards_folder, json.dumps(manifest).encode())


@fuzz_settings(40)
@given(data=st.one_of(st.binary(max_size=200),
                      st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=8)).map(
                          lambda t: json.dumps(BASE_MANIFEST).encode()[:t[0]] + t[1]
                          + json.dumps(BASE_MANIFEST).encode()[t[0] + len(t[1]):])))
def test_raw_manifest_bytes_end_cleanly(shards_folder, data):
    load_split(shards_folder, data)


# ---------------------------------------------------------------------------------------------- safetensors

WEIGHTS_ERRORS = (WeightsError,)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A valid tinycnn weights file: (its bytes, its header, the tinycnn description in it)."""
    torch.manual_seed(0)
    model = timm.create_model("tinycnn", num_classes=10, stage_channels=[8, 16, 32], stage_repeats=[1, 1, 1])
    path = save_model(model, tmp_path_factory.mktemp("fuzz-weights") / "base.safetensors")
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    return data, header, json.loads(header["__metadata__"]["tinycnn"])


def safetensors_bytes(header, body: bytes, length: Optional[int] = None) -> bytes:
    """8-byte little-endian header length (the true one unless `length` is given), JSON header, tensor bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(text) if length is None else length % 2 ** 64) + text + body


def load_weights(path: Path, data: bytes):
    """read_metadata and load_model on `data` written at `path`, under the bounds; checks what they return."""
    path.write_bytes(data)
    meta, error = run_bounded("read_metadata", lambda: read_metadata(path))
    if error is not None:
        assert_clean_refusal("read_metadata", error, WEIGHTS_ERRORS)
    else:
        assert isinstance(meta, dict), f"read_metadata returned a {type(meta).__name__}, not a description"
    model, error = run_bounded("load_model", lambda: load_model(path), trace_python=False)
    if error is not None:
        assert_clean_refusal("load_model", error, WEIGHTS_ERRORS)
        return None
    assert isinstance(model, torch.nn.Module)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert held <= len(data), f"load_model built a model of {held} bytes from a {len(data)}-byte file"
    return model


def test_base_weights_load(weights_file, tmp_path, no_network):
    data, header, meta = weights_file
    assert meta["stage_channels"] == [8, 16, 32]
    assert load_weights(tmp_path / "w.safetensors", safetensors_bytes(header, _body(weights_file)))


def _body(weights_file) -> bytes:
    data = weights_file[0]
    return data[8 + struct.unpack("<Q", data[:8])[0]:]


def _with_meta(weights_file, **changes) -> bytes:
    data, header, meta = weights_file
    header = json.loads(json.dumps(header))
    meta = {**meta, **changes}
    header["__metadata__"]["tinycnn"] = json.dumps({k: v for k, v in meta.items() if v is not _DROP})
    return safetensors_bytes(header, _body(weights_file))


def _with_header(weights_file, edit) -> bytes:
    header = json.loads(json.dumps(weights_file[1]))
    edit(header)
    return safetensors_bytes(header, _body(weights_file))


_DROP = object()
HOSTILE_WEIGHTS = {
    "length-past-the-end": lambda w: safetensors_bytes(w[1], _body(w), 10 ** 6),
    "length-huge": lambda w: safetensors_bytes(w[1], _body(w), 2 ** 64 - 1),
    "length-zero": lambda w: safetensors_bytes(w[1], _body(w), 0),
    "file-too-short": lambda w: w[0][:5],
    "header-not-json": lambda w: safetensors_bytes(b"{not json", _body(w)),
    "header-not-utf8": lambda w: safetensors_bytes(b'{"__metadata__": {"tinycnn": "\xff"}}', b""),
    "metadata-deep-nesting": lambda w: _with_header(w, lambda h: h["__metadata__"].update(
        tinycnn="[" * 100_000 + "]" * 100_000)),
    "metadata-not-json": lambda w: _with_header(w, lambda h: h["__metadata__"].update(tinycnn="{oops")),
    "metadata-a-list": lambda w: _with_header(w, lambda h: h["__metadata__"].update(tinycnn="[1, 2]")),
    "metadata-a-number": lambda w: _with_header(w, lambda h: h["__metadata__"].update(tinycnn="7")),
    "metadata-empty-object": lambda w: _with_header(w, lambda h: h["__metadata__"].update(tinycnn="{}")),
    "no-metadata": lambda w: _with_header(w, lambda h: h.pop("__metadata__")),
    "tensor-offsets-reversed": lambda w: _with_header(w, lambda h: h["head.fc.bias"].update(data_offsets=[64, 24])),
    "tensor-shape-lies": lambda w: _with_header(w, lambda h: h["head.fc.bias"].update(shape=[10 ** 12])),
    "tensor-dtype-unknown": lambda w: _with_header(w, lambda h: h["head.fc.bias"].update(dtype="Q4")),
    "tensor-renamed": lambda w: _with_header(w, lambda h: h.update({"evil": h.pop("head.fc.bias")})),
    "architecture-unknown": lambda w: _with_meta(w, architecture="not_a_model", stage_channels=_DROP,
                                                 stage_repeats=_DROP),
    "architecture-from-the-hub": lambda w: _with_meta(w, architecture="hf-hub:timm/resnet18.a1_in1k",
                                                      stage_channels=_DROP, stage_repeats=_DROP),
    "architecture-from-a-folder": lambda w: _with_meta(w, architecture="local-dir:/", stage_channels=_DROP,
                                                       stage_repeats=_DROP),
    "architecture-huge-model": lambda w: _with_meta(w, architecture="vit_huge_patch14_224", stage_channels=_DROP,
                                                    stage_repeats=_DROP),
    "model-args-checkpoint-path": lambda w: _with_meta(w, architecture="resnet10t", stage_channels=_DROP,
                                                       stage_repeats=_DROP,
                                                       model_args={"checkpoint_path": "/etc/passwd"}),
    "model-args-pretrained": lambda w: _with_meta(w, architecture="resnet10t", stage_channels=_DROP,
                                                  stage_repeats=_DROP, model_args={"pretrained": True}),
    "model-args-not-a-dict": lambda w: _with_meta(w, architecture="resnet10t", stage_channels=_DROP,
                                                  stage_repeats=_DROP, model_args=[1, 2]),
    "stage-channels-mismatch": lambda w: _with_meta(w, stage_channels=[8, 16, 33]),
    "stage-channels-huge": lambda w: _with_meta(w, stage_channels=[8, 16, 2 ** 40]),
    "stage-channels-big": lambda w: _with_meta(w, stage_channels=[8, 16, 4096]),
    "stage-channels-negative": lambda w: _with_meta(w, stage_channels=[8, -16, 32]),
    "stage-channels-a-string": lambda w: _with_meta(w, stage_channels="8,16,32"),
    "stage-repeats-huge": lambda w: _with_meta(w, stage_repeats=[1, 1, 10 ** 6]),
    "stage-repeats-missing": lambda w: _with_meta(w, stage_repeats=_DROP),
    "num-classes-missing": lambda w: _with_meta(w, num_classes=_DROP),
    "num-classes-a-string": lambda w: _with_meta(w, num_classes="10"),
    "num-classes-huge": lambda w: _with_meta(w, num_classes=2 ** 40),
    "in-chans-huge": lambda w: _with_meta(w, in_chans=2 ** 40),
    "mean-a-number": lambda w: _with_meta(w, mean=0.5),
    "input-size-a-string": lambda w: _with_meta(w, input_size="64"),
    "classes-a-number": lambda w: _with_meta(w, classes=5),
    "class-names-without-classes": lambda w: _with_meta(w, class_names=["a", "b"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_WEIGHTS))
def test_hostile_weights_end_cleanly(weights_file, tmp_path, no_network, case):
    load_weights(tmp_path / "w.safetensors", HOSTILE_WEIGHTS[case](weights_file))


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "",
          "f32", "Q4"]
small_ints = st.one_of(st.integers(-2, 64), st.sampled_from([2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64, 2 ** 70]))
tensor_fields = {
    "dtype": st.one_of(st.sampled_from(DTYPES), json_values),
    "shape": st.one_of(st.lists(small_ints, max_size=4), json_values),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-2, 30_000), small_ints), max_size=3), json_values),
}
ARCHITECTURES = ["tinycnn", "tinycnn_narrow", "resnet10t", "not_a_model", "", "local-dir:/nonexistent"]
channels = st.one_of(st.integers(-2, 64), st.sampled_from([0, 4096, 2 ** 20, 2 ** 40]))
meta_fields = {
    "architecture": st.one_of(st.sampled_from(ARCHITECTURES), json_values),
    "stage_channels": st.one_of(st.lists(channels, max_size=5), json_values),
    "stage_repeats": st.one_of(st.lists(st.integers(-1, 4), max_size=5), json_values),
    "num_classes": st.one_of(small_ints, json_values),
    "in_chans": st.one_of(small_ints, json_values),
    "mean": st.one_of(st.lists(st.floats(), max_size=4), json_values),
    "std": st.one_of(st.lists(st.floats(), max_size=4), json_values),
    "input_size": st.one_of(st.lists(small_ints, max_size=4), json_values),
    "classes": st.one_of(st.lists(st.text(max_size=8), max_size=12), json_values),
    "class_names": st.one_of(st.lists(st.text(max_size=8), max_size=12), json_values),
    "extra": json_values,
    "model_args": st.dictionaries(st.sampled_from(["checkpoint_path", "pretrained", "features_only", "drop_rate",
                                                   "global_pool", "img_size", "depth", "embed_dim", "num_classes"]),
                                  json_values, max_size=3),
}


@st.composite
def mutated_weights(draw, base):
    """(header, body, length field or None) of the base file with tensor entries, metadata or the length
    field changed."""
    data, header, meta = base
    header, meta = json.loads(json.dumps(header)), json.loads(json.dumps(meta))
    body = data[8 + struct.unpack("<Q", data[:8])[0]:]
    tensors = sorted(k for k in header if k != "__metadata__")
    length = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["tensor", "tensor", "meta", "meta", "meta", "metadata", "drop-tensor",
                                     "length", "body"]))
        if kind == "tensor":
            name, field = draw(st.sampled_from(tensors)), draw(st.sampled_from(sorted(tensor_fields)))
            header.setdefault(name, {})[field] = draw(tensor_fields[field])
        elif kind == "meta":
            field = draw(st.sampled_from(sorted(meta_fields)))
            if draw(st.booleans()) and field in meta:
                del meta[field]
            else:
                meta[field] = draw(meta_fields[field])
        elif kind == "metadata":
            header["__metadata__"] = draw(st.one_of(json_values, st.dictionaries(st.sampled_from(["tinycnn", "format"]),
                                                                                   json_values, max_size=2)))
        elif kind == "drop-tensor":
            header.pop(draw(st.sampled_from(tensors)), None)
        elif kind == "length":
            length = draw(st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(-16, 16)))
        else:
            body = body[:draw(st.integers(0, len(body)))] + draw(st.binary(max_size=64))
    if isinstance(header.get("__metadata__"), dict) and "tinycnn" in header["__metadata__"]:
        if isinstance(header["__metadata__"]["tinycnn"], str):
            header["__metadata__"]["tinycnn"] = json.dumps(meta, allow_nan=True)
    if length is not None and -16 <= length <= 16:
        length = len(json.dumps(header, allow_nan=True).encode()) + length  # near the true length
    return header, body, length


@fuzz_settings(100)
@given(data=st.data())
def test_mutated_weights_end_cleanly(weights_file, tmp_path, no_network, data):
    header, body, length = data.draw(mutated_weights(weights_file))
    load_weights(tmp_path / "w.safetensors", safetensors_bytes(header, body, length))


def test_randomly_mutated_weight_headers_end_cleanly(weights_file, tmp_path, no_network):
    """Plain seeded random byte changes inside the JSON header (tensor entries and the escaped tinycnn
    description): mostly invalid JSON for safetensors' parser, sometimes a description that still parses."""
    rng = random.Random(20240602)
    data = weights_file[0]
    length = struct.unpack("<Q", data[:8])[0]
    for i in range(60):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[8 + rng.randrange(length)] = rng.choice([rng.randrange(256), *b'"{}[],:-0123456789\\'])
        try:
            load_weights(tmp_path / "w.safetensors", bytes(mutated))
        except AssertionError as e:
            raise AssertionError(f"iteration {i}: {e}") from None


# ---------------------------------------------------------------------------------------------- YAML configs

CONFIG_ERRORS = (ConfigError,)


def load_yaml_config(path: Path, text: bytes, check_model: bool = False):
    """read_yaml and load_config on `text` written at `path`, under the bounds.

    load_config parses the file again: its Python memory was traced in read_yaml, so it runs untraced (the
    resident memory still bounded) at a fraction of the time. check_model: also look the model name up in timm
    (slower: the hostile cases only)."""
    path.write_bytes(text)
    data, error = run_bounded("read_yaml", lambda: read_yaml(path))
    if error is not None:
        assert_clean_refusal("read_yaml", error, CONFIG_ERRORS)
    else:
        assert isinstance(data, dict)
    cfg, error = run_bounded("load_config", lambda: load_config(path, check_model=check_model), trace_python=False)
    if error is not None:
        assert_clean_refusal("load_config", error, CONFIG_ERRORS)
    else:
        assert isinstance(cfg, Config)
    return cfg


def _alias_bomb(depth: int, width: int, key: str = "stage_channels") -> bytes:
    lines = ["a0: &a0 [1, 2]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth + 1)]
    return ("\n".join(lines) + f"\n{key}: *a{depth}\n").encode()


HOSTILE_YAML = {
    "alias-bomb": _alias_bomb(9, 9),
    "alias-bomb-in-a-known-key-only": b"stage_channels: &a [&b [&c [1, 2], *c, *c], *b, *b]\ntrain: {epochs: *a}\n",
    "deep-flow-nesting": b"train: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "deep-mapping-nesting": b"train: " + b"{a: " * 5000 + b"1" + b"}" * 5000 + b"\n",
    "deep-block-nesting": "".join(f"{' ' * i}a:\n" for i in range(3000)).encode(),
    "not-utf8": b"run_name: \xff\xfe\n",
    "utf16": "run_name: x\n".encode("utf-16"),
    "huge-integer": b"train: {epochs: " + b"9" * 5000 + b"}\n",
    "huge-exponent": b"train: {optimizer: {lr: 1e99999}}\n",
    "python-object-tag": b"model: !!python/object/apply:os.system ['touch {marker}']\n",
    "python-name-tag": b"model: !!python/name:os.system\n",
    "binary-tag": b"run_name: !!binary aGVsbG8=\n",
    "timestamp": b"run_name: 2024-01-01\n",
    "integer-key": b"1: 2\n",
    "null-key": b"~: 2\n",
    "boolean-key": b"yes: 2\n",
    "key-in-a-section": b"train: {1: 2}\n",
    "merge-key": b"base: &b {epochs: 2}\ntrain: {<<: *b}\n",
    "duplicate-keys": b"train: {epochs: 2, epochs: 3}\n",
    "list-at-the-top": b"- 1\n- 2\n",
    "nan-rate": b"train: {optimizer: {lr: .nan}}\n",
    "tabs": b"train:\n\tepochs: 2\n",
    "control-characters": b"run_name: \"\x00\x07\"\n",
    "huge-model-name": b"model: " + b"x" * 20_000 + b"\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_yaml_ends_cleanly(tmp_path, case):
    marker = tmp_path / "ran-a-command"
    load_yaml_config(tmp_path / "config.yaml", HOSTILE_YAML[case].replace(b"{marker}", str(marker).encode()),
                     check_model=True)
    assert not marker.exists(), "a YAML tag ran a command"


RECIPE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))


def test_randomly_mutated_recipe_configs_end_cleanly(tmp_path):
    """Plain seeded random changes to the project's own recipe configs: bytes replaced, YAML punctuation
    inserted, lines duplicated or cut."""
    assert RECIPE_CONFIGS, "no recipes/configs/*.yaml to start from"
    rng = random.Random(20240603)
    for i in range(60):
        text = bytearray(rng.choice(RECIPE_CONFIGS).read_bytes())
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(text) + 1)
            kind = rng.randrange(3)
            if kind == 0 and at < len(text):
                text[at] = rng.randrange(256)
            elif kind == 1:
                text[at:at] = rng.choice([b"&a ", b"*a", b"[", b"{", b": ", b"\n  ", b"- ", b"!!binary ", b"\xff",
                                          b"9" * 50])
            else:
                line = text.rfind(b"\n", 0, at) + 1
                end = text.find(b"\n", at)
                text[line:line] = text[line:end + 1 if end >= 0 else len(text)]
        try:
            load_yaml_config(tmp_path / "config.yaml", bytes(text))
        except AssertionError as e:
            raise AssertionError(f"iteration {i}: {e}") from None


def _known_keys():
    out = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + (key,))
            else:
                out.append(prefix + (key,))
    walk(Config().to_dict(), ())
    return out


KNOWN_KEYS = _known_keys()
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(),
                         st.text(max_size=12), st.sampled_from(["auto", "no", "cpu", "cuda:0", "sgd", "1e-3", "0x10",
                                                                "inf", ".inf", "~", "yes", "tinycnn", "resnet10t"]))
yaml_values = st.one_of(yaml_scalars, st.lists(yaml_scalars, max_size=4),
                        st.dictionaries(st.text(max_size=6) | st.integers(), yaml_scalars, max_size=3))


@st.composite
def generated_configs(draw):
    """A mapping of known keys (some unknown or not strings) to random values, as YAML text."""
    data = {}
    for path in draw(st.lists(st.sampled_from(KNOWN_KEYS), max_size=6)):
        node = data
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = draw(yaml_values)
    for _ in range(draw(st.integers(0, 2))):
        where = data if draw(st.booleans()) or not data else data.setdefault("train", {})
        if isinstance(where, dict):
            where[draw(st.one_of(st.sampled_from(["trian", "epochs", "lr", "data", "train"]), st.integers(),
                                 st.none(), st.booleans()))] = draw(yaml_values)
    return yaml.safe_dump(data, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.booleans()),
                          sort_keys=False).encode()


@fuzz_settings(100)
@given(text=generated_configs())
def test_generated_yaml_configs_end_cleanly(tmp_path, text):
    load_yaml_config(tmp_path / "config.yaml", text)


@fuzz_settings(80)
@given(text=generated_configs(), edits=st.lists(st.tuples(st.integers(0, 2 ** 16), st.one_of(
    st.binary(min_size=1, max_size=4),
    st.sampled_from([b"&a ", b"*a", b"<<: *a\n", b"[", b"]", b"{", b"}", b"!!binary ", b"!!set ", b"? ", b": ",
                     b"\n  ", b"\t", b"- ", b"|\n", b"%YAML 1.1\n---\n", b"\xff", b"\x00", b"9" * 5000]))), max_size=4),
       nesting=st.none() | st.integers(1, 3000), bomb=st.none() | st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_mutated_yaml_configs_end_cleanly(tmp_path, text, edits, nesting, bomb):
    for at, inserted in edits:
        at %= len(text) + 1
        text = text[:at] + inserted + text[at:]
    if nesting:
        text += b"\ngrid: {lr: " + b"[" * nesting + b"]" * nesting + b"}\n"
    if bomb:
        text = _alias_bomb(*bomb) + text
    load_yaml_config(tmp_path / "config.yaml", text)
