"""Downloading the official zip (resumable, checksum-verified) or the Hugging Face parquet files."""
from __future__ import annotations

import hashlib
import http.client
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.text import Text

from .. import __version__
from .errors import PrepareError

DEFAULT_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
HF_REPO = "zh-plus/tiny-imagenet"
_LOCAL_HINT = "tinycnn-prepare /path/to/tiny-imagenet-200.zip --out DIR"
_OFFICIAL_MB = 248      # size of the official zip, said before downloading it


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


def _fetch(url: str, part: Path, timeout: float, progress: bool, retried: bool = False):
    """Download `url` into `part`, continuing a partial file with an HTTP Range request."""
    # hand-written because torchvision's download_url (and huggingface_hub, for non-Hub URLs) restart an
    # interrupted 248 MB download from zero; this one continues it
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"tinycnn-prepare/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have and not retried:
            # nothing left past our end: complete if the sizes agree, else start over
            total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return
            part.unlink()
            return _fetch(url, part, timeout, progress, retried=True)
        raise PrepareError(f"download failed: HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError) as e:  # DNS failure, connection refused, timeout
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
        done = start
        columns = (TextColumn("downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with open(part, "ab" if start else "wb") as f, \
                Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("download", total=total, completed=start)
            try:
                while block := resp.read(1 << 20):
                    f.write(block)
                    done += len(block)
                    bar.update(task, completed=done)
            except (OSError, http.client.HTTPException) as e:
                raise PrepareError(f"download interrupted after {done} bytes ({e!r}); "
                                   "run the same command again to resume") from None
    if total is not None and done < total:
        raise PrepareError(f"download interrupted after {done} of {total} bytes; run the same command again to resume")


def download(out_dir, url: str = DEFAULT_URL, md5: Optional[str] = OFFICIAL_MD5, *, sha256: Optional[str] = None,
             timeout: float = 10.0, progress: bool = True) -> Path:
    """Fetch the Tiny ImageNet zip into `out_dir` (resumable, checksum-verified) and return its path.

    An existing complete file is verified and reused. md5=None and sha256=None skip the check (the
    default md5 is the official zip's). Offline, it fails at once with a hint to pass a local copy.
    """
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / (PurePosixPath(urllib.parse.urlparse(url).path).name or "tiny-imagenet-200.zip")
    if dest.exists():
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
