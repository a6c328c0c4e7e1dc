"""Output folders that never lose or mix results: a fresh folder per run, and a lock held for the run's life.

Every recipe that writes a folder (train, grid search, LR finder, checks, report) claims it first:
  - a folder that already holds an earlier run's results is never written into, unless the caller resumes it
    (`--resume`) or asks to replace it (`--overwrite`); a new run gets the next free name instead
    (`checkpoints/recommended-2`, `-3`, ... as timm's train.py numbers its output folders) and says where;
  - a lock (`.lock`, fcntl.flock: released by the OS when the process dies, even on SIGKILL) is held while
    the run writes; a second process that targets the same folder stops at once, naming the folder and the
    process that holds it;
  - a marker (`.tinycnn-run`, JSON {"kind": "run"}) says that tinycnn wrote the folder, and what kind of output
    it holds. `--overwrite` replaces only such a folder (or one that an earlier version wrote, recognized by
    its files alone), of the same kind: anything else is the user's, and is refused without being touched.
Neither the lock nor the marker is ever opened through a symlink, and replacing a folder's contents unlinks a
symlink inside it, never what it points to.
"""
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Union

from .errors import TinycnnError
from .files import FileLock, NotRegularFile, lock_holder, open_regular, read_head

__all__ = ["RunFolderError", "RunLock", "claim_folder", "holds_results", "next_free", "folder_kind",
           "ensure_replaceable", "clear_folder", "mark_folder", "write_marker", "LOCK_NAME", "MARKER_NAME"]

LOCK_NAME = ".lock"
MARKER_NAME = ".tinycnn-run"
_OURS = (LOCK_NAME, MARKER_NAME)  # what a claimed folder holds before any result

# The marker's kinds, as `claim_folder`'s `what` says them.
KIND_OF_WHAT = {"run": "run", "report": "report", "LR finder result": "lr_finder", "set of checks": "checks",
                "grid search": "grid"}
WHAT_OF_KIND = {kind: what for what, kind in KIND_OF_WHAT.items()}

# Folders written before the marker existed, recognized by their files: all of `requires` and one of `needs`
# are there, and nothing but `knows` (and atomic_write's temporary files) is.
_LEGACY = {
    "run": {"requires": {"config.yaml"}, "needs": {"metrics.jsonl", "state", "run.json"},
            "knows": {"config.yaml", "run.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "state",
                      "tb", "grid_failed.json"}},
    "report": {"requires": set(), "needs": {"report.md"}, "knows": {"report.md", "report.md.tmp", "figures"}},
    "lr_finder": {"requires": set(), "needs": {"lr_finder.json", "lr_finder.csv"},
                  "knows": {"lr_finder.json", "lr_finder.csv", "lr_finder.png"}},
    "checks": {"requires": set(), "needs": {"checks.json"}, "knows": {"checks.json", "augment_grid.png"}},
}
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # tinycnn.files.atomic_write's: .NAME.RANDOM.tmp


class RunFolderError(TinycnnError, RuntimeError):
    """The folder is in use, or would be overwritten."""


def holds_results(folder: Union[str, Path]) -> bool:
    """True when `folder` exists and holds anything but our lock and marker files."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name not in _OURS for p in folder.iterdir())


def next_free(folder: Path) -> Path:
    """folder, folder-2, folder-3, ...: the first that holds no results."""
    n = 2
    candidate = folder
    while holds_results(candidate) or _locked_by_other(candidate):
        candidate = folder.with_name(f"{folder.name}-{n}")
        n += 1
    return candidate


# ----------------------------------------------------------------------------- small files, never through links

def _not_plain(e: NotRegularFile) -> RunFolderError:
    return RunFolderError(f"{e.filename} {e.problem}: remove it")


def _open_regular(path: Path, flags: int) -> int:
    """files.open_regular (never through a symlink, a FIFO, a device or a file with other hard links), refusing
    with a RunFolderError."""
    try:
        return open_regular(path, flags)
    except NotRegularFile as e:
        raise _not_plain(e) from None


def write_marker(folder: Union[str, Path], kind: str):
    """Mark `folder` as tinycnn's output of `kind` (run, report, lr_finder, checks, grid)."""
    fd = _open_regular(Path(folder) / MARKER_NAME, os.O_WRONLY | os.O_CREAT)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"kind": kind}).encode())
    finally:
        os.close(fd)


def _marker_kind(folder: Path) -> Optional[str]:
    """The kind the folder's marker records; None without a (readable, well-formed) marker. A marker that is a
    symlink or not a regular file is an error (RunFolderError): it is not ours."""
    try:
        fd = _open_regular(folder / MARKER_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        info = json.loads(read_head(fd))
    except ValueError:
        return None
    finally:
        os.close(fd)
    kind = info.get("kind") if isinstance(info, dict) else None
    return kind if isinstance(kind, str) and kind in WHAT_OF_KIND else None


def _legacy_kind(folder: Path) -> Optional[str]:
    """The kind of output an earlier version (no marker) left in `folder`, told by its files; None when
    anything in it is not a file of that kind."""
    names = {p.name for p in folder.iterdir()} - set(_OURS)
    names = {n for n in names if not _TEMPORARY.match(n)}
    for kind, rule in _LEGACY.items():
        if rule["requires"] <= names and names & rule["needs"] and names <= rule["knows"]:
            return kind
    return None


def folder_kind(folder: Union[str, Path]) -> Optional[str]:
    """What kind of tinycnn output `folder` holds (run, report, lr_finder, checks, grid), from its marker, else
    (an earlier version's folder) from its files; None: not tinycnn's (or not a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    return _marker_kind(folder) or _legacy_kind(folder)


def ensure_replaceable(folder: Union[str, Path], what: str = "run", hint: str = "--overwrite only replaces "
                       "tinycnn's own output"):
    """RunFolderError unless `folder` holds tinycnn's own output of the kind `what` names (or nothing)."""
    folder = Path(folder)
    if not holds_results(folder):
        return
    kind, wanted = folder_kind(folder), KIND_OF_WHAT.get(what, what)
    if kind is None:
        raise RunFolderError(f"{folder} does not look like a tinycnn {what} folder: {hint}; choose another "
                             "--output or remove it yourself")
    if kind != wanted:
        raise RunFolderError(f"{folder} holds a tinycnn {WHAT_OF_KIND.get(kind, kind)}, not a {what}: {hint} of "
                             "the same kind; choose another --output or remove it yourself")


def mark_folder(folder: Union[str, Path], kind: str):
    """Mark `folder` as tinycnn's output of `kind` when it is: it holds nothing yet (a fresh or emptied folder),
    or an earlier version's output of that kind. A folder holding anything else stays unmarked, so that no
    later --overwrite takes it for ours."""
    folder = Path(folder)
    if not holds_results(folder):
        write_marker(folder, kind)
    elif _marker_kind(folder) is None and _legacy_kind(folder) == kind:
        write_marker(folder, kind)


def clear_folder(folder: Union[str, Path]):
    """Remove everything in `folder` but the lock and the marker. A symlink is unlinked, never followed
    (shutil.rmtree does not follow the links inside the folders it removes either)."""
    for entry in os.scandir(folder):
        if entry.name in _OURS:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# ----------------------------------------------------------------------------- the lock

def _locked_by_other(folder: Path) -> Optional[str]:
    """Who holds folder's lock (None: nobody), without taking it or writing anything."""
    try:
        text = lock_holder(folder / LOCK_NAME)
    except NotRegularFile as e:
        raise _not_plain(e) from None
    return None if text is None else _describe_holder(text)


def _in_use(folder: Path, holder: str) -> RunFolderError:
    return RunFolderError(f"{folder} is in use by {holder}: wait for it to finish, stop it, or choose another --output")


class RunLock(FileLock):
    """An exclusive lock on `folder/.lock` for the life of this object (or the process).

    The file records who holds it (pid, host, command, since), so the refusal can name the holder. It is
    created (0o644) or opened without following a symlink, and only when it is a regular file.
    """

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        super().__init__(self.folder / LOCK_NAME)

    def holder(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv,
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")})

    def in_use(self, text: str) -> RunFolderError:
        return _in_use(self.folder, _describe_holder(text))

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            return super().acquire()
        except NotRegularFile as e:
            raise _not_plain(e) from None


def _printable(text: str, limit: int = 200) -> str:
    """A lock file's text as part of a one-line message: no control characters, not too long."""
    text = "".join(c if c.isprintable() else " " for c in str(text))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        command = " ".join(os.path.basename(str(a)) if i == 0 else str(a)
                           for i, a in enumerate(info.get("command", [])[:50]))
        return _printable(f"process {int(info['pid'])} on {info.get('host', '?')} (`{command}`, "
                          f"since {info.get('since', '?')})", 300)
    except (ValueError, KeyError, TypeError, AttributeError):
        return "another process"


# ----------------------------------------------------------------------------- claiming

def claim_folder(folder: Union[str, Path], *, resume: bool = False, overwrite: bool = False,
                 what: str = "run", say=print) -> tuple:
    """Lock the folder a run writes to, and mark it as tinycnn's; returns (folder, lock).

    resume: continue the run in `folder` (it must exist). overwrite: replace its results, when they are
    tinycnn's own output of this kind (`ensure_replaceable`). Otherwise a folder holding results is left alone
    and the next free name is used (said through `say`).
    """
    folder = Path(folder)
    kind = KIND_OF_WHAT.get(what, what)
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite replaces it: pass one of them")
    if resume and not holds_results(folder):
        raise RunFolderError(f"--resume: {folder} holds no {what} to continue (check --output)")
    if overwrite:
        ensure_replaceable(folder, what)  # before the lock: a folder that is not ours gets not even a .lock
    if not resume and not overwrite and holds_results(folder):
        holder = _locked_by_other(folder)
        if holder:  # a run still writing there is reported, not silently stepped around
            raise _in_use(folder, holder)
        fresh = next_free(folder)
        say(f"{folder} holds an earlier {what}: writing this one to {fresh} "
            f"(--resume continues the earlier one, --overwrite replaces it)")
        folder = fresh
    lock = RunLock(folder).acquire()
    try:
        if overwrite and holds_results(folder):
            ensure_replaceable(folder, what)  # again under the lock: what was checked is what is removed
            clear_folder(folder)
            say(f"--overwrite: removed the earlier {what} in {folder}")
        mark_folder(folder, kind)
    except BaseException:
        lock.release()
        raise
    return folder, lock
