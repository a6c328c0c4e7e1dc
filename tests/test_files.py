"""tinycnn.files: atomic writes, regular files only, the lock that names its holder, installing a folder."""
import contextlib
import os
import signal
from pathlib import Path

import pytest

from tinycnn.files import (HARD_LINKS, NOT_REGULAR, SYMLINK, FileLock, LockedError, NotOursError, NotRegularFile,
                           atomic_write, install_folder, lock_holder, open_regular)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    atomic_write(path, lambda tmp: Path(tmp).write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(precious)
    for flags in (os.O_RDONLY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
        with pytest.raises(NotRegularFile) as e:
            open_regular(link, flags)
        assert e.value.problem == SYMLINK and str(e.value) == f"{link} is a symlink"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotRegularFile, match="is a symlink"):
        open_regular(tmp_path / "dangling", os.O_WRONLY | os.O_CREAT)
    assert precious.read_text() == "keep me" and not (tmp_path / "nowhere").exists()
    fd = open_regular(link, follow_symlinks=True)  # a reader that may follow links reads the target
    with os.fdopen(fd) as f:
        assert f.read() == "keep me"


def test_a_hard_link_is_refused_before_it_is_truncated(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    os.link(precious, tmp_path / "linked")
    with pytest.raises(NotRegularFile) as e:
        open_regular(tmp_path / "linked", os.O_WRONLY | os.O_TRUNC)
    assert e.value.problem == HARD_LINKS and precious.read_text() == "keep me"
    os.close(open_regular(tmp_path / "linked", single_link=False))  # a reader may allow them


@contextlib.contextmanager
def _within(seconds):
    """Interrupt a blocking call (an open of a FIFO that waits for a writer) with TimeoutError."""
    def expired(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_WRONLY | os.O_CREAT, os.O_RDWR | os.O_CREAT],
                         ids=["read", "write", "read-write"])
def test_a_fifo_does_not_block_and_is_refused(tmp_path, flags):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with _within(10), pytest.raises(NotRegularFile) as e:
        open_regular(fifo, flags)
    assert e.value.problem == NOT_REGULAR and str(e.value) == f"{fifo} is not a regular file"
    with pytest.raises(NotRegularFile, match="is not a regular file"):
        open_regular(tmp_path, os.O_RDONLY)  # a folder


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    path = tmp_path / "out.lock"

    class Named(FileLock):
        def holder(self):
            return "first holder\n"

    assert lock_holder(path) is None  # no file: nobody holds it
    first = Named(path).acquire()
    assert path.read_text() == "first holder\n"
    # flock locks belong to an open file, not to a process: a second one is refused here too
    with pytest.raises(LockedError) as e:
        FileLock(path).acquire()
    assert e.value.holder == "first holder\n" and path.read_text() == "first holder\n"  # refused: wrote nothing
    assert lock_holder(path) == "first holder\n"  # asked without taking the lock
    first.release()
    assert lock_holder(path) is None and path.exists()  # released; the file kept by default
    with FileLock(path) as lock:
        assert lock.locked and path.read_text() == f"{os.getpid()}\n"
    assert not lock.locked


def test_the_caller_names_its_own_refusal_and_can_remove_the_file(tmp_path):
    path = tmp_path / "out.lock"

    class Mine(FileLock):
        def in_use(self, text):
            return RuntimeError(f"in use by process {text.strip()}")

    first = FileLock(path, unlink=True).acquire()
    with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}$"):
        Mine(path).acquire()
    first.release()
    assert not path.exists()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(NotRegularFile, match="is a symlink"):
        Mine(path).acquire()
    assert not (tmp_path / "elsewhere").exists()


def _folder(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _ours(folder):
    return (folder / "ours.txt").is_file() and not (folder / "theirs.txt").exists()


def test_install_folder_replaces_only_a_folder_that_is_ours(tmp_path):
    target = tmp_path / "out"
    install_folder(_folder(tmp_path / "new1", **{"ours.txt": "1"}), target, _ours)
    assert (target / "ours.txt").read_text() == "1"
    install_folder(_folder(tmp_path / "new2", **{"ours.txt": "2"}), target, _ours)  # ours: replaced
    assert (target / "ours.txt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (target / "theirs.txt").write_text("mine")  # no longer ours: nothing changes, the new folder stays
    new = _folder(tmp_path / "new3", **{"ours.txt": "3"})
    with pytest.raises(NotOursError):
        install_folder(new, target, _ours)
    assert (target / "theirs.txt").read_text() == "mine" and (target / "ours.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new3", "out"]

    _folder(tmp_path / "empty")  # an empty folder is replaced; a link, even to our folder, never is
    install_folder(new, tmp_path / "empty", _ours)
    assert (tmp_path / "empty" / "ours.txt").read_text() == "3"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "empty", target_is_directory=True)
    with pytest.raises(NotOursError):
        install_folder(_folder(tmp_path / "new4", **{"ours.txt": "4"}), link, lambda p: not p.is_symlink())
    assert link.is_symlink() and (tmp_path / "empty" / "ours.txt").read_text() == "3"


def test_install_folder_is_checked_where_it_is_removed(tmp_path):
    """is_ours sees the old folder where it was moved aside: what was checked is what is removed."""
    target = _folder(tmp_path / "out", **{"ours.txt": "old"})
    seen = []

    def is_ours(folder):
        seen.append(folder.name)
        return _ours(folder)

    install_folder(_folder(tmp_path / "new", **{"ours.txt": "new"}), target, is_ours)
    assert seen and seen[0].startswith("out.old-") and (target / "ours.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
