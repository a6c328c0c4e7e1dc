"""The output folder's life cycle: built in a temporary folder, installed by a rename, written under a
lock, stale folders of dead runs removed; a folder holding a complete manifest.json is a dataset.

Nothing here deletes what tinycnn-prepare did not write: a folder is removed or replaced only when it
holds nothing but files named as prepare names them (and, for an output folder, its manifest says it is
one), and no symbolic link is followed: not to the lock file, not to a folder being removed.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import List, Optional

from rich.console import Console
from rich.text import Text

from .errors import PrepareError

FORMAT, FORMAT_VERSION = "tinycnn-shards", 2  # 2: no .wnid member, optional gzip, source fingerprint
# (shards' bytes, tar_bytes and sha256 are optional additions: version 2 readers ignore them)

# every name prepare writes into an output (or temporary) folder
_OUR_FILES = re.compile(r"(manifest|_info)\.json|(train|val|test|unlabeled)-\d{5}\.tar(\.gz)?")
_MAX_MANIFEST_BYTES = 64 << 20  # the full dataset's manifest is ~40 KB


def _read_json(path: Path):
    """The JSON in the regular file `path` (not a link, at most _MAX_MANIFEST_BYTES); raises OSError or ValueError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = f.read(_MAX_MANIFEST_BYTES + 1)
    if len(data) > _MAX_MANIFEST_BYTES:
        raise ValueError(f"{path} is over {_MAX_MANIFEST_BYTES} bytes")
    try:
        return json.loads(data)
    except RecursionError:  # nested deeper than Python's stack
        raise ValueError(f"{path} nests too deeply") from None


def read_manifest(out: Path) -> Optional[dict]:
    """The manifest of a complete prepared folder, else None."""
    try:
        manifest = _read_json(out / "manifest.json")
        complete = manifest.get("format") == FORMAT and (out / "_info.json").is_file() and all(
            (out / s["file"]).is_file() for split in manifest["splits"].values() for s in split["shards"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if complete else None


def foreign_entries(folder: Path) -> List[str]:
    """The entries of `folder` that tinycnn-prepare does not write: anything but regular files (links and
    folders included) named like its shards, manifest.json and _info.json."""
    foreign = []
    with os.scandir(folder) as entries:
        for e in entries:
            if not (_OUR_FILES.fullmatch(e.name) and e.is_file(follow_symlinks=False)):
                foreign.append(e.name)
    return sorted(foreign)


def is_ours(out: Path) -> bool:
    """True when `out` is an output folder of tinycnn-prepare (complete or not): a real folder whose
    manifest says so and that holds nothing prepare does not write, so that replacing it loses nothing."""
    try:
        if out.is_symlink() or not out.is_dir() or foreign_entries(out):
            return False
        manifest = _read_json(out / "manifest.json")
        return isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (OSError, ValueError):
        return False


def is_prepared(out) -> bool:
    """True when `out` holds a complete prepared dataset (manifest.json and every shard it lists)."""
    return read_manifest(Path(out)) is not None


@contextlib.contextmanager
def building(out: Path):
    """A new temporary folder beside `out` to write into: renamed to `out` when the block completes,
    removed when it fails or is interrupted."""
    # the owner's pid in the name: a later run removes the folder only once that process is gone
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, out: Path):
    """Rename the finished temporary folder to `out`, replacing an earlier prepared folder (only one
    that is_ours: checked again here, in case it changed while we wrote)."""
    old = None
    if os.path.lexists(out):
        if out.is_symlink() or not out.is_dir():
            raise PrepareError(f"{out} became a link or a file while preparing; nothing was replaced. "
                               "Choose a new or empty --out")
        if not any(out.iterdir()):
            out.rmdir()  # removes an empty folder only
        elif not is_ours(out):
            raise PrepareError(f"{out} is not (or no longer) a folder tinycnn-prepare wrote; nothing was "
                               "replaced. Choose a new or empty --out")
        else:  # move it aside until the new one is in place
            old = out.with_name(f"{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # rmtree never follows links out of the folder


@contextlib.contextmanager
def lock(out: Path):
    """Hold OUT.lock (with our pid in it) while we write `out`: a second prepare into the same folder
    stops at once. The OS drops the lock when the process dies, however it dies."""
    import fcntl
    path = out.with_name(out.name + ".lock")
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PrepareError(f"{out} is being written by another tinycnn-prepare (pid {holder}); "
                               "wait for it to finish or stop it, or choose another --out") from None
        if _same_file(fd, path):
            break  # else the holder removed the file as we opened it: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        if _same_file(fd, path):  # never unlink what replaced our file meanwhile
            os.unlink(path)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except OSError:
        return False


def _open_lock_file(path: Path) -> int:
    """Open (or create) OUT.lock without following a link, and only if it is a regular file of its own
    (one link): the lock is truncated and written, which must never reach another file."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) \
        | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if os.path.islink(path):  # O_NOFOLLOW: ELOOP (or EMLINK on some systems)
            raise PrepareError(f"{path} is a symbolic link, not a lock file of tinycnn-prepare; remove the link "
                               "or choose another --out") from None
        raise PrepareError(f"cannot create {path} ({e.strerror}); choose an --out in a folder you can write") \
            from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else "has other hard links"
        raise PrepareError(f"{path} {what}, so it is not a lock file of tinycnn-prepare; remove it or choose "
                           "another --out")
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale(out: Path, console: Console):
    """Remove OUT.tmp-* / OUT.old-* folders left by a prepare that died (called while holding the lock).

    Their names carry the writer's pid; a folder whose pid is alive is left alone, and so is a link or a
    folder holding anything prepare does not write.
    """
    for p in sorted(out.parent.glob(f"{glob.escape(out.name)}.*-*")):
        m = re.fullmatch(re.escape(out.name) + r"\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{8}", p.name)
        if not m or p.is_symlink() or not p.is_dir() or (m[2] and int(m[2]) != os.getpid()
                                                          and _pid_alive(int(m[2]))):
            continue
        try:
            foreign = foreign_entries(p)
        except OSError:
            continue
        if foreign:  # named like ours, but holding what prepare never writes: not ours to delete
            console.print(Text(f"left {p} in place: it holds {foreign[0]}, which tinycnn-prepare does not write",
                               style="yellow"), soft_wrap=True)
            continue
        shutil.rmtree(p, ignore_errors=True)
        who = f"process {m[2]}" if m[2] else "an earlier run"
        console.print(Text(f"removed {p}, left by {who} that did not finish", style="yellow"), soft_wrap=True)
