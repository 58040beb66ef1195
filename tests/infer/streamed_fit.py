"""Run by tests/infer/test_streaming_sigkill.py in a subprocess: ``fit`` on a memory-mapped
``.npy`` streamed through its ``DataLoader`` (:class:`pyro_vae.ArrayDataset`), with a
checkpoint after every step, as a script of one's own would write it, so that the test can
kill the process with SIGKILL in the middle of an epoch and run it again to resume.

    python streamed_fit.py ROWS.npy RUN_DIR [NUM_WORKERS]

``RUN_DIR/checkpoint.pt`` holds the weights and the :class:`~pyro_vae.TrainingState` after
each step, replaced whole (written beside it, then renamed); a run that finds one resumes
from it, and says from where on stdout. ``RUN_DIR/final.pt`` gets the weights and the losses
at the end.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch

import pyro_vae as pv

# 300 rows in batches of 4: 75 steps an epoch, a checkpoint after each (and a pause, so that
# the test's SIGKILL falls in the middle of an epoch).
EPOCHS, BATCH, LATENT, HIDDEN, SEED, PAUSE = 3, 4, 2, (8,), 0, 0.01


def save(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` at ``path``, whole or not at all: a kill leaves the previous file."""
    part = path.with_name(path.name + ".part")
    torch.save(payload, part)
    os.replace(part, path)


def main(npy: str, run_dir: str, num_workers: int = 0) -> None:
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    dataset = pv.ArrayDataset(npy)
    pyro.set_rng_seed(SEED)
    vae = pv.VAE(dataset.array.shape[1], LATENT, hidden_dims=HIDDEN)
    resume = None
    if (directory / "checkpoint.pt").is_file():
        payload = torch.load(directory / "checkpoint.pt", weights_only=True)
        vae.load_state_dict(payload["state_dict"])
        resume = pv.TrainingState.from_dict(payload["training"])
        print(f"resuming from epoch {resume.epoch + 1}, step {resume.step}", flush=True)

    def checkpoint(state: pv.TrainingState) -> None:
        save(
            directory / "checkpoint.pt",
            {"state_dict": vae.state_dict(), "training": state.to_dict()},
        )
        time.sleep(PAUSE)

    history = pv.fit(
        vae,
        dataset,
        num_epochs=EPOCHS,
        batch_size=BATCH,
        kl_warmup_epochs=2,
        checkpoint=checkpoint,
        checkpoint_every=1,
        resume=resume,
        generator=torch.Generator().manual_seed(SEED + 1),
        progress=False,
        num_workers=num_workers,
    )
    save(
        directory / "final.pt",
        {
            "state_dict": vae.state_dict(),
            "step_loss": torch.tensor(history.step_loss, dtype=torch.float64),
            "loss": torch.tensor(history.loss, dtype=torch.float64),
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(n) for n in sys.argv[3:]))
