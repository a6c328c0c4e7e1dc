"""Downloading the official zip (resumable, checksum-verified) or the Hugging Face parquet files.

A download is bounded: in size (the server's Content-Length when smaller than MAX_DOWNLOAD_BYTES, which
is far above the official ~248 MB) and in time (DOWNLOAD_DEADLINE_S for the whole transfer, headers
included: a server that trickles a byte now and then keeps each read under the socket timeout, but not
the whole download under the deadline).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import stat
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.text import Text

from .. import __version__
from ..files import NotRegularFile, open_regular
from .errors import PrepareError

DEFAULT_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
HF_REPO = "zh-plus/tiny-imagenet"
_LOCAL_HINT = "tinycnn-prepare /path/to/tiny-imagenet-200.zip --out DIR"
_OFFICIAL_MB = 248      # size of the official zip, said before downloading it
MAX_DOWNLOAD_BYTES = 1 << 30   # no Tiny ImageNet zip is larger
DOWNLOAD_DEADLINE_S = 2 * 3600  # the whole transfer: 248 MB at 300 KB/s; an interrupted download resumes


class _Deadline:
    """Shuts down every connection of a download when its time is up, which ends a read blocked on a
    server that trickles (each byte in time for the socket timeout, the whole never)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock):
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shutdown(sock)

    def _expire(self):
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock):
        try:  # socket.socket's own shutdown, also for an SSL socket: the reading thread sees the end
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, TypeError):
            pass

    def cancel(self):
        self._timer.cancel()


def _watched_connection(http_class, deadline: _Deadline):
    """`http_class` (HTTPConnection or HTTPSConnection) whose sockets `deadline` can shut down."""
    def make(*args, **kwargs):
        conn = http_class(*args, **kwargs)
        connect = conn.connect

        def connect_and_watch():
            connect()
            deadline.watch(conn.sock)
        conn.connect = connect_and_watch
        return conn
    return make


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_watched_connection(http_class, self._deadline), req, **kwargs)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_watched_connection(http_class, self._deadline), req, **kwargs)


def _too_slow(url: str, done: int, deadline: _Deadline) -> PrepareError:
    return PrepareError(f"download of {url} stopped after {deadline.seconds:g} s with {done} bytes: the server is "
                        "too slow or stalled; run the same command again to resume, or fetch the file another way "
                        f"and pass the local copy: {_LOCAL_HINT}")


def _offline(url: str, reason) -> PrepareError:
    return PrepareError(f"cannot reach {url} ({reason}). Offline? Copy tiny-imagenet-200.zip to this machine "
                        f"and pass the local copy: {_LOCAL_HINT}")


def _verify(path: Path, md5: Optional[str], sha256: Optional[str]):
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if not want:
            continue
        h = hashlib.new(algo)
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() != want.lower():
            raise PrepareError(f"checksum mismatch for {path.name}: {algo} {h.hexdigest()}, expected {want}. "
                               "The download is corrupt or not the expected file; run again to re-download, "
                               "or pass the right --md5/--sha256 (or --no-verify)")


def _not_a_plain_file(path: Path) -> PrepareError:
    return PrepareError(f"{path} is a link or not a plain file, so it is not a download of tinycnn-prepare; "
                        "remove it or choose another --download-dir")


def _partial_size(part: Path) -> int:
    """Bytes of an earlier partial download (0: none); never measured through a link."""
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        raise _not_a_plain_file(part)
    return st.st_size


def _open_part(part: Path, append: bool):
    """The partial download, opened for writing without following a link (a link there must never
    lead the download into another file)."""
    try:  # not a hard link either: writing would change another file
        fd = open_regular(part, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC))
    except NotRegularFile:
        raise _not_a_plain_file(part) from None
    except OSError as e:
        raise PrepareError(f"cannot write {part} ({e.strerror}); choose another --download-dir") from None
    return os.fdopen(fd, "ab" if append else "wb")


def _fetch(url: str, part: Path, timeout: float, progress: bool, retried: bool = False):
    """Download `url` into `part`, continuing a partial file with an HTTP Range request, within
    DOWNLOAD_DEADLINE_S and MAX_DOWNLOAD_BYTES."""
    # hand-written because torchvision's download_url (and huggingface_hub, for non-Hub URLs) restart an
    # interrupted 248 MB download from zero; this one continues it
    deadline = _Deadline(DOWNLOAD_DEADLINE_S)
    try:
        again = _fetch_within(url, part, timeout, progress, retried, deadline)
    finally:
        deadline.cancel()
    if again:  # the server said the partial file is past the end: start over, once
        _fetch(url, part, timeout, progress, retried=True)


def _fetch_within(url: str, part: Path, timeout: float, progress: bool, retried: bool, deadline: _Deadline) -> bool:
    """_fetch under `deadline`; True when the partial file was dropped and the download must start over."""
    have = _partial_size(part)
    if have > MAX_DOWNLOAD_BYTES:
        part.unlink()  # never a Tiny ImageNet zip: start over
        have = 0
    headers = {"User-Agent": f"tinycnn-prepare/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    opener = urllib.request.build_opener(_WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline))
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have and not retried:
            # nothing left past our end: complete if the sizes agree, else start over
            total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return False
            part.unlink()
            return True
        raise PrepareError(f"download failed: HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # DNS, refused, timeout, cut
        if deadline.expired:
            raise _too_slow(url, have, deadline) from None
        raise _offline(url, getattr(e, "reason", e)) from None
    with resp:
        start = have
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m[1]) != have:
                raise PrepareError(f"download failed: the server answered range {resp.headers.get('Content-Range')} "
                                   f"to bytes={have}-; delete {part} and run again")
        else:  # 200: the server ignores Range and sends everything
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        if total is not None and total > MAX_DOWNLOAD_BYTES:
            raise PrepareError(f"{url} is {total} bytes, more than the {MAX_DOWNLOAD_BYTES} a Tiny ImageNet zip "
                               f"can be (the official one: ~{_OFFICIAL_MB} MB); check --url")
        cap = min(total, MAX_DOWNLOAD_BYTES) if total is not None else MAX_DOWNLOAD_BYTES
        done = start
        columns = (TextColumn("downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with _open_part(part, append=bool(start)) as f, \
                Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("download", total=total, completed=start)
            try:
                while block := resp.read1(1 << 20):  # what has arrived: a slow server is seen between reads
                    if done + len(block) > cap:
                        f.truncate(start)  # nothing of this answer is kept
                        raise PrepareError(f"{url} sent more than {cap} bytes (the official zip is "
                                           f"~{_OFFICIAL_MB} MB); not the Tiny ImageNet zip: check --url")
                    f.write(block)
                    done += len(block)
                    bar.update(task, completed=done)
                    if deadline.expired:
                        raise _too_slow(url, done, deadline)
            except PrepareError:
                raise
            except (OSError, ValueError, http.client.HTTPException) as e:
                if deadline.expired:
                    raise _too_slow(url, done, deadline) from None
                raise PrepareError(f"download interrupted after {done} bytes ({e!r}); "
                                   "run the same command again to resume") from None
    if deadline.expired:  # the connection shut down at the deadline reads as a clean end
        raise _too_slow(url, done, deadline)
    if total is not None and done < total:
        raise PrepareError(f"download interrupted after {done} of {total} bytes; run the same command again to resume")
    return False


def download(out_dir, url: str = DEFAULT_URL, md5: Optional[str] = OFFICIAL_MD5, *, sha256: Optional[str] = None,
             timeout: float = 10.0, progress: bool = True) -> Path:
    """Fetch the Tiny ImageNet zip into `out_dir` (resumable, checksum-verified) and return its path.

    An existing complete file is verified and reused. md5=None and sha256=None skip the check (the
    default md5 is the official zip's). Offline, it fails at once with a hint to pass a local copy. The
    transfer ends within DOWNLOAD_DEADLINE_S and MAX_DOWNLOAD_BYTES (a PrepareError says so).
    """
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create {out_dir} ({e.strerror}); choose another --download-dir") from None
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    dest = out_dir / (name if name not in ("", ".", "..") else "tiny-imagenet-200.zip")
    if os.path.lexists(dest):  # reused (a link to a copy elsewhere too: it is only read)
        if not dest.is_file() or dest.stat().st_size > MAX_DOWNLOAD_BYTES:
            raise PrepareError(f"{dest} is not a Tiny ImageNet zip (not a regular file, or over "
                               f"{MAX_DOWNLOAD_BYTES} bytes); remove it or choose another --download-dir")
        _verify(dest, md5, sha256)
        return dest
    part = dest.with_name(dest.name + ".part")
    _fetch(url, part, timeout, progress)
    try:
        _verify(part, md5, sha256)
    except PrepareError:
        part.unlink()  # resuming a corrupt file would never fix it
        raise
    part.replace(dest)
    return dest


def download_hf(out_dir, *, repo_id: str = HF_REPO) -> Path:
    """Fetch the Hugging Face parquet files of `repo_id` into `out_dir`/<name> and return that folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PrepareError('--hf needs huggingface_hub: pip install "tinycnn[download]"') from None
    local = Path(out_dir).expanduser() / repo_id.replace("/", "--")
    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset", local_dir=local,
                                      allow_patterns=["*.parquet", "README.md"]))
    except Exception as e:  # offline errors differ between huggingface_hub versions
        raise _offline(f"https://huggingface.co/datasets/{repo_id}", f"{type(e).__name__}: {e}") from None


def download_official(out: Path, where: Path, url: str, md5: Optional[str], sha256: Optional[str] = None,
                       progress: bool = True) -> Path:
    """The zip at `url` in `where`, fetched (or reused) after saying what, how big and where."""
    Console(stderr=True).print(
        Text(f"downloading {url} (the official zip is ~{_OFFICIAL_MB} MB) into {where}, "
             f"then writing shards to {out}", style="cyan"), soft_wrap=True)
    return download(where, url, md5, sha256=sha256, progress=progress)
