"""TensorBoard logs of scripts/train.py runs (pyro_vae.jobs.tensorboard_log), read back with
TensorBoard's own EventAccumulator: the scalars are metrics.json's values, epoch by epoch, the
image grids come every few epochs, and logging changes nothing of the training."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scripts_in_process import call, load_script

from pyro_vae.jobs import tensorboard_log
from pyro_vae.jobs.tensorboard_log import DIRECTORY, EpochBoard

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)
from torch.utils.tensorboard import SummaryWriter

train_script = load_script("train")
TINY = ("--latent-dim", "3", "--hidden-dims", "16", "--no-progress", "--num-iw-particles", "0",
        "--seed", "2")  # fmt: skip

# Every test here runs the scripts, in float32 (conftest.py).
pytestmark = pytest.mark.usefixtures("float32")


def train(*argv: str, capsys) -> None:
    code, _, err = call(train_script, *TINY, *argv, capsys=capsys)
    assert code == 0, err


def events(run_dir: Path) -> EventAccumulator:
    board = EventAccumulator(str(run_dir / DIRECTORY), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    return board


def metrics(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())


def check_scalars(board: EventAccumulator, rows: list[dict]) -> None:
    """Every number of every epoch row, at its epoch, once, as TensorBoard stores it (float32)."""
    names = [name for name in rows[0] if name != "epoch"]
    assert sorted(board.Tags()["scalars"]) == sorted(names)
    for name in names:
        logged = [(event.step, event.value) for event in board.Scalars(name)]
        expected = [(row["epoch"], float(np.float32(row[name]))) for row in rows]
        assert logged == expected, name


def test_the_scalars_are_metrics_json_and_images_come_every_few_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    train("--num-epochs", "6", "--out-dir", str(out), capsys=capsys)
    board = events(out)
    rows = metrics(out)
    assert len(rows) == 6 and "val_elbo" in rows[0]
    check_scalars(board, rows)
    assert sorted(board.Tags()["images"]) == ["reconstructions", "samples"]
    # The first epoch, every 5th, and the last.
    assert [event.step for event in board.Images("samples")] == [1, 5, 6]
    # A grid of 16 samples of 8x8 digits, 8 to a row: 2 rows, 1-pixel gaps.
    image = board.Images("samples")[0]
    assert (image.height, image.width) == (2 * 9 - 1, 8 * 9 - 1)


def test_logging_changes_nothing_of_the_training(tmp_path, capsys, monkeypatch):
    logged, plain = tmp_path / "logged", tmp_path / "plain"
    train("--num-epochs", "5", "--out-dir", str(logged), capsys=capsys)
    monkeypatch.setattr(tensorboard_log, "available", lambda: False)
    train("--num-epochs", "5", "--out-dir", str(plain), capsys=capsys)
    assert (logged / DIRECTORY).is_dir() and not (plain / DIRECTORY).exists()

    def numbers(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics(run_dir)]

    assert numbers(logged) == numbers(plain)


def test_a_resume_goes_on_and_an_overwrite_starts_again(tmp_path, capsys):
    out = tmp_path / "run"
    train("--num-epochs", "2", "--out-dir", str(out), capsys=capsys)
    # A process that logged epoch 3 and died before its checkpoint: the resume does epoch 3
    # again, and TensorBoard keeps the new epoch 3 only.
    time.sleep(1.1)  # event files are read in the order of their names: seconds first
    ghost = SummaryWriter(str(out / DIRECTORY))
    for name in list(metrics(out)[0])[1:]:  # the numbers after "epoch"
        ghost.add_scalar(name, 999.0, 3)
    ghost.close()
    time.sleep(1.1)
    code, _, err = call(train_script, "--resume", str(out), "--num-epochs", "4", capsys=capsys)
    assert code == 0, err
    check_scalars(events(out), metrics(out))  # steps 1 to 4, each once
    train("--num-epochs", "1", "--out-dir", str(out), "--overwrite", capsys=capsys)
    rows = metrics(out)
    assert len(rows) == 1
    check_scalars(events(out), rows)  # the old run's events are gone
    assert len(list((out / DIRECTORY).iterdir())) == 1


@pytest.mark.parametrize(
    ("argv", "tag"),
    [
        (("--model", "m2", "--num-labelled", "30"), "samples_by_class"),
        (("--model", "cvae", "--given-quadrants", "1"), "completions"),
    ],
)
def test_m2_and_the_cvae_log_their_own_grids(tmp_path, capsys, argv, tag):
    out = tmp_path / "run"
    code, _, err = call(
        train_script, *argv, "--latent-dim", "2", "--hidden-dims", "16", "--no-progress",
        "--num-epochs", "1", "--out-dir", str(out), capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    board = events(out)
    check_scalars(board, metrics(out))
    assert board.Tags()["images"] == [tag]


def test_only_rank_0_writes(tmp_path, monkeypatch):
    args = SimpleNamespace()
    setup = SimpleNamespace()
    monkeypatch.setattr(
        tensorboard_log.distributed, "ranks", lambda: SimpleNamespace(is_main=False)
    )
    board = EpochBoard.open(args, tmp_path, setup, (8, 8), 0)  # type: ignore[arg-type]
    board.log({"epoch": 2, "train_loss": 1.0}, 3)  # no image at epoch 2 of 3
    board.close()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tensorboard_log.distributed, "ranks", lambda: SimpleNamespace(is_main=True))
    board = EpochBoard.open(args, tmp_path, setup, (8, 8), 0)  # type: ignore[arg-type]
    board.log({"epoch": 2, "train_loss": 1.0}, 3)  # no image at epoch 2 of 3
    board.close()
    assert [p.name for p in tmp_path.iterdir()] == [DIRECTORY]


def test_tensorboard_false_writes_nothing(tmp_path):
    board = EpochBoard.open(
        SimpleNamespace(tensorboard=False), tmp_path, SimpleNamespace(), (8, 8), 0
    )  # type: ignore[arg-type]
    board.log({"epoch": 2, "train_loss": 1.0}, 3)
    assert list(tmp_path.iterdir()) == []


def test_the_flag_turns_the_logs_off_and_on_and_a_resume_may_change_it(tmp_path, capsys):
    """--no-tensorboard writes nothing; a resume keeps the run's choice unless given either
    spelling (RESUME_OVERRIDES), and then writes its own epochs only."""
    out = tmp_path / "run"
    train("--num-epochs", "1", "--no-tensorboard", "--out-dir", str(out), capsys=capsys)
    assert not (out / DIRECTORY).exists()
    code, _, err = call(train_script, "--resume", str(out), "--num-epochs", "2", capsys=capsys)
    assert code == 0, err
    assert not (out / DIRECTORY).exists()  # the run's own --no-tensorboard, kept
    code, _, err = call(
        train_script, "--resume", str(out), "--num-epochs", "3", "--tensorboard", capsys=capsys
    )
    assert code == 0, err
    assert [event.step for event in events(out).Scalars("train_loss")] == [3]
    code, _, err = call(
        train_script, "--resume", str(out), "--num-epochs", "4", "--no-tensorboard", capsys=capsys
    )
    assert code == 0, err
    assert [event.step for event in events(out).Scalars("train_loss")] == [3]
