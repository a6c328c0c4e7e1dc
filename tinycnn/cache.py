"""A node-local disk cache for shards read from a URL: each shard crosses the network once.

`build_loader(root, ..., cache_dir=DIR)` with a URL root (http(s)://, fsspec's s3://, gs://, ..., and `pipe:`
commands, whose output is cached the same way, keyed by the command) keeps every shard it reads in
DIR/<sha256 of the root>/<file>, <file> being the shard's plain name from its (checked) manifest. A folder root
is never cached: it is local already. The manifest itself is never cached: every build_loader reads it again, so
a changed dataset shows as cached files that no longer match it, and those are fetched again.

Nothing in the cache is trusted. Every cached file is checked against its manifest entry before it is used: its
size against `bytes` on every read, its content against `sha256` once per process (and again whenever its size,
mtime or inode change). A file that does not match, or that is no regular file (a symlink planted under a
shard's name is never read or written through), is a miss: the name is removed (a link itself, never its target)
and the shard fetched again. A fetched shard that does not match its manifest entry is a ShardError, never cached.

Safe to share among the processes of a node (ranks, decoding workers): a shard is written to a temporary file of
the writer's own, created exclusively in the same folder (`.<file>.tmp-<pid>-<random>`), then renamed into place
(atomic), so readers only ever see complete files. Two processes may both fetch a shard the first time; the last
rename wins, with the same bytes.

Bounded: the shards under DIR (all roots together) stay within `max_bytes` (default DEFAULT_MAX_BYTES) and never
leave less than KEEP_FREE_FRACTION of the disk free. Before a shard is written the least recently used shards go
(by access time, which every hit sets); a shard larger than the bound is streamed without being cached. Writers
that fill at the same moment may pass the bound by the shards they are writing. Only the cache's own files are
ever removed: shard files and temporary files left by a killed process (older than STALE_TEMP_SECONDS), in
folders that hold the cache's marker file. A file being written is never removed.
"""
import errno
import hashlib
import os
import re
import secrets
import stat
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .config import ConfigError
from .storage import FILE_NAME, MAX_SHARD_BYTES, ShardError, read_shard

__all__ = ["ShardCache", "cache_key", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 50 << 30    # all roots of one cache folder together
KEEP_FREE_FRACTION = 0.05       # of the disk the cache is on: never filled past 95%
STALE_TEMP_SECONDS = 3600       # a temporary file unchanged this long was left by a killed process
MARKER = ".tinycnn-shard-cache"  # in every root's folder: what eviction may touch

_ROOT_FOLDER = re.compile(r"[0-9a-f]{64}")
_TEMP_FILE = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]*\.tmp-[0-9]+-[0-9a-f]+")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW
# O_NONBLOCK: a FIFO planted under a shard's name must not block the open
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW

# (st_dev, st_ino) -> (size, mtime_ns, sha256) of cached files whose content this process has hashed
_VERIFIED: Dict[Tuple[int, int], Tuple[int, int, str]] = {}
_WARNED = set()


def cache_key(root: str) -> str:
    """The folder name of `root`'s shards in a cache: the sha256 of the root as written (a trailing '/' aside,
    unless the root is a template with `{}`). Never the root itself: no URL, path or command reaches the disk."""
    key = root if "{}" in root else root.rstrip("/")
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def usable() -> bool:
    """Whether this platform has what the cache needs: descriptor-relative opens and renames (POSIX)."""
    return all(f in os.supports_dir_fd for f in (os.open, os.unlink, os.rename, os.stat)) and bool(_NOFOLLOW)


class ShardCache:
    """The cached shards of one URL root in `cache_dir` (see the module's docstring). Picklable: each decoding
    worker gets a copy and opens the folder itself."""

    def __init__(self, cache_dir: Union[str, Path], root: str, shards: Mapping[str, Mapping[str, Any]],
                 max_bytes: Optional[int] = None):
        """shards: each shard's location (storage.locate(root, file)) -> its checked manifest entry (file, bytes,
        sha256). max_bytes: the bound on all cached shards in `cache_dir` (default DEFAULT_MAX_BYTES)."""
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
            raise ConfigError(f"the shard cache size {max_bytes!r} is not a whole number of bytes >= 0 "
                             "(data.cache_max_bytes)")
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.folder = os.path.join(self.cache_dir, cache_key(root))
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.entries: Dict[str, Tuple[str, Optional[int], Optional[str]]] = {
            location: (entry["file"], entry.get("bytes"), entry.get("sha256")) for location, entry in shards.items()}

    def __contains__(self, location: str) -> bool:
        return location in self.entries

    def check(self):
        """Make this root's folder now, so that an unusable cache_dir is one line before any worker starts."""
        if not usable():
            raise ConfigError("the shard cache (data.cache_dir) needs a POSIX system (descriptor-relative file "
                             "operations): leave data.cache_dir unset here")
        try:
            os.close(self._open_folder())
        except OSError as e:
            raise ConfigError(f"cannot use {self.cache_dir} as the shard cache: {e.strerror or e}; choose a "
                             "writable folder (data.cache_dir) or leave it unset") from None

    def read(self, location: str, retries: int, limit: Optional[int] = None) -> bytes:
        """The bytes of the shard at `location`: from the cache when a checked copy is there, else fetched
        (storage.read_shard, at most `limit` bytes), checked against the manifest entry and cached."""
        file, size, sha256 = self.entries[location]
        limit = MAX_SHARD_BYTES if limit is None else min(limit, MAX_SHARD_BYTES)
        try:
            folder = self._open_folder()
        except OSError as e:
            _warn_once(e, f"cannot use the shard cache folder {self.folder}: {e.strerror or e}; shards are "
                          "streamed without caching")
            return self._fetch(location, retries, limit)
        try:
            data = self._cached(folder, file, size, sha256, limit)
            if data is None:
                data = self._fetch(location, retries, limit)
                self._store(folder, file, data, sha256)
            return data
        finally:
            os.close(folder)

    # ------------------------------------------------------------------------------------------
    # Steps

    def _fetch(self, location: str, retries: int, limit: int) -> bytes:
        file, size, sha256 = self.entries[location]
        data = read_shard(location, retries, max_bytes=limit)
        if size is not None and len(data) != size:
            what = f"holds {len(data)} bytes, its manifest entry says {size}"
        elif sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            what = "does not have the sha256 of its manifest entry"
        else:
            return data
        raise ShardError(f"shard {location} {what}: the dataset changed since its manifest was read, or the "
                         "transfer is damaged; read it again (re-create the shards with tinycnn-prepare if it "
                         "persists)")

    def _open_folder(self) -> int:
        """A descriptor of this root's folder (made with mode 0o700 and the marker when missing), never through
        a symlink: one planted under the folder's name is removed."""
        try:
            folder = os.open(self.folder, _FOLDER_FLAGS)
        except FileNotFoundError:
            folder = None
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR) or not os.path.islink(self.folder):
                raise
            os.unlink(self.folder)  # the link, never its target
            folder = None
        if folder is None:
            os.makedirs(self.cache_dir, exist_ok=True)
            try:
                os.mkdir(self.folder, 0o700)
            except FileExistsError:  # another process made it
                pass
            folder = os.open(self.folder, _FOLDER_FLAGS)
        try:
            _ensure_marker(folder)
        except OSError:
            os.close(folder)
            raise
        return folder

    def _cached(self, folder: int, file: str, size: Optional[int], sha256: Optional[str],
                limit: int) -> Optional[bytes]:
        """The cached bytes of `file` if they match the manifest entry, else None (and a bad copy removed)."""
        try:
            fd = os.open(file, _READ_FLAGS, dir_fd=folder)
        except FileNotFoundError:
            return None
        except OSError:  # ELOOP: a symlink; EACCES, ...: nothing the cache can use under that name
            _discard(folder, file)
            return None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > limit or (size is not None and info.st_size != size):
                _discard(folder, file, info)
                return None
            data = f.read(info.st_size + 1)
            if len(data) != info.st_size:  # changed in place while read
                _discard(folder, file, info)
                return None
            key = (info.st_dev, info.st_ino)
            if sha256 is not None and _VERIFIED.get(key) != (info.st_size, info.st_mtime_ns, sha256):
                if hashlib.sha256(data).hexdigest() != sha256:
                    _discard(folder, file, info)
                    return None
                _VERIFIED[key] = (info.st_size, info.st_mtime_ns, sha256)
            try:  # least recently used first: a hit sets the access time (the mtime, which the check uses, stays)
                os.utime(fd, ns=(time.time_ns(), info.st_mtime_ns))
            except OSError:
                pass
        return data

    def _store(self, folder: int, file: str, data: bytes, sha256: Optional[str]):
        """Write `data` as `file` (a temporary file of this process's own, renamed into place), after making
        room; a shard that cannot fit, or a failed write, leaves the cache as it was."""
        try:
            if not self._make_room(folder, len(data)):
                return
            temp = f".{file}.tmp-{os.getpid()}-{secrets.token_hex(6)}"
            fd = os.open(temp, _WRITE_FLAGS, 0o644, dir_fd=folder)
        except OSError as e:
            _warn_once(e, f"cannot write to the shard cache {self.folder}: {e.strerror or e}; shards are streamed "
                          "without caching")
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                info = os.fstat(f.fileno())
            os.replace(temp, file, src_dir_fd=folder, dst_dir_fd=folder)  # replaces a link itself, never its target
        except OSError as e:
            try:
                os.unlink(temp, dir_fd=folder)
            except OSError:
                pass
            _warn_once(e, f"cannot write {file} to the shard cache {self.folder}: {e.strerror or e}; it is "
                          "streamed without caching")
            return
        if sha256 is not None:  # these bytes were hashed when fetched
            _VERIFIED[(info.st_dev, info.st_ino)] = (info.st_size, info.st_mtime_ns, sha256)

    def _make_room(self, folder: int, size: int) -> bool:
        """Remove least recently used shards until `size` more bytes fit the bound; False when they never can."""
        shards, used = _scan(self.cache_dir)
        disk = os.fstatvfs(folder)
        free, keep_free = disk.f_bavail * disk.f_frsize, int(disk.f_blocks * disk.f_frsize * KEEP_FREE_FRACTION)
        budget = min(self.max_bytes, used + free - keep_free)
        if size > budget:
            return False
        for atime, file_size, root_folder, name, identity in sorted(shards):
            if used + size <= budget:
                break
            _remove_shard(os.path.join(self.cache_dir, root_folder), name, identity)
            used -= file_size
        return True


# ----------------------------------------------------------------------------------------------
# Helpers


def _warn_once(error: OSError, message: str):
    if error.errno not in _WARNED:
        _WARNED.add(error.errno)
        warnings.warn(message)


def _ensure_marker(folder: int):
    """The marker file in a root's folder: a regular file (a symlink there is replaced)."""
    try:
        if stat.S_ISREG(os.stat(MARKER, dir_fd=folder, follow_symlinks=False).st_mode):
            return
        os.unlink(MARKER, dir_fd=folder)
    except FileNotFoundError:
        pass
    try:
        os.close(os.open(MARKER, _WRITE_FLAGS, 0o644, dir_fd=folder))
    except FileExistsError:  # another process made it
        pass


def _discard(folder: int, file: str, seen: Optional[os.stat_result] = None):
    """Remove the name `file` (a link itself, never its target), unless it is a folder or no longer the file
    `seen` (another process renamed a good copy into place meanwhile)."""
    try:
        now = os.stat(file, dir_fd=folder, follow_symlinks=False)
        if stat.S_ISDIR(now.st_mode) or (seen is not None and (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino)):
            return
        os.unlink(file, dir_fd=folder)
    except OSError:
        pass


def _scan(cache_dir: str) -> Tuple[List[Tuple[int, int, str, str, Tuple[int, int]]], int]:
    """([(atime_ns, size, root folder, file, (dev, inode))] of the cached shards, bytes used by them and by
    temporary files being written). Looks only into root folders with the marker; removes stale temporary files."""
    shards, used, now = [], 0, time.time()
    try:
        roots = [e.name for e in os.scandir(cache_dir) if _ROOT_FOLDER.fullmatch(e.name) and
                 e.is_dir(follow_symlinks=False)]
    except OSError:
        return [], 0
    for root_folder in roots:
        try:
            folder = os.open(os.path.join(cache_dir, root_folder), _FOLDER_FLAGS)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.stat(MARKER, dir_fd=folder, follow_symlinks=False).st_mode):
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    info = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(info.st_mode):
                        continue
                    if FILE_NAME.fullmatch(entry.name):
                        shards.append((info.st_atime_ns, info.st_size, root_folder, entry.name,
                                       (info.st_dev, info.st_ino)))
                        used += info.st_size
                    elif _TEMP_FILE.fullmatch(entry.name):
                        if now - info.st_mtime > STALE_TEMP_SECONDS:
                            os.unlink(entry.name, dir_fd=folder)
                        else:
                            used += info.st_size
        except OSError:
            pass
        finally:
            os.close(folder)
    return shards, used


def _remove_shard(root_folder: str, name: str, identity: Tuple[int, int]):
    """Remove the cached shard `name` if it is still the file scanned (evicted; a reader holding it open reads on)."""
    try:
        folder = os.open(root_folder, _FOLDER_FLAGS)
    except OSError:
        return
    try:
        now = os.stat(name, dir_fd=folder, follow_symlinks=False)
        if stat.S_ISREG(now.st_mode) and (now.st_dev, now.st_ino) == identity:
            os.unlink(name, dir_fd=folder)
    except OSError:
        pass
    finally:
        os.close(folder)
