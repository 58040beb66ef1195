"""Faults during training: kills, Ctrl-C, divergence, hostile or broken checkpoint files. Each
test backs one row of the README's "What happens when…" table."""

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pyro_vae as pv

TRAIN = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
# A small digits run with a checkpoint after every step: many instants to be killed at.
# Every test here runs the script in a subprocess, as a user would: the slow end-to-end set.
pytestmark = pytest.mark.slow

RUN = ("--latent-dim", "3", "--hidden-dims", "16", "--num-iw-particles", "0", "--no-progress")


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=300
    )


def start_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(TRAIN), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, condition) -> dict:
    """Poll the run's checkpoint until ``condition(payload)``; return that payload."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before the fault could be injected"
        try:
            payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError):
            payload = None  # not written yet
        if payload is not None and condition(payload):
            return payload
        time.sleep(0.005)
    raise AssertionError("no checkpoint met the condition in time")


def comparable(run_dir: Path) -> tuple[dict, list]:
    """Weights and metrics of a finished run, without the wall-clock times."""
    weights = torch.load(run_dir / "checkpoint.pt", weights_only=True)["state_dict"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for row in metrics:
        row.pop("seconds")
    return weights, metrics


def assert_same_run(a: Path, b: Path) -> None:
    weights_a, metrics_a = comparable(a)
    weights_b, metrics_b = comparable(b)
    assert metrics_a == metrics_b
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def test_same_seed_same_arguments_give_identical_metrics(tmp_path):
    args = ("--num-epochs", "3", "--checkpoint-every", "1", *RUN)
    for name in ("a", "b"):
        assert train(*args, "--out-dir", str(tmp_path / name)).returncode == 0
    assert_same_run(tmp_path / "a", tmp_path / "b")
    final = [json.loads((tmp_path / n / "final_metrics.json").read_text()) for n in "ab"]
    for row in final:
        row.pop("train_seconds"), row.pop("total_seconds")
    assert final[0] == final[1]


@pytest.mark.parametrize(
    "variant",
    [
        ("--decoder", "deterministic", "--num-epochs", "25"),
        ("--decoder", "bayesian", "--num-epochs", "25"),
        # Fewer epochs: each of its three runs compiles its step (twice: the last, smaller
        # batch of an epoch is a second shape).
        ("--compile", "--num-epochs", "6"),
    ],
    ids=["decoder=deterministic", "decoder=bayesian", "compile"],
)
def test_sigkill_mid_epoch_then_resume_ends_exactly_like_an_uninterrupted_run(tmp_path, variant):
    """Also compiled (--compile): the resumed run compiles its step afresh, with the same
    arithmetic, and draws the same noise, so it ends bit for bit where the uninterrupted one
    does (pyro_vae/infer/compiled.py, "exact" under compilation)."""
    args = ("--checkpoint-every", "1", *variant, *RUN)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert train(*args, "--out-dir", str(reference)).returncode == 0

    process = start_train(*args, "--out-dir", str(killed))
    payload = wait_for_checkpoint(killed, process, lambda p: p["epoch"] >= 3 and p["step"] > 0)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    process.stderr.close()
    # The checkpoint left behind is whole, and from the middle of an epoch or later.
    left = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert (left["epoch"], left["step"]) >= (payload["epoch"], payload["step"])

    resumed = train("--resume", str(killed), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from epoch {left['epoch'] + 1}, step {left['step']}" in resumed.stdout
    assert_same_run(reference, killed)


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = start_train("--num-epochs", "200", *RUN, "--out-dir", str(run_dir))
    wait_for_checkpoint(run_dir, process, lambda p: p["epoch"] >= 2)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130
    assert stderr.count("\n") == 1 and "interrupted" in stderr and "--resume" in stderr, stderr
    left = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert left["epoch"] < 200
    resumed = train("--resume", str(run_dir), "--num-epochs", str(left["epoch"] + 2), *RUN[-1:])
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((run_dir / "metrics.json").read_text())) == left["epoch"] + 2


def test_divergence_names_the_step_keeps_the_last_good_checkpoint_and_exits_1(tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        "--learning-rate", "1e12", "--checkpoint-every", "1", *RUN, "--out-dir", str(run_dir)
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    # 1293 training rows (144 of digits' 1437 held out for validation) in batches of 128.
    assert "training diverged: loss is nan at epoch 1, step 2 of 11" in result.stderr
    vae, payload = pv.load_checkpoint(run_dir / "checkpoint.pt")
    assert (payload["epoch"], payload["step"]) == (0, 1)  # the step before the NaN
    assert all(torch.isfinite(p).all() for p in vae.parameters())


class _RunsCode:
    """Unpickling this calls Path.touch: code that runs on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_crafted_pickle_is_refused_without_running_it(tmp_path, writer):
    marker, path = tmp_path / "code-ran", tmp_path / "checkpoint.pt"
    payload = {"format": pv.checkpoint.FORMAT, "config": {}, "state_dict": _RunsCode(marker)}
    with path.open("wb") as file:
        (torch.save if writer == "torch.save" else pickle.dump)(payload, file)
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        pv.load_checkpoint(path)
    assert not marker.exists()
    result = train("--resume", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler would have run it.
    if writer == "pickle.dump":
        with path.open("rb") as file:
            pickle.load(file)  # the point of the test: unrestricted unpickling runs it
        assert marker.exists()


def test_truncated_checkpoint_gets_a_one_line_error(tmp_path):
    run_dir = tmp_path / "run"
    assert train("--num-epochs", "1", *RUN, "--out-dir", str(run_dir)).returncode == 0
    path = run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        pv.load_checkpoint(path)
    result = train("--resume", str(run_dir))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "not a loadable checkpoint" in result.stderr


def test_a_closed_stdout_costs_no_training_state(tmp_path):
    """``train.py | head -1``: the reader goes away after the first line. Training, the
    checkpoints and the results must not notice."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN), "--num-epochs", "3", *RUN, "--out-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().startswith("digits:")
    process.stdout.close()
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "Broken pipe" not in stderr, stderr
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 3
    assert json.loads((run_dir / "final_metrics.json").read_text())["epochs_trained"] == 3


def test_output_directory_that_cannot_be_created_exits_2_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # even root cannot make a directory inside a file
    result = train("--num-epochs", "1", *RUN, "--out-dir", str(blocker / "run"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot create output directory" in result.stderr
    assert "epoch" not in result.stdout  # refused before training started
