"""Output folders that never lose or mix results: a fresh folder per run, and a lock held for the run's life.

Every recipe that writes a folder (train, grid search, LR finder, checks, report) claims it first:
  - a folder that already holds an earlier run's results is never written into, unless the caller resumes it
    (`--resume`) or asks to replace it (`--overwrite`); a new run gets the next free name instead
    (`checkpoints/recommended-2`, `-3`, ... as timm's train.py numbers its output folders) and says where;
  - a lock (`.lock`, fcntl.flock: released by the OS when the process dies, even on SIGKILL) is held while
    the run writes; a second process that targets the same folder stops at once, naming the folder and the
    process that holds it.
"""
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Union

__all__ = ["RunFolderError", "RunLock", "claim_folder", "holds_results", "next_free"]

LOCK_NAME = ".lock"


class RunFolderError(RuntimeError):
    """The folder is in use, or would be overwritten."""


def holds_results(folder: Union[str, Path]) -> bool:
    """True when `folder` exists and holds anything but our lock file."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())


def next_free(folder: Path) -> Path:
    """folder, folder-2, folder-3, ...: the first that holds no results."""
    n = 2
    candidate = folder
    while holds_results(candidate) or _locked_by_other(candidate):
        candidate = folder.with_name(f"{folder.name}-{n}")
        n += 1
    return candidate


def _locked_by_other(folder: Path) -> Optional[str]:
    """Who holds folder's lock (None: nobody), without taking it or writing anything."""
    path = folder / LOCK_NAME
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _describe_holder(f.read())
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _in_use(folder: Path, holder: str) -> RunFolderError:
    return RunFolderError(f"{folder} is in use by {holder}: wait for it to finish, stop it, or choose another --output")


class RunLock:
    """An exclusive lock on `folder/.lock` for the life of this object (or the process).

    The file records who holds it (pid, host, command, since), so the refusal can name the holder.
    """

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = _describe_holder(f.read())
            f.close()
            raise _in_use(self.folder, holder) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv,
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f
        return self

    def release(self):
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._file is None else self

    def __exit__(self, *exc):
        self.release()


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(info.get("command", [])))
        return f"process {info['pid']} on {info.get('host', '?')} (`{command}`, since {info.get('since', '?')})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def claim_folder(folder: Union[str, Path], *, resume: bool = False, overwrite: bool = False,
                 what: str = "run", say=print) -> tuple:
    """Lock the folder a run writes to; returns (folder, lock).

    resume: continue the run in `folder` (it must exist). overwrite: replace its results. Otherwise a folder
    holding results is left alone and the next free name is used (said through `say`).
    """
    folder = Path(folder)
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite replaces it: pass one of them")
    if resume and not holds_results(folder):
        raise RunFolderError(f"--resume: {folder} holds no {what} to continue (check --output)")
    if not resume and not overwrite and holds_results(folder):
        holder = _locked_by_other(folder)
        if holder:  # a run still writing there is reported, not silently stepped around
            raise _in_use(folder, holder)
        fresh = next_free(folder)
        say(f"{folder} holds an earlier {what}: writing this one to {fresh} "
            f"(--resume continues the earlier one, --overwrite replaces it)")
        folder = fresh
    lock = RunLock(folder).acquire()
    if overwrite and holds_results(folder):
        for p in folder.iterdir():
            if p.name != LOCK_NAME:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        say(f"--overwrite: removed the earlier {what} in {folder}")
    return folder, lock
