"""The one runner (pyro_vae.jobs.runner) for every model kind: a resumed run reads its
checkpoint once, and each kind goes through the same steps."""

import builtins
import json
import os
from pathlib import Path

import pytest
import torch
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.data import validation_indices
from pyro_vae.jobs import JOBS, load_run

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


def scripted_val_elbo(values: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    """The VAE job's epoch rows with the validation ELBO ``values[epoch - 1]``: the runner's
    choice of epoch and its early stop, on a score that does what the test says."""
    real = JOBS["vae"].epoch_row

    def epoch_row(setup, args, epoch):  # type: ignore[no-untyped-def]
        return {**real(setup, args, epoch), "val_elbo": values[epoch - 1]}

    monkeypatch.setattr(JOBS["vae"], "epoch_row", epoch_row)


def test_the_best_epoch_by_validation_is_kept_scored_and_stops_the_run(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    # Best at epoch 2; --patience 2 stops after epoch 4 of 6.
    scripted_val_elbo([-10.0, -9.0, -9.5, -9.2, -8.0, -7.0], monkeypatch)
    scored: list[dict] = []
    real_finish = JOBS["vae"].finish

    def finish(setup, *args):  # type: ignore[no-untyped-def]
        scored.append({k: v.clone() for k, v in setup.model.state_dict().items()})
        return real_finish(setup, *args)

    monkeypatch.setattr(JOBS["vae"], "finish", finish)
    flags = (*KIND_FLAGS["vae"], "--no-progress", "--num-threads", "1", "--patience", "2")
    code, stdout, err = call(
        train_script, *flags, "--num-epochs", "6", "--out-dir", str(out), capsys=capsys
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1, 2, 3, 4]
    assert "stopping early: 2 epoch(s) without a better validation ELBO than epoch 2's" in stdout
    final = json.loads((out / "final_metrics.json").read_text())
    assert (final["best_epoch"], final["epochs_trained"], final["best_val_elbo"]) == (2, 4, -9.0)
    assert final["selected_by"] == "the best validation ELBO"
    best, kept = pv.load_checkpoint(out / "best.pt")
    last, payload = pv.load_checkpoint(out / "checkpoint.pt")
    assert kept["selection"]["epoch"] == 2 and payload["epoch"] == 4
    # The test set scored the kept weights (epoch 2's), not the last ones.
    (weights,) = scored
    for name, value in best.state_dict().items():
        assert torch.equal(weights[name], value), name
    assert any(not torch.equal(v, last.state_dict()[k]) for k, v in best.state_dict().items())
    # evaluate.py and explain.py read the kept epoch.
    assert load_run(out).selection == kept["selection"]


def test_a_resume_goes_on_from_the_best_epoch_so_far(tmp_path, capsys, monkeypatch):
    """The best epoch before a resume is remembered (from the rows), and its weights come
    from best.pt when no later epoch beats it."""
    out = tmp_path / "run"
    scripted_val_elbo([-9.0, -10.0, -11.0], monkeypatch)
    flags = (*KIND_FLAGS["vae"], "--no-progress", "--num-threads", "1")
    code, _, err = call(
        train_script, *flags, "--num-epochs", "2", "--out-dir", str(out), capsys=capsys
    )
    assert code == 0, err
    code, stdout, err = call(train_script, "--resume", str(out), "--num-epochs", "3", capsys=capsys)
    assert code == 0, err
    final = json.loads((out / "final_metrics.json").read_text())
    assert (final["best_epoch"], final["epochs_trained"]) == (1, 3)
    assert "scoring epoch 1, the best validation ELBO, on the test set" in stdout


def test_the_validation_rows_are_recorded_and_checked(tmp_path, capsys):
    out = tmp_path / "run"
    flags = (*KIND_FLAGS["vae"], "--no-progress", "--num-threads", "1", "--val-size", "100")
    code, stdout, err = call(
        train_script, *flags, "--num-epochs", "1", "--out-dir", str(out), capsys=capsys
    )
    assert code == 0, err
    assert "1337 train / 100 validation / 360 test examples" in stdout
    model, payload = pv.load_checkpoint(out / "checkpoint.pt")
    held = payload["validation_indices"]
    assert torch.equal(held, validation_indices(1437, 100, seed=0)) and len(held.unique()) == 100
    run = load_run(out)
    assert len(run.data.x_train) == 1337 and run.x_val is not None and len(run.x_val) == 100
    payload["validation_indices"] = held + 1  # as if the split had changed since
    extra = {k: v for k, v in payload.items() if k not in ("config", "state_dict", "format")}
    pv.save_checkpoint(out / "checkpoint.pt", model, payload["config"], **extra)
    with pytest.raises(ValueError, match="validation rows are not the ones --val-size 100"):
        load_run(out)
    code, _, err = call(train_script, "--resume", str(out), "--num-epochs", "2", capsys=capsys)
    assert code == 2 and "validation rows are not the ones" in err


def test_without_a_validation_set_the_last_epoch_is_kept_and_it_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    flags = (*KIND_FLAGS["vae"], "--no-progress", "--num-threads", "1", "--val-size", "0")
    code, stdout, err = call(
        train_script, *flags, "--num-epochs", "2", "--out-dir", str(out), capsys=capsys
    )
    assert code == 0, err
    assert "note: no validation set (--val-size 0)" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert not [key for row in metrics for key in row if key.startswith(("val_", "test_"))]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["best_epoch"] == 2 and final["selected_by"] == "the last epoch (no validation)"


def test_a_resume_keeps_the_run_s_thread_count_unless_one_is_given(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    flags = (*KIND_FLAGS["vae"], "--no-progress", "--num-threads", "1")
    code, _, err = call(
        train_script, *flags, "--num-epochs", "1", "--out-dir", str(out), capsys=capsys
    )
    assert code == 0, err
    seen: list[int] = []
    real_fit = pv.fit

    def fit(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(pv, "fit", fit)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # as a fresh process starts: one thread per core
        code, _, err = call(train_script, "--resume", str(out), "--num-epochs", "2", capsys=capsys)
        assert code == 0, err
        assert seen == [1]  # the run's --num-threads 1, not the default
    finally:
        torch.set_num_threads(before)
