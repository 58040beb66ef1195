"""The one runner (pyro_vae.jobs.runner) for every model kind: a resumed run reads its
checkpoint once, and each kind goes through the same steps."""

import builtins
import os
from pathlib import Path

import pytest
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.jobs import JOBS

pytestmark = pytest.mark.usefixtures("float32")
train_script = load_script("train")

# The smallest run of each kind: one epoch on digits, no importance-weighted score (M2 has
# none).
KIND_FLAGS = {
    "vae": ("--latent-dim", "2", "--hidden-dims", "8", "--num-iw-particles", "0"),
    "m2": ("--model", "m2", "--num-labelled", "20", "--latent-dim", "2", "--hidden-dims", "8"),
    "cvae": (
        "--model",
        "cvae",
        "--latent-dim",
        "2",
        "--hidden-dims",
        "8",
        "--num-iw-particles",
        "0",
    ),
}


def reads_of(name: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every opening of a file called ``name`` for reading from here on, through os.open or
    open() (which every read in Python and torch goes through)."""
    opened: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path).name == name and flags & os.O_ACCMODE == os.O_RDONLY:
            opened.append(f"os.open({path})")
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)) and Path(file).name == name and "r" in mode:
            opened.append(f"open({file})")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    return opened


def test_every_kind_has_a_job_with_the_same_functions():
    functions = (
        "add_arguments",
        "check_arguments",
        "new_config",
        "check_run",
        "prepare",
        "epoch_row",
        "epoch_line",
        "finish",
        "summary",
        "evaluate",
        "table",
        "explain",
    )
    for kind, job in JOBS.items():
        assert job.KIND == kind
        assert all(callable(getattr(job, name, None)) for name in functions), kind
        assert isinstance(job.OWN_FLAGS, tuple) and isinstance(job.FILES, tuple)


@pytest.mark.parametrize("kind", sorted(KIND_FLAGS))
def test_a_resume_opens_the_checkpoint_once(kind, tmp_path, capsys, monkeypatch):
    out = tmp_path / kind
    flags = (*KIND_FLAGS[kind], "--no-progress", "--num-threads", "1")
    code, _, err = call(
        train_script, *flags, "--num-epochs", "1", "--out-dir", str(out), capsys=capsys
    )
    assert code == 0, err
    opened = reads_of("checkpoint.pt", monkeypatch)
    code, stdout, err = call(train_script, "--resume", str(out), "--num-epochs", "2", capsys=capsys)
    assert code == 0, err
    assert "resuming from the end of epoch 1" in stdout
    assert len(opened) == 1, opened


def test_overwrite_removes_the_files_of_a_run_of_another_kind(tmp_path, capsys):
    """--overwrite removes every file of the run there, whichever kind wrote it: the names
    come from every job (RUN_FILES), not from the kind that overwrites."""
    out = tmp_path / "run"
    common = ("--no-progress", "--num-threads", "1", "--num-epochs", "1", "--out-dir", str(out))
    code, _, err = call(train_script, *KIND_FLAGS["m2"], *common, capsys=capsys)
    assert code == 0, err
    assert (out / "accuracy.png").is_file() and (out / "style_transfer.png").is_file()
    code, _, err = call(train_script, *KIND_FLAGS["vae"], *common, "--overwrite", capsys=capsys)
    assert code == 0, err
    assert not (out / "accuracy.png").exists() and not (out / "style_transfer.png").exists()
    assert (out / "reconstructions.png").is_file()


def test_a_run_saved_before_a_flag_existed_resumes_with_the_value_it_trained_with(tmp_path, capsys):
    """A run whose saved arguments lack --compile (written before it existed) trained eager:
    a resume goes on eager instead of failing on the missing argument."""
    out = tmp_path / "old"
    flags = (*KIND_FLAGS["vae"], "--no-progress", "--num-threads", "1")
    code, _, err = call(
        train_script, *flags, "--num-epochs", "1", "--out-dir", str(out), capsys=capsys
    )
    assert code == 0, err
    model, payload = pv.load_checkpoint(out / "checkpoint.pt")
    del payload["args"]["compile"]
    extra = {k: v for k, v in payload.items() if k not in ("config", "state_dict", "format")}
    pv.save_checkpoint(out / "checkpoint.pt", model, payload["config"], **extra)
    assert "compile" not in pv.load_checkpoint(out / "checkpoint.pt")[1]["args"]
    code, stdout, err = call(train_script, "--resume", str(out), "--num-epochs", "2", capsys=capsys)
    assert code == 0, err
    assert "epoch   2/2" in stdout
