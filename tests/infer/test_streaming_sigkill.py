"""A streamed run killed with SIGKILL in the middle of an epoch, then resumed from its last
checkpoint, ends bit for bit as an uninterrupted one (issue 21, part 3): ``fit`` on a
memory-mapped ``.npy`` (:class:`pyro_vae.ArrayDataset`) through its ``DataLoader`` path, in a
subprocess (tests/infer/streamed_fit.py) as a script of one's own runs it, with and without
worker processes."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# Three processes each, of a few seconds: the slow set (as tests/jobs/test_faults.py's kills).
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("streamed_fit.py")
ROWS, DIM = 300, 10


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=300
    )


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, condition) -> dict:
    """Poll the run's checkpoint until ``condition(payload)``; return that payload."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        try:
            payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError):
            payload = None  # not written yet
        if payload is not None and condition(payload["training"]):
            return payload["training"]
        time.sleep(0.005)
    raise AssertionError("no checkpoint met the condition in time")


@pytest.mark.parametrize("num_workers", ["0", "2"])
def test_a_streamed_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(
    tmp_path, num_workers
):
    rows = tmp_path / "rows.npy"
    # Grayscale rows in [0, 1], binarized afresh for every batch (Bernoulli likelihood).
    np.save(rows, np.random.default_rng(5).random((ROWS, DIM), dtype=np.float32))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = run(str(rows), str(reference), num_workers)
    assert done.returncode == 0, done.stderr

    process = subprocess.Popen(
        [sys.executable, str(WORKER), str(rows), str(killed), num_workers],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # In the middle of epoch 2: past the first epoch's order, inside the KL warm-up.
        wait_for_checkpoint(killed, process, lambda t: t["epoch"] >= 1 and t["step"] > 0)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()
    left = torch.load(killed / "checkpoint.pt", weights_only=True)["training"]
    assert not (killed / "final.pt").exists()
    assert left["step"] > 0, "killed between two epochs, not in the middle of one"

    resumed = run(str(rows), str(killed), num_workers)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from epoch {left['epoch'] + 1}, step {left['step']}" in resumed.stdout
    expected = torch.load(reference / "final.pt", weights_only=True)
    actual = torch.load(killed / "final.pt", weights_only=True)
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    for name, weights in expected["state_dict"].items():
        assert torch.equal(weights, actual["state_dict"][name]), name
    assert torch.equal(expected["step_loss"], actual["step_loss"])
    assert torch.equal(expected["loss"], actual["loss"])
