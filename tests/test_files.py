"""atomic_write: a failed write leaves the previous file intact and no temporary file behind."""

import errno
import os
import tempfile

import pytest

from pyro_vae import _files
from pyro_vae._files import atomic_write


def test_success_replaces_the_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_write(path, "w") as file:
        file.write("new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failure_keeps_the_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(path, "w") as file:
        file.write("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_written_files_get_the_usual_permissions(tmp_path):
    with atomic_write(tmp_path / "report.md", "w") as file:
        file.write("text")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o666 & ~mask


def test_the_data_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """os.fsync on the written file, with all its bytes, before os.replace puts it in place:
    otherwise a power cut after the rename can leave an empty or partial file under the name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        status = os.fstat(fd)
        events.append(("fsync", status.st_ino, status.st_size))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.stat(source).st_ino, os.stat(source).st_size))
        real_replace(source, target)

    monkeypatch.setattr(_files.os, "fsync", fsync)
    monkeypatch.setattr(_files.os, "replace", replace)
    path = tmp_path / "out.bin"
    with atomic_write(path) as file:
        file.write(b"x" * 100)  # less than a buffer: it stays in memory until flushed
    inode = path.stat().st_ino
    assert ("fsync", inode, 100) in events
    assert ("replace", inode, 100) in events
    assert events.index(("fsync", inode, 100)) < events.index(("replace", inode, 100))


def test_the_directory_is_synced_after_the_rename(tmp_path, monkeypatch):
    """The new name is an entry of the directory: without an fsync of the directory after
    os.replace, a power cut can bring back the old name after the run moved on."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", None))
        real_replace(source, target)

    monkeypatch.setattr(_files.os, "fsync", fsync)
    monkeypatch.setattr(_files.os, "replace", replace)
    with atomic_write(tmp_path / "out.bin") as file:
        file.write(b"x")
    assert events[-2:] == [("replace", None), ("fsync", tmp_path.stat().st_ino)]


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    """A full disk fails in write() or fsync(), which name no file: the error names the file
    that could not be written, and the old one stays whole."""
    import errno

    path = tmp_path / "metrics.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device") as raised:
        with atomic_write(path, "w") as file:
            file.write("new")
    assert raised.value.filename == str(path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def _close_fails_once(monkeypatch, error: OSError) -> None:
    """The temporary file's close() closes it and then raises ``error``, as a close whose
    flush of buffered data meets a full disk (or NFS reporting a failed write) does."""
    real = tempfile.NamedTemporaryFile

    def failing(*args, **kwargs):
        tmp = real(*args, **kwargs)
        close = tmp.close

        def close_then_fail():
            close()
            raise error

        tmp.close = close_then_fail
        return tmp

    monkeypatch.setattr(_files.tempfile, "NamedTemporaryFile", failing)


def test_a_close_that_fails_leaves_no_temporary_file_and_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "point_cloud.png"
    path.write_text("old")
    _close_fails_once(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left on device") as raised:
        with atomic_write(path, "w") as file:
            file.write("new")
    assert raised.value.filename == str(path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_close_that_fails_after_the_caller_failed_keeps_the_caller_s_error(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    _close_fails_once(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(RuntimeError, match="the caller's"), atomic_write(path, "w") as file:
        file.write("half")
        raise RuntimeError("the caller's")
    assert list(tmp_path.iterdir()) == []


def test_a_rename_that_fails_leaves_no_temporary_file(tmp_path):
    """The name is taken by a directory: os.replace fails, and the written file goes too."""
    path = tmp_path / "checkpoint.pt"
    path.mkdir()
    with pytest.raises(OSError), atomic_write(path) as file:
        file.write(b"weights")
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.is_dir()
