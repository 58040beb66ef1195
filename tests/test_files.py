"""atomic_write: a failed write leaves the previous file intact and no temporary file behind."""

import os

import pytest

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
