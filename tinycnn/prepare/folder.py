"""The output folder's life cycle: built in a temporary folder, installed by a rename, written under a
lock, stale folders of dead runs removed; a folder holding a complete manifest.json is a dataset.

Nothing here deletes what tinycnn-prepare did not write: a folder is removed or replaced only when it
holds nothing but files named as prepare names them (and, for an output folder, its manifest says it is
one), and no symbolic link is followed: not to the lock file, not to a folder being removed.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import List, Optional

from rich.console import Console
from rich.text import Text

from .. import storage
from ..files import SYMLINK, FileLock, LockedError, NotOursError, NotRegularFile, install_folder
from .errors import PrepareError

FORMAT, FORMAT_VERSION = "tinycnn-shards", 2  # 2: no .wnid member, optional gzip, source fingerprint
# (shards' bytes, tar_bytes and sha256 are optional additions: version 2 readers ignore them)

# every name prepare writes into an output (or temporary) folder
_OUR_FILES = re.compile(r"(manifest|_info)\.json|(train|val|test|unlabeled)-\d{5}\.tar(\.gz)?")


def _our_manifest(out: Path) -> Optional[dict]:
    """out/manifest.json, read and checked by tinycnn.storage.read_manifest, when it is prepare's (its format)
    and a file of the folder's own (not a link); else None."""
    if (out / "manifest.json").is_symlink():
        return None
    try:
        manifest = storage.read_manifest(out)
    except (OSError, ValueError, RuntimeError):  # missing, unreadable (ShardError), not a valid manifest
        return None
    return manifest if manifest.get("format") == FORMAT else None


def read_manifest(out: Path) -> Optional[dict]:
    """The manifest of a complete prepared folder (with _info.json and every shard it lists), else None."""
    manifest = _our_manifest(out)
    if manifest is None or not (out / "_info.json").is_file():
        return None
    shards = (s["file"] for split in manifest["splits"].values() for s in split["shards"])
    return manifest if all((out / f).is_file() for f in shards) else None


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
    except OSError:
        return False
    return _our_manifest(out) is not None


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
        try:  # replaces an earlier prepared folder only (is_ours: checked again, in case it changed while we wrote)
            install_folder(tmp, out, is_ours)
        except NotOursError:
            if out.is_symlink() or not out.is_dir():
                raise PrepareError(f"{out} became a link or a file while preparing; nothing was replaced. "
                                   "Choose a new or empty --out") from None
            raise PrepareError(f"{out} is not (or no longer) a folder tinycnn-prepare wrote; nothing was "
                               "replaced. Choose a new or empty --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def lock(out: Path):
    """Hold OUT.lock (with our pid in it) while we write `out`: a second prepare into the same folder
    stops at once. The OS drops the lock when the process dies, however it dies; the file is removed at
    the end. It is used only when it is a regular file of its own (not a link, one link): it is truncated
    and written, which must never reach another file."""
    path = out.with_name(out.name + ".lock")
    try:
        held = FileLock(path, unlink=True).acquire()
    except LockedError as e:
        holder = e.holder[:32].strip() or "?"
        raise PrepareError(f"{out} is being written by another tinycnn-prepare (pid {holder}); "
                           "wait for it to finish or stop it, or choose another --out") from None
    except NotRegularFile as e:
        if e.problem == SYMLINK:
            raise PrepareError(f"{path} is a symbolic link, not a lock file of tinycnn-prepare; remove the link "
                               "or choose another --out") from None
        raise PrepareError(f"{path} {e.problem}, so it is not a lock file of tinycnn-prepare; remove it or choose "
                           "another --out") from None
    except OSError as e:
        raise PrepareError(f"cannot create {path} ({e.strerror}); choose an --out in a folder you can write") \
            from None
    with held:
        yield


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
