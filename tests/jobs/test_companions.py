"""The checkpoints beside a run's checkpoint.pt (best.pt, the CVAE's baseline.pt) are checked
against the run before they are used (issue 23): one copied from another run (another seed,
another number of epochs) is refused in one line naming the mismatch, instead of changing the
numbers reported without a word."""

import shutil
from pathlib import Path

import pytest
import torch
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.jobs import load_run

pytestmark = pytest.mark.usefixtures("float32")
train_script, evaluate_script = map(load_script, ("train", "evaluate"))

CVAE = (
    *("--model", "cvae", "--latent-dim", "2", "--hidden-dims", "8", "--num-iw-particles", "0"),
    *("--no-progress", "--num-threads", "1"),
)
EVALUATE = ("--num-iw-particles", "2", "--no-progress", "--max-examples", "10")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three finished CVAE runs: "ours" (seed 0, 1 epoch), "seed" (seed 1, 1 epoch) and
    "epochs" (seed 0, 2 epochs)."""
    torch.set_default_dtype(torch.float32)
    root = tmp_path_factory.mktemp("companions")
    made = {}
    for name, seed, epochs in (("ours", "0", "1"), ("seed", "1", "1"), ("epochs", "0", "2")):
        out = root / name
        flags = (*CVAE, "--seed", seed, "--num-epochs", epochs, "--out-dir", str(out))
        assert train_script.run(list(flags)) == 0
        made[name] = out
    return made


def with_file_of(runs: dict[str, Path], other: str, name: str, tmp_path: Path) -> Path:
    """A copy of our run with ``name`` taken from the run ``other``."""
    copy = tmp_path / "run"
    shutil.copytree(runs["ours"], copy)
    shutil.copyfile(runs[other] / name, copy / name)
    return copy


def test_a_run_s_own_companions_pass_wherever_the_run_is_moved(runs, tmp_path, capsys):
    moved = tmp_path / "elsewhere"
    shutil.copytree(runs["ours"], moved)
    assert load_run(moved).selection is not None
    code, _, err = call(evaluate_script, str(moved), *EVALUATE, capsys=capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    ("other", "said"),
    [("seed", "its --seed is 1, this run's 0"), ("epochs", "it trained for 2 epoch(s)")],
)
def test_a_baseline_copied_from_another_run_is_refused(runs, tmp_path, capsys, other, said):
    run = with_file_of(runs, other, "baseline.pt", tmp_path)
    code, out, err = call(evaluate_script, str(run), *EVALUATE, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and out == "", err
    assert "baseline.pt: belongs to another run" in err and said in err, err
    assert not (run / "evaluation.json").exists()


def test_a_best_pt_copied_from_another_run_is_refused(runs, tmp_path, capsys):
    run = with_file_of(runs, "seed", "best.pt", tmp_path)
    code, _, err = call(evaluate_script, str(run), *EVALUATE, capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "best.pt: belongs to another run: its --seed is 1, this run's 0" in err, err


def rewrite_best(run: Path, **changes: object) -> None:
    """best.pt with some entries replaced (None: removed), saved as train.py saves it."""
    model, payload = pv.load_checkpoint(run / "best.pt")
    extra = {k: v for k, v in payload.items() if k not in ("format", "config", "state_dict")}
    extra.update(changes)
    extra = {k: v for k, v in extra.items() if v is not None}
    pv.save_checkpoint(run / "best.pt", model, payload["config"], **extra)


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        # A best.pt written before it recorded the run's arguments: its selection still tells.
        ({"args": None, "epoch_value": -1.0}, "says epoch 1's val_elbo was -1.0"),
        ({"epoch": 3}, "names epoch 3, not an epoch of this run"),
        ({"extra": 1}, "holds 'extra', an entry no run"),
        ({"metric": 5}, "has the keys"),
    ],
)
def test_a_crafted_best_pt_is_refused(runs, tmp_path, capsys, changes, said):
    run = tmp_path / "run"
    shutil.copytree(runs["ours"], run)
    selection = dict(pv.load_checkpoint(run / "best.pt")[1]["selection"])
    entries: dict[str, object] = {}
    for key, value in changes.items():
        if key == "epoch_value":
            selection["value"] = value
        elif key in ("epoch", "metric"):
            selection[key] = value
            if key == "metric":
                selection.pop("value")
                selection["value2"] = 1.0
        else:
            entries[key] = value
    rewrite_best(run, selection=selection, **entries)
    code, _, err = call(evaluate_script, str(run), *EVALUATE, capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "best.pt: " in err and said in err, err


def test_a_baseline_trained_by_a_resume_that_asked_for_no_more_epochs_passes(
    runs, tmp_path, capsys
):
    """A run stopped after epoch 1 of 3 and resumed with --num-epochs 1 trains no more: its
    checkpoint.pt still says 3 epochs, and the baseline trained for the 1 done."""
    run = tmp_path / "run"
    shutil.copytree(runs["ours"], run)
    model, payload = pv.load_checkpoint(run / "checkpoint.pt")
    payload["args"]["num_epochs"] = 3  # as a run of 3 epochs stopped after its first
    extra = {k: v for k, v in payload.items() if k not in ("format", "config", "state_dict")}
    pv.save_checkpoint(run / "checkpoint.pt", model, payload["config"], **extra)
    (run / "baseline.pt").unlink()
    code, _, err = call(train_script, "--resume", str(run), "--num-epochs", "1", capsys=capsys)
    assert code == 0, err
    assert pv.load_checkpoint(run / "checkpoint.pt")[1]["args"]["num_epochs"] == 3
    code, _, err = call(evaluate_script, str(run), *EVALUATE, capsys=capsys)
    assert code == 0, err
