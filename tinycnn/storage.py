"""Where shard bytes come from: a tinycnn-prepare folder or a URL of one.

`root` is a folder or a URL (see `is_url`): http(s):// through urllib, `pipe:` commands (webdataset's
convention) run in a shell, anything else (s3://, gs://, ...) through fsspec and its backends (s3fs, gcsfs).
The manifest is ROOT/manifest.json and each shard ROOT/<file> (or ROOT with `{}` replaced by the file name).
Transient network errors are retried with exponential backoff; a shard that still cannot be read is a
ShardError naming its URL.
"""
import http.client
import itertools
import json
import random
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Union

__all__ = ["ShardError", "is_url", "locate", "read_manifest", "read_shard"]

PREPARE_HINT = ("prepare the data first, e.g. `tinycnn-prepare path/to/tiny-imagenet-200.zip --out shards/tiny-imagenet` "
                "(or `tinycnn-prepare download --out shards/tiny-imagenet`)")

RETRIES = 5          # tries after the first one, on transient errors only
RETRY_WAIT = 0.5     # seconds before the first retry, doubling each time up to 30 s (5 tries: 15.5 s at most)
URL_TIMEOUT = 60     # seconds without a byte before an http(s) read counts as a (transient) failure


class ShardError(RuntimeError):
    """A missing, truncated or corrupt shard or sample, or a shard URL that cannot be read."""


def is_url(root: Union[str, Path]) -> bool:
    """True when `root` is read over the network or through a command: scheme://... or pipe:..."""
    return isinstance(root, str) and (root.startswith("pipe:") or re.match(r"[a-zA-Z][\w+.-]+://", root) is not None)


def locate(root: Union[str, Path], file: str) -> str:
    """Where `file` of a shards folder or URL is (`{}` in a URL stands for the file name)."""
    if not is_url(root):
        return str(Path(root) / file)
    if "{}" in root:
        return root.replace("{}", file)
    return root.rstrip("/") + "/" + file


def _open_once(url: str) -> bytes:
    scheme = url.split(":", 1)[0]
    if scheme in ("http", "https"):
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT) as response:
            return response.read()
    if scheme == "pipe":  # webdataset's convention; run here rather than by its gopen to report the command's stderr
        done = subprocess.run(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if done.returncode:
            raise _CommandError(done.returncode, url, done.stderr.decode(errors="replace"))
        return done.stdout
    import fsspec  # s3://, gs://, hf://...: fsspec's backends (s3fs, gcsfs, ...), installed by the user
    with fsspec.open(url, "rb") as f:
        return f.read()


class _CommandError(OSError):
    """A pipe: command that exited with an error."""

    def __init__(self, status: int, url: str, stderr: str):
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output on stderr"
        super().__init__(f"`{url[len('pipe:'):]}` exited with status {status}: {last}")
        self.status = status


def _is_transient(error: Exception) -> bool:
    """Worth another try: connection errors, timeouts, 5xx/429, failed commands; not 404, 403, a bad URL or a
    command that does not exist."""
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


def _read_url(url: str, retries: int = RETRIES) -> bytes:
    """The bytes at `url`, retried with exponential backoff (and jitter, for many ranks) on transient errors."""
    for attempt in itertools.count():
        try:
            return _open_once(url)
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


def read_manifest(root: Union[str, Path], retries: int = RETRIES) -> Dict:
    """The manifest.json of a tinycnn-prepare folder or URL."""
    if is_url(root):
        url = locate(root, "manifest.json")
        try:
            text = _read_url(url, retries)
        except Exception as e:
            if _is_missing(e):
                raise FileNotFoundError(f"no manifest at {url} ({_why(e)}): check the URL; it must point at a "
                                        "tinycnn-prepare output folder served as is") from None
            raise ShardError(f"cannot read {url}: {_why(e)}") from None
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(f"{url} is not a tinycnn manifest (not JSON): check the URL") from None
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file() and re.match(r"[a-zA-Z][\w+.-]+:/[^/]", str(root)):
        raise FileNotFoundError(f"{root} looks like a URL made into a Path (one slash after the scheme): "
                                "pass URLs as strings")
    if not path.is_file():
        what = "does not exist" if not root.exists() else "has no manifest.json"
        raise FileNotFoundError(f"shards folder {root} {what}: {PREPARE_HINT}")
    with open(path) as f:
        return json.load(f)


def read_shard(location: str, retries: int = RETRIES) -> bytes:
    """The bytes of one shard file or URL; ShardError naming it when it is missing or cannot be read."""
    if not is_url(location):
        try:
            with open(location, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ShardError(f"shard {location} is missing: {PREPARE_HINT}") from None
        except OSError as e:
            raise ShardError(f"cannot read shard {location}: {e}") from None
    try:
        return _read_url(location, retries)
    except Exception as e:
        if _is_missing(e):
            raise ShardError(f"shard {location} is missing ({_why(e)}): check that the whole shards folder "
                             "is served at that URL") from None
        raise ShardError(f"cannot read shard {location}: {_why(e)}") from None
