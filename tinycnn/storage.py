"""Where shard bytes come from: a tinycnn-prepare folder or a URL of one.

`root` is a folder or a URL (see `is_url`): http(s):// through urllib, `pipe:` commands (webdataset's
convention) run in a shell, anything else (s3://, gs://, ...) through fsspec and its backends (s3fs, gcsfs).
The manifest is ROOT/manifest.json and each shard ROOT/<file> (or ROOT with `{}` replaced by the file name).
Transient network errors are retried with exponential backoff; a shard that still cannot be read is a
ShardError naming its URL.

Everything read here is untrusted. The manifest is checked as a whole (`check_manifest`) before anything
uses it: its shard file names are plain names (`check_file_name`), never paths, URLs or shell words. Every
read is bounded: a manifest by MAX_MANIFEST_BYTES, a shard by what its manifest entry says
(`shard_limits`), and a URL or command by URL_DEADLINE seconds in all, however slowly its bytes trickle in.
"""
import http.client
import itertools
import json
import os
import random
import re
import shlex
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from .errors import TinycnnError
from .files import open_regular

__all__ = ["ShardError", "ManifestError", "is_url", "locate", "read_manifest", "read_shard", "check_manifest", "check_file_name",
           "shard_limits"]

PREPARE_HINT = ("prepare the data first, e.g. `tinycnn-prepare path/to/tiny-imagenet-200.zip --out shards/tiny-imagenet` "
                "(or `tinycnn-prepare download --out shards/tiny-imagenet`)")

RETRIES = 5          # tries after the first one, on transient errors only
RETRY_WAIT = 0.5     # seconds before the first retry, doubling each time up to 30 s (5 tries: 15.5 s at most)
URL_TIMEOUT = 60     # seconds without a byte before an http(s) read counts as a (transient) failure
URL_DEADLINE = 600   # seconds one read of a URL or pipe: command may take in all (not retried when exceeded)

MAX_MANIFEST_BYTES = 64 << 20   # a manifest.json read from a folder or URL
MAX_SAMPLE_BYTES = 2 << 20      # one sample in a shard (tar headers included), for shards whose size is not listed
SHARD_SLACK_BYTES = 1 << 20     # added to num_samples x MAX_SAMPLE_BYTES: end-of-archive blocks, extension headers
MAX_SHARD_BYTES = 4 << 30       # any shard file, or the tar a gzip shard decompresses to, whatever its manifest says
MAX_CLASSES = 100_000
MAX_SAMPLES = 10 ** 10          # in one shard or split
MAX_IMAGE_SIDE = 512            # input_shape is (3, H, W) with H and W in 1..MAX_IMAGE_SIDE

# A shard file or split name: a plain name (no '/', no '..', nothing a shell or URL would interpret)
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a shard's sha256 in its manifest entry (hashlib's hexdigest)

_CHUNK = 1 << 20  # bytes per read of a stream


class ShardError(TinycnnError, RuntimeError):
    """A missing, truncated or corrupt shard or sample, or a shard URL that cannot be read."""


class ManifestError(TinycnnError, ValueError):
    """A manifest (or a name in it) that is not a valid tinycnn manifest."""


def is_url(root: Union[str, Path]) -> bool:
    """True when `root` is read over the network or through a command: scheme://... or pipe:..."""
    return isinstance(root, str) and (root.startswith("pipe:") or re.match(r"[a-zA-Z][\w+.-]+://", root) is not None)


def _show(value: Any, width: int = 60) -> str:
    """`value` for a one-line message: its repr, cut to `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


def check_file_name(name: Any) -> str:
    """`name` if it is a plain file name (FILE_NAME, no '..'), else a ValueError: names from a manifest are data,
    never paths, URLs or shell words."""
    if not isinstance(name, str) or FILE_NAME.fullmatch(name) is None or ".." in name:
        raise ManifestError(f"{_show(name)} is not a plain file name (letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit, no '..')")
    return name


def locate(root: Union[str, Path], file: str) -> str:
    """Where `file` of a shards folder or URL is (`{}` in a URL stands for the file name).

    `file` must be a plain file name (check_file_name): it cannot leave the folder, and is never escaped into a
    URL. In a `pipe:` command it is shell-quoted too.
    """
    check_file_name(file)
    if not is_url(root):
        return str(Path(root) / file)
    if root.startswith("pipe:"):
        file = shlex.quote(file)  # a plain name needs no quoting: a second wall, not the first
    if "{}" in root:
        return root.replace("{}", file)
    return root.rstrip("/") + "/" + file


# ----------------------------------------------------------------------------------------------
# The manifest


def check_manifest(manifest: Any, where: str = "manifest.json") -> Dict:
    """`manifest` if it has the form the loader and the recipes use, else a one-line ValueError naming the field
    and `where` the manifest came from.

    A mapping with num_classes (1..MAX_CLASSES), optional classes (num_classes {wnid, name} mappings), optional
    input_shape ([3, H, W], sides up to MAX_IMAGE_SIDE) and splits: split name -> {num_samples, shards: [{file,
    num_samples, optional bytes (the file's size), tar_bytes (its tar's size, for gzip shards) and sha256 (of the
    file, 64 lowercase hex digits)}], optional class_counts}. Names are plain names (check_file_name), counts whole
    numbers >= 0.
    """
    def bad(field: str, problem: str):
        raise ManifestError(f"{where} is not a valid tinycnn manifest: {field} {problem}; "
                         "re-create it with tinycnn-prepare")

    def get(mapping: Dict, key: str, field: str, required: bool = True):
        if key not in mapping:
            if required:
                bad(field, "is missing")
            return None
        return mapping[key]

    def count(value: Any, field: str, low: int = 0, high: int = MAX_SAMPLES) -> int:
        if type(value) is not int or not low <= value <= high:  # type(): True is no count
            bad(field, f"is {_show(value)}, not a whole number in {low}..{high}")
        return value

    def kind(value: Any, expected: type, field: str):
        if not isinstance(value, expected):
            bad(field, f"is {_show(value)}, not a {'mapping' if expected is dict else expected.__name__}")
        return value

    def text(value: Any, field: str) -> str:
        if not isinstance(value, str) or re.search(r"[\x00-\x1f\x7f]", value):
            bad(field, f"is {_show(value)}, not a one-line string")
        return value

    def name(value: Any, field: str) -> str:
        try:
            return check_file_name(value)
        except ValueError as e:
            bad(field, str(e))

    kind(manifest, dict, "the whole file")
    num_classes = count(get(manifest, "num_classes", "num_classes"), "num_classes", 1, MAX_CLASSES)
    classes = get(manifest, "classes", "classes", required=False)
    if classes is not None:
        kind(classes, list, "classes")
        if len(classes) != num_classes:
            bad("classes", f"lists {len(classes)} classes, num_classes says {num_classes}")
        for i, c in enumerate(classes):
            kind(c, dict, f"classes[{i}]")
            text(get(c, "wnid", f"classes[{i}].wnid"), f"classes[{i}].wnid")
            if "name" in c:
                text(c["name"], f"classes[{i}].name")
    shape = get(manifest, "input_shape", "input_shape", required=False)
    if shape is not None:
        if not isinstance(shape, list) or len(shape) != 3 or shape[0] != 3 or type(shape[0]) is not int:
            bad("input_shape", f"is {_show(shape)}, not [3, height, width]")
        count(shape[1], "input_shape[1] (height)", 1, MAX_IMAGE_SIDE)
        count(shape[2], "input_shape[2] (width)", 1, MAX_IMAGE_SIDE)
    splits = kind(get(manifest, "splits", "splits"), dict, "splits")
    for split_name, split in splits.items():
        name(split_name, f"split name {_show(split_name)}")
        field = f"splits.{split_name}"
        kind(split, dict, field)
        count(get(split, "num_samples", f"{field}.num_samples"), f"{field}.num_samples")
        counts = get(split, "class_counts", f"{field}.class_counts", required=False)
        if counts is not None:
            kind(counts, list, f"{field}.class_counts")
            if len(counts) != num_classes:
                bad(f"{field}.class_counts", f"has {len(counts)} entries, num_classes says {num_classes}")
            for i, c in enumerate(counts):
                count(c, f"{field}.class_counts[{i}]")
        shards = kind(get(split, "shards", f"{field}.shards"), list, f"{field}.shards")
        for i, shard in enumerate(shards):
            at = f"{field}.shards[{i}]"
            kind(shard, dict, at)
            name(get(shard, "file", f"{at}.file"), f"{at}.file")
            count(get(shard, "num_samples", f"{at}.num_samples"), f"{at}.num_samples")
            for key in ("bytes", "tar_bytes"):
                if key in shard:
                    count(shard[key], f"{at}.{key}", 0, 1 << 62)
            if "sha256" in shard and (not isinstance(shard["sha256"], str)
                                      or SHA256_HEX.fullmatch(shard["sha256"]) is None):
                bad(f"{at}.sha256", f"is {_show(shard['sha256'])}, not 64 lowercase hex digits")
    return manifest


def shard_limits(entry: Mapping[str, int]) -> Tuple[int, int]:
    """(most bytes the shard file may hold, most bytes its tar may decompress to) from its (checked) manifest entry.

    The file: its `bytes` when listed, the tar: its `tar_bytes` when listed; otherwise num_samples x
    MAX_SAMPLE_BYTES + SHARD_SLACK_BYTES. Never more than MAX_SHARD_BYTES, whatever the manifest says.
    """
    by_count = entry["num_samples"] * MAX_SAMPLE_BYTES + SHARD_SLACK_BYTES
    return (min(entry.get("bytes", by_count), MAX_SHARD_BYTES),
            min(entry.get("tar_bytes", by_count), MAX_SHARD_BYTES))


def _parse_manifest(text: bytes, where: str, hint: str) -> Dict:
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        raise ManifestError(f"{where} is not a tinycnn manifest (not JSON): {hint}") from None
    return check_manifest(manifest, where)


def read_manifest(root: Union[str, Path], retries: int = RETRIES) -> Dict:
    """The manifest.json of a tinycnn-prepare folder or URL, checked by check_manifest (a ValueError if it is
    not one, or larger than MAX_MANIFEST_BYTES)."""
    if is_url(root):
        url = locate(root, "manifest.json")
        hint = "check the URL; it must point at a tinycnn-prepare output folder served as is"
        try:
            text = _read_url(url, retries, MAX_MANIFEST_BYTES)
        except _TooLarge:
            raise ManifestError(f"{url} is larger than {_bytes(MAX_MANIFEST_BYTES)}: not a tinycnn manifest; "
                             f"{hint}") from None
        except Exception as e:
            if _is_missing(e):
                raise FileNotFoundError(f"no manifest at {url} ({_why(e)}): {hint}") from None
            raise ShardError(f"cannot read {url}: {_why(e)}") from None
        return _parse_manifest(text, url, hint)
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file() and re.match(r"[a-zA-Z][\w+.-]+:/[^/]", str(root)):
        raise FileNotFoundError(f"{root} looks like a URL made into a Path (one slash after the scheme): "
                                "pass URLs as strings")
    if not path.is_file():
        what = "does not exist" if not root.exists() else "has no manifest.json"
        raise FileNotFoundError(f"shards folder {root} {what}: {PREPARE_HINT}")
    hint = "re-create the folder with tinycnn-prepare --force"
    try:  # a link is followed (a shards folder may be made of links); a FIFO put there since is refused, not waited on
        with os.fdopen(open_regular(path, follow_symlinks=True, single_link=False), "rb") as f:
            too_large = os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES
            text = b"" if too_large else f.read(MAX_MANIFEST_BYTES + 1)  # + 1: a file that grew since
    except OSError as e:
        raise ShardError(f"cannot read {path}: {e.strerror or e}") from None
    if too_large or len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is larger than {_bytes(MAX_MANIFEST_BYTES)}: not a tinycnn manifest; {hint}")
    return _parse_manifest(text, str(path), hint)


# ----------------------------------------------------------------------------------------------
# Bounded reads


class _TooLarge(Exception):
    """More bytes than the read's limit."""

    def __init__(self, limit: int):
        super().__init__(f"larger than {_bytes(limit)}")
        self.limit = limit


class _DeadlineExceeded(Exception):
    """A read still running at URL_DEADLINE (a stalled or trickling server or command)."""

    def __init__(self, seconds: float):
        super().__init__(f"not complete after {seconds:g} s (tinycnn.storage.URL_DEADLINE): "
                         "the server or command stalls or is far too slow")


def _read_capped(read: Callable[[int], bytes], limit: int, late: Optional[Callable[[], bool]] = None) -> bytes:
    """All of a stream, read in chunks; _TooLarge past `limit` bytes, _DeadlineExceeded once `late()`."""
    parts, total = [], 0
    while True:
        chunk = read(_CHUNK)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > limit:
            raise _TooLarge(limit)
        parts.append(chunk)
        if late is not None and late():
            raise _DeadlineExceeded(URL_DEADLINE)


class _Watchdog:
    """Ends one read at its deadline wherever it blocks (connecting, headers, body, a command's output): at
    `seconds` it shuts the read's sockets down and kills its command, so the blocked call returns. A per-socket
    timeout alone never fires on a server that sends a byte every few seconds."""

    def __init__(self, seconds: float):
        self.seconds, self.expired, self._done = seconds, False, False
        self._lock = threading.Lock()
        self._on_expiry, self._on_exit = [], []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        with self._lock:
            self._done = True
            for close in self._on_exit:
                close()

    def _expire(self):
        with self._lock:
            if self._done:
                return
            self.expired = True  # before the shutdowns: a read that sees its stream end checks this flag
            for action in self._on_expiry:
                try:
                    action()
                except OSError:
                    pass

    def watch_socket(self, sock: socket.socket) -> socket.socket:
        # a duplicate of the descriptor: shutdown() acts on the connection, even after TLS wraps (detaches) `sock`
        dup = sock.dup()
        with self._lock:
            self._on_exit.append(dup.close)
            self._on_expiry.append(lambda: dup.shutdown(socket.SHUT_RDWR))
        return sock

    def watch_process(self, proc: subprocess.Popen):
        with self._lock:
            self._on_expiry.append(lambda: _kill(proc))


class _Watched:
    """An http.client connection whose sockets a _Watchdog may shut down."""

    def __init__(self, *args, watchdog: _Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        create = self._create_connection  # http.client's hook for opening the socket (TLS wraps it afterwards)
        self._create_connection = lambda *a, **k: watchdog.watch_socket(create(*a, **k))


class _WatchedHTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req):
        return self.do_open(_WatchedHTTPConnection, req, watchdog=self.watchdog)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req):
        return self.do_open(_WatchedHTTPSConnection, req, context=self._context, watchdog=self.watchdog)


def _read_http(url: str, limit: int) -> bytes:
    with _Watchdog(URL_DEADLINE) as watchdog:
        try:
            # urlopen's handlers (proxies, redirects, errors), with connections the watchdog can end
            opener = urllib.request.build_opener(_WatchedHTTPHandler(watchdog), _WatchedHTTPSHandler(watchdog))
            with opener.open(url, timeout=URL_TIMEOUT) as response:
                declared = (response.headers.get("Content-Length") or "").strip()
                if declared.isdigit() and int(declared) > limit:
                    raise _TooLarge(limit)
                body = _read_capped(response.read, limit)
        except _TooLarge:
            raise
        except Exception:
            if watchdog.expired:
                raise _DeadlineExceeded(watchdog.seconds) from None
            raise
        if watchdog.expired:  # a shut-down socket can read as a clean end of the body
            raise _DeadlineExceeded(watchdog.seconds)
        return body


def _kill(proc: subprocess.Popen):
    """Kill a pipe: command and what it started (its own process group)."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (AttributeError, OSError):  # no process groups here, or already gone
        try:
            proc.kill()
        except OSError:
            pass


def _read_command(command: str, limit: int) -> bytes:
    # run here rather than by webdataset's gopen to report the command's stderr; a process group of its own
    # so that the watchdog (or an error here) ends everything it started
    with tempfile.TemporaryFile() as stderr, _Watchdog(URL_DEADLINE) as watchdog:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        watchdog.watch_process(proc)
        try:
            body = _read_capped(proc.stdout.read, limit)
            status = proc.wait()
        finally:
            _kill(proc)
            proc.stdout.close()
            proc.wait()
        if watchdog.expired:
            raise _DeadlineExceeded(watchdog.seconds)
        if status:
            stderr.seek(0, os.SEEK_END)
            stderr.seek(max(0, stderr.tell() - 65536))
            raise _CommandError(status, command, stderr.read().decode(errors="replace"))
        return body


def _read_fsspec(url: str, limit: int) -> bytes:
    import fsspec  # s3://, gs://, hf://...: fsspec's backends (s3fs, gcsfs, ...), installed by the user

    # checked between chunks: a backend's own timeouts bound each chunk
    deadline = time.monotonic() + URL_DEADLINE
    with fsspec.open(url, "rb") as f:
        return _read_capped(f.read, limit, lambda: time.monotonic() > deadline)


def _open_once(url: str, limit: int) -> bytes:
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        return _read_http(url, limit)
    if scheme == "pipe":  # webdataset's convention
        return _read_command(url[len("pipe:"):], limit)
    return _read_fsspec(url, limit)


class _CommandError(OSError):
    """A pipe: command that exited with an error."""

    def __init__(self, status: int, command: str, stderr: str):
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output on stderr"
        super().__init__(f"`{command}` exited with status {status}: {last}")
        self.status = status


def _is_transient(error: Exception) -> bool:
    """Worth another try: connection errors, timeouts, 5xx/429, failed commands; not 404, 403, a bad URL, a
    command that does not exist, a body over its limit or a read past URL_DEADLINE."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    if isinstance(error, _CommandError):
        return error.status not in (126, 127)  # the shell's "not executable" / "not found"
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    return isinstance(error, (OSError, http.client.HTTPException, TimeoutError))


def _is_missing(error: Exception) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (404, 410)
    return isinstance(error, FileNotFoundError)


def _read_url(url: str, retries: int = RETRIES, limit: Optional[int] = None) -> bytes:
    """The bytes at `url` (at most `limit`, default MAX_SHARD_BYTES), retried with exponential backoff (and
    jitter, for many ranks) on transient errors."""
    limit = MAX_SHARD_BYTES if limit is None else limit
    for attempt in itertools.count():
        try:
            return _open_once(url, limit)
        except Exception as e:
            if attempt >= retries or not _is_transient(e):
                e.tries = attempt + 1  # for the message
                raise
            time.sleep(min(RETRY_WAIT * 2 ** attempt, 30) * random.uniform(0.5, 1.0))


def _why(error: Exception) -> str:
    """One line: what went wrong reading a URL."""
    if isinstance(error, urllib.error.HTTPError):
        what = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, urllib.error.URLError):
        what = f"{error.reason}"
    else:
        what = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    tries = getattr(error, "tries", 1)
    return f"{what} (after {tries} tries)" if tries > 1 else what


def _read_file(path: str, limit: int) -> bytes:
    # O_NONBLOCK: a FIFO in a shards folder must not block the open (regular files ignore the flag)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ShardError(f"shard {path} is not a regular file: {PREPARE_HINT}")
        if info.st_size > limit:
            raise _TooLarge(limit)
        data = f.read(info.st_size + 1)  # read(n) allocates n bytes first: the file's size, not the limit
        if len(data) > info.st_size:  # it grew since: the rest in chunks, still within the limit
            data += _read_capped(f.read, max(0, limit - len(data)))
    if len(data) > limit:
        raise _TooLarge(limit)
    return data


def read_shard(location: str, retries: int = RETRIES, max_bytes: Optional[int] = None) -> bytes:
    """The bytes of one shard file or URL; ShardError naming it when it is missing, cannot be read or holds more
    than `max_bytes` (default MAX_SHARD_BYTES; the loader passes shard_limits' from the manifest)."""
    limit = MAX_SHARD_BYTES if max_bytes is None else min(max_bytes, MAX_SHARD_BYTES)
    too_large = (f"is larger than {_bytes(limit)}, more than its manifest entry allows: re-create the shards "
                 "folder with tinycnn-prepare (or check the URL)")
    if not is_url(location):
        try:
            return _read_file(location, limit)
        except FileNotFoundError:
            raise ShardError(f"shard {location} is missing: {PREPARE_HINT}") from None
        except _TooLarge:
            raise ShardError(f"shard {location} {too_large}") from None
        except OSError as e:
            raise ShardError(f"cannot read shard {location}: {e.strerror or e}") from None
    try:
        return _read_url(location, retries, limit)
    except _TooLarge:
        raise ShardError(f"shard {location} {too_large}") from None
    except Exception as e:
        if _is_missing(e):
            raise ShardError(f"shard {location} is missing ({_why(e)}): check that the whole shards folder "
                             "is served at that URL") from None
        raise ShardError(f"cannot read shard {location}: {_why(e)}") from None
