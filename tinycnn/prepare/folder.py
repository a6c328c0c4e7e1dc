"""The output folder's life cycle: built in a temporary folder, installed by a rename, written under a
lock, stale folders of dead runs removed; a folder holding a complete manifest.json is a dataset."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.text import Text

from .errors import PrepareError

FORMAT, FORMAT_VERSION = "tinycnn-shards", 2  # 2: no .wnid member, optional gzip, source fingerprint


def read_manifest(out: Path) -> Optional[dict]:
    """The manifest of a complete prepared folder, else None."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        complete = manifest.get("format") == FORMAT and (out / "_info.json").is_file() and all(
            (out / s["file"]).is_file() for split in manifest["splits"].values() for s in split["shards"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if complete else None


def is_ours(out: Path) -> bool:
    try:
        return json.loads((out / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
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
    """Rename the finished temporary folder to `out`, replacing an earlier prepared folder."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:  # a folder of ours (checked before we started): move it aside until the new one is in place
            old = out.with_name(f"{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def lock(out: Path):
    """Hold OUT.lock (with our pid in it) while we write `out`: a second prepare into the same folder
    stops at once. The OS drops the lock when the process dies, however it dies."""
    import fcntl
    path = out.with_name(out.name + ".lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PrepareError(f"cannot create {path} ({e.strerror}); choose an --out in a folder you can write") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PrepareError(f"{out} is being written by another tinycnn-prepare (pid {holder}); "
                               "wait for it to finish or stop it, or choose another --out") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break  # else the holder removed the file as we opened it: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


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

    Their names carry the writer's pid; a folder whose pid is alive is left alone.
    """
    for p in sorted(out.parent.glob(f"{glob.escape(out.name)}.*-*")):
        m = re.fullmatch(re.escape(out.name) + r"\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{8}", p.name)
        if not m or not p.is_dir() or (m[2] and int(m[2]) != os.getpid() and _pid_alive(int(m[2]))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        who = f"process {m[2]}" if m[2] else "an earlier run"
        console.print(Text(f"removed {p}, left by {who} that did not finish", style="yellow"), soft_wrap=True)
