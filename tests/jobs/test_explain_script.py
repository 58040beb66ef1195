"""scripts/explain.py when things go wrong (issue 23): a full disk or a Ctrl-C leaves no part of
a report (nor a directory it made), a report.md it did not write is never replaced, a
read-only run is explained into a writable --out-dir and an unwritable one is named; and a
Ctrl-C while any script imports torch is one line, exit 130."""

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from scripts_in_process import SCRIPTS, call, load_script

import pyro_vae as pv
import pyro_vae._files
import pyro_vae.jobs.runs

pytestmark = pytest.mark.usefixtures("float32")
train_script, explain_script = map(load_script, ("train", "explain"))

TINY = (
    *("--latent-dim", "2", "--hidden-dims", "8", "--num-iw-particles", "0", "--num-epochs", "1"),
    *("--no-progress", "--num-threads", "1"),
)
PARTICLES = ("--num-particles", "50")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    torch.set_default_dtype(torch.float32)
    out = tmp_path_factory.mktemp("explain") / "run"
    assert train_script.run([*TINY, "--out-dir", str(out)]) == 0
    return out


def hidden_files(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob(".*") if p.name != ".pyro_vae.lock"]


def test_a_report_md_that_explain_did_not_write_is_not_replaced(run, tmp_path, capsys):
    out_dir = tmp_path / "notes"
    out_dir.mkdir()
    (out_dir / "report.md").write_text("# My notes\n")
    code, _, err = call(explain_script, str(run), "--out-dir", str(out_dir), *PARTICLES,
                        capsys=capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "report.md, which explain.py did not write" in err, err
    assert [p.name for p in out_dir.iterdir()] == ["report.md"]
    assert (out_dir / "report.md").read_text() == "# My notes\n"
    # Its own report it replaces.
    (out_dir / "report.md").unlink()
    for _ in range(2):
        code, _, err = call(explain_script, str(run), "--out-dir", str(out_dir), *PARTICLES,
                            capsys=capsys)  # fmt: skip
        assert code == 0, err


def full_disk_after(writes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file write after the first ``writes`` fails as a full disk fails it."""
    real_fsync, count = os.fsync, [0]

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):  # the directory's sync after a rename
            return real_fsync(fd)
        count[0] += 1
        if count[0] > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(pyro_vae._files.os, "fsync", fsync)


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "over-an-earlier-report"])
def test_a_full_disk_leaves_no_part_of_the_report(run, tmp_path, capsys, monkeypatch, earlier):
    out_dir = tmp_path / "report"
    if earlier:
        code, _, err = call(explain_script, str(run), "--out-dir", str(out_dir), *PARTICLES,
                            capsys=capsys)  # fmt: skip
        assert code == 0, err
    full_disk_after(1, monkeypatch)  # one figure goes in, the next fails
    code, _, err = call(explain_script, str(run), "--out-dir", str(out_dir), *PARTICLES,
                        capsys=capsys)  # fmt: skip
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and f"no part of the report is left in {out_dir}" in err
    assert ("earlier report there was removed" in err) == earlier
    if earlier:
        assert list(out_dir.iterdir()) == []  # a directory the user had stays, empty
    else:
        assert not out_dir.exists()
    assert hidden_files(run) == [] and hidden_files(tmp_path) == []


def test_a_ctrl_c_leaves_no_empty_report_directory(run, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "copy" / "explain"
    copy = tmp_path / "copy"
    os.makedirs(copy)
    for name in ("checkpoint.pt", "best.pt", ".pyro_vae.lock"):
        (copy / name).write_bytes((run / name).read_bytes())

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        Path(args[5]).mkdir(parents=True, exist_ok=True)  # as pv.explain does first
        raise KeyboardInterrupt

    monkeypatch.setattr(pyro_vae.jobs.runs, "explain", interrupted)
    code, _, err = call(explain_script, str(copy), *PARTICLES, capsys=capsys)
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err, err
    assert not out_dir.exists()


def deny_writes_to(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``directory`` as a read-only one looks to os.access (the tests may run as root, for
    whom chmod changes nothing)."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # type: ignore[no-untyped-def]
        if mode & os.W_OK and Path(path).absolute() == directory.absolute():
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_a_read_only_run_is_explained_into_a_writable_out_dir(run, tmp_path, capsys, monkeypatch):
    deny_writes_to(run, monkeypatch)
    out_dir = tmp_path / "report"
    code, _, err = call(explain_script, str(run), "--out-dir", str(out_dir), *PARTICLES,
                        capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert (out_dir / "report.md").is_file()
    # Into the run itself it cannot write: the error names the run's directory.
    code, _, err = call(explain_script, str(run), *PARTICLES, capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot write the report into {run / 'explain'} ({run} is not writable)" in err, err


def test_an_unwritable_out_dir_is_named(run, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    deny_writes_to(parent, monkeypatch)
    code, _, err = call(explain_script, str(run), "--out-dir", str(parent / "a" / "b"),
                        *PARTICLES, capsys=capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert f"({parent} is not writable)" in err and "output directory" not in err, err
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("script", ["train", "evaluate", "explain"])
def test_a_ctrl_c_while_the_script_imports_is_one_line(script, tmp_path):
    """A Ctrl-C lands while torch is being imported (a second or so into any script)."""
    starter = textwrap.dedent(
        f"""
        import runpy, sys

        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, CtrlC())
        sys.argv = ["{script}.py", "--help"]
        runpy.run_path({str(SCRIPTS / f"{script}.py")!r}, run_name="__main__")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", starter], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr == f"{script}.py: interrupted while starting; nothing was written\n"
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_every_report_begins_with_the_heading_explain_recognizes():
    """check_out_dir tells explain's own report.md by its heading: every model's report."""
    source = (Path(pv.__file__).parent / "explain.py").read_text()
    assert source.count('f"{REPORT_HEADING}') == 3
    assert '"# What' not in source.replace('REPORT_HEADING = "# What', "")
