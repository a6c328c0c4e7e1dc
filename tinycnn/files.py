"""Small file-system pieces that never lose a file or write through a link, shared by runs, prepare and export.

  - `atomic_write`: a file replaced by a rename, so readers see the old file or the new one, never half of one;
  - `open_regular`: an fd of a regular file, never through a symlink, never blocking on a FIFO, and (by
    default) never a file with other hard links, whose writing would change another file too;
  - `FileLock`: an fcntl.flock lock that records its holder in the file, so a refusal can name it;
  - `install_folder`: a finished temporary folder renamed into place, replacing only an old folder that the
    caller recognizes as its own.

Refusals are OSError subclasses (`NotRegularFile`, `LockedError`, `NotOursError`): each caller turns them into
its own one-line error.
"""
import contextlib
import errno
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["umask_mode", "atomic_write", "open_regular", "read_head", "NotRegularFile", "FileLock", "LockedError",
           "lock_holder", "install_folder", "NotOursError", "SYMLINK", "NOT_REGULAR", "HARD_LINKS"]

MAX_HEAD_BYTES = 64 * 1024  # a lock file's holder text (a line of JSON): never read more

_NOFOLLOW, _NONBLOCK, _CLOEXEC = (getattr(os, f, 0) for f in ("O_NOFOLLOW", "O_NONBLOCK", "O_CLOEXEC"))  # 0: none

# NotRegularFile.problem: what is wrong with the file, as the callers' messages say it
SYMLINK, NOT_REGULAR, HARD_LINKS = "is a symlink", "is not a regular file", "has other hard links"


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as open() would create it under the process umask (mkstemp/mkdtemp make private 0600/0700 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: Union[str, Path], write_fn) -> Path:
    """Call write_fn(tmp_path) then rename tmp_path onto path: readers see the old file or the new one.

    The temporary file is `.NAME.RANDOM.tmp` beside `path`, removed when write_fn fails; the new file gets the
    mode the umask gives (not mkstemp's 0600). A symlink at `path` is replaced itself, never written through.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------- regular files only

class NotRegularFile(OSError):
    """open_regular's refusal; `problem` is SYMLINK, NOT_REGULAR or HARD_LINKS, `filename` the path."""

    def __init__(self, path, problem: str):
        super().__init__(errno.EPERM, problem, str(path))
        self.problem = problem

    def __str__(self):
        return f"{self.filename} {self.problem}"


def open_regular(path: Union[str, Path], flags: int = os.O_RDONLY, mode: int = 0o644, *,
                 follow_symlinks: bool = False, single_link: bool = True) -> int:
    """An fd of the regular file `path` (created with `mode` under O_CREAT), or NotRegularFile.

    Never through a symlink (unless follow_symlinks), never blocking on a FIFO (O_NONBLOCK: the open returns,
    and the FIFO is refused), and, when single_link, never a file with other hard links. O_TRUNC takes effect
    only once the file passed these checks, so a refused file is left as it was. Other errors
    (FileNotFoundError, PermissionError, ...) are raised as os.open raises them.
    """
    truncate = bool(flags & os.O_TRUNC)
    flags = (flags & ~os.O_TRUNC) | _NONBLOCK | _CLOEXEC | (0 if follow_symlinks else _NOFOLLOW)
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if not follow_symlinks and os.path.islink(path):  # O_NOFOLLOW: ELOOP (EMLINK on some systems)
            raise NotRegularFile(path, SYMLINK) from None
        if e.errno in (errno.EISDIR, errno.ENXIO):  # a folder; a FIFO without reader opened to write, a socket
            raise NotRegularFile(path, NOT_REGULAR) from None
        raise
    st = os.fstat(fd)
    problem = (NOT_REGULAR if not stat.S_ISREG(st.st_mode)
               else HARD_LINKS if single_link and st.st_nlink > 1 else None)
    if problem:
        os.close(fd)
        raise NotRegularFile(path, problem)
    if truncate:
        os.ftruncate(fd, 0)
    return fd


def read_head(fd: int, limit: int = MAX_HEAD_BYTES) -> str:
    """The first `limit` bytes of an open file, as text (undecodable bytes replaced)."""
    return os.pread(fd, limit, 0).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- the lock

class LockedError(BlockingIOError):
    """FileLock's refusal: another process holds the lock; `holder` is the text it wrote into the file."""

    def __init__(self, path, holder: str):
        super().__init__(errno.EWOULDBLOCK, "locked by another process", str(path))
        self.holder = holder


class FileLock:
    """An exclusive fcntl.flock lock on the file `path`, held until release() (or until the process ends: the
    OS drops it however the process dies, even on SIGKILL).

    The file is opened with open_regular (created 0o644; NotRegularFile when it is a link, a FIFO, ...) and,
    once locked, holds `holder()`'s text (default: our pid), so that a second process can say who holds it:
    `in_use(text)` makes that refusal (default: LockedError), a hook for the caller's own error. unlink=True
    removes the file at release, when it is still the file we locked; a process that locked a file its holder
    unlinked meanwhile locks the new file instead.
    """

    def __init__(self, path: Union[str, Path], *, unlink: bool = False):
        self.path = Path(path)
        self.unlink = unlink
        self._file = None  # a file object: when the lock is dropped unreleased, closing it releases the lock

    def holder(self) -> str:
        """The text written into the file once it is locked."""
        return f"{os.getpid()}\n"

    def in_use(self, text: str) -> Exception:
        """The error acquire() raises when another process holds the lock; `text` is what it wrote."""
        return LockedError(self.path, text)

    @property
    def locked(self) -> bool:
        return self._file is not None

    def acquire(self) -> "FileLock":
        import fcntl

        while True:
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = read_head(fd)
                os.close(fd)
                raise self.in_use(text) from None
            if not self.unlink or _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, self.holder().encode(), 0)
        except BaseException:
            os.close(fd)  # closing releases the lock
            raise
        self._file = os.fdopen(fd, "rb+", buffering=0)
        return self

    def release(self):
        import fcntl

        if self._file is not None:
            if self.unlink and _same_file(self._file.fileno(), self.path):  # never what replaced our file
                os.unlink(self.path)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        return self if self.locked else self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_holder(path: Union[str, Path]) -> Optional[str]:
    """The text the holder of `path`'s lock wrote; None when no process holds it or there is no such file.
    Neither takes the lock nor writes anything (NotRegularFile as open_regular)."""
    import fcntl

    try:
        fd = open_regular(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return read_head(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except OSError:
        return False


# ----------------------------------------------------------------------------- installing a folder

class NotOursError(FileExistsError):
    """install_folder's refusal: the target is not a folder the caller may replace; nothing was changed."""


def install_folder(tmp: Union[str, Path], target: Union[str, Path], is_ours: Callable[[Path], bool]) -> Path:
    """Rename the finished folder `tmp` to `target`, replacing what is there only when it is an empty folder or a
    folder is_ours accepts (else NotOursError, and nothing is changed).

    The old folder is renamed aside (TARGET.old-PID-RANDOM; a link is renamed itself, never followed) and checked
    there, so that what is checked is what is removed, and put back when refused. Once `tmp` is in place, the
    regular files in the old folder are removed, then the folder when that empties it: anything else that
    appeared in it meanwhile stays.
    """
    tmp, target = Path(tmp), Path(target)
    old = None
    if os.path.lexists(target):
        old = target.with_name(f"{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        target.rename(old)
        if not (_is_empty_folder(old) or is_ours(old)):
            old.rename(target)
            raise NotOursError(errno.EEXIST, "not a folder that may be replaced", str(target))
    try:
        tmp.rename(target)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                old.rename(target)
        raise
    if old is not None:
        try:
            entries = list(os.scandir(old))
        except OSError:
            entries = []
        for e in entries:
            with contextlib.suppress(OSError):
                if e.is_file(follow_symlinks=False):
                    os.unlink(e.path)
        with contextlib.suppress(OSError):
            old.rmdir()  # only when nothing else is in it
    return target


def _is_empty_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and not os.listdir(path)
    except OSError:
        return False
