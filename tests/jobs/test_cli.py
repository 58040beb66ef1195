"""What the scripts share on the command line (pyro_vae/jobs/cli.py): output that never costs
a run, whatever became of stdout."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.jobs import cli

TRAIN = Path(__file__).resolve().parents[2] / "scripts" / "train.py"


def test_say_without_a_stdout_says_nothing_and_touches_no_file_descriptor(monkeypatch):
    """``>&-``: Python starts with no sys.stdout. say is then silent, and leaves descriptor 1
    alone (a file the run opened since may hold that number)."""
    monkeypatch.setattr(sys, "stdout", None)
    duplicated = []
    monkeypatch.setattr(cli.os, "dup2", lambda *args: duplicated.append(args))
    cli.say("epoch 1/2")
    cli.stage_printer()("scoring")
    assert duplicated == [] and sys.stdout is None


@pytest.mark.slow
def test_a_run_started_with_stdout_closed_completes(tmp_path):
    """``train.py ... >&-``: the output goes nowhere, the run completes and writes its
    files."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, str(TRAIN), "--num-epochs", "2", "--latent-dim", "2",
        "--hidden-dims", "8", "--num-iw-particles", "0", "--no-progress",
        "--out-dir", str(run_dir),
    ]  # fmt: skip
    done = subprocess.run(
        ["bash", "-c", '"$@" >&-', "bash", *command],
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert (run_dir / "final_metrics.json").is_file()
