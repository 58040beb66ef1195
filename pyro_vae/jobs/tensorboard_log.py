"""TensorBoard logs of a run: the epoch row's numbers as scalars, every epoch, and a grid of
samples and reconstructions every :data:`IMAGE_EVERY` epochs, in ``RUN/tensorboard/``, so that
``tensorboard --logdir runs/`` shows every run side by side.

TensorBoard is an optional extra (``pip install -e ".[tensorboard]"``; the ``dev`` extra has it
too): training needs none of it. A run logs when the ``tensorboard`` package is installed,
unless its arguments say ``tensorboard=False``; on many processes (torchrun) rank 0 alone
writes, from the epoch rows every rank already agrees on.

The images are drawn with the random state saved and put back afterwards, from the validation
set (the training subset without one), never the test set: a run that logs trains, stops and
resumes exactly as one that does not.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import weakref
from pathlib import Path
from typing import Any

import pyro.util
import torch
from torch import Tensor

import pyro_vae as pv
from pyro_vae.infer import distributed
from pyro_vae.jobs.runs import Setup
from pyro_vae.plots import image_grid

DIRECTORY = "tensorboard"
# Image grids at the first epoch, every IMAGE_EVERY-th, and the last.
IMAGE_EVERY = 5
# Images per grid: samples, and inputs with their reconstructions.
NUM_SAMPLES, NUM_INPUTS = 16, 8


def available() -> bool:
    """Whether the ``tensorboard`` package (which torch.utils.tensorboard writes with) is
    installed."""
    return importlib.util.find_spec("tensorboard") is not None


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--tensorboard`` / ``--no-tensorboard`` (default: on when the package is installed)."""
    parser.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write TensorBoard logs to RUN_DIR/tensorboard (default: when the tensorboard "
        'package is installed, pip install -e ".[tensorboard]")',
    )


class EpochBoard:
    """The TensorBoard writer of one run (a no-op where nothing is written: TensorBoard not
    wanted or not installed, or a rank other than 0). Open with :meth:`open`; :meth:`log` each
    epoch row; :meth:`close` at the end (also done when the board is collected). Nothing is
    written before the first epoch's row: a run stopped before it leaves no trace."""

    def __init__(
        self,
        directory: Path | None,
        setup: Setup | None,
        image_shape: tuple[int, ...],
        epochs_done: int = 0,
    ) -> None:
        self.directory = directory
        """Where the event files go; ``None``: nothing is written."""
        self.setup = setup
        self.image_shape = image_shape
        self.epochs_done = epochs_done
        self.writer: Any = None
        self._finalizer: weakref.finalize | None = None

    @classmethod
    def open(
        cls,
        args: argparse.Namespace,
        run_dir: Path,
        setup: Setup,
        image_shape: tuple[int, ...],
        epochs_done: int,
    ) -> EpochBoard:
        """The board of a run in ``run_dir`` that has ``epochs_done`` epochs behind it (0 for a
        new run: the event files of an old run overwritten there are removed when the first
        row is written; a resumed run appends, and TensorBoard drops what an earlier process
        logged after the checkpoint it resumes from)."""
        wanted = getattr(args, "tensorboard", None)
        if wanted is False or not distributed.ranks().is_main:
            return cls(None, None, image_shape)
        if not available():
            if wanted:
                raise ValueError(
                    '--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"'
                )
            return cls(None, None, image_shape)
        directory = run_dir / DIRECTORY
        if directory.is_symlink():
            raise ValueError(
                f"{directory} is a symbolic link; a run directory follows no link out of it"
            )
        return cls(directory, setup, image_shape, epochs_done)

    def _open_writer(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        assert self.directory is not None
        if self.epochs_done == 0 and self.directory.is_dir():
            for old in self.directory.glob("events.out.tfevents.*"):
                old.unlink()
        writer = SummaryWriter(str(self.directory), purge_step=self.epochs_done + 1)
        self._finalizer = weakref.finalize(self, writer.close)
        return writer

    def log(self, row: dict[str, Any], last_epoch: int) -> None:
        """The epoch row's numbers as scalars at step ``row["epoch"]`` (each under its own
        name in the row: ``train_loss``, ``val_elbo``, ...), and the image grids every
        :data:`IMAGE_EVERY` epochs, at the first and at ``last_epoch``."""
        if self.directory is None:
            return
        if self.writer is None:
            self.writer = self._open_writer()
        epoch = int(row["epoch"])
        for name, value in row.items():
            if name != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, epoch)
        if epoch == 1 or epoch % IMAGE_EVERY == 0 or epoch == last_epoch:
            for name, grid in self.grids().items():
                form = "HW" if grid.ndim == 2 else "HWC"
                self.writer.add_image(name, grid, epoch, dataformats=form)
        self.writer.flush()

    def grids(self) -> dict[str, Any]:
        """The image grids of the model as it is now (numpy arrays), drawn without touching
        the random state training goes on from."""
        assert self.setup is not None
        device = next(self.setup.model.parameters()).device
        saved = pyro.util.get_rng_state()  # torch's CPU stream, Python's and numpy's
        try:
            # and the accelerator's stream, which draws on a GPU use
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                return {
                    name: _grid(images, self.image_shape)
                    for name, images in images_of(self.setup).items()
                }
        finally:
            pyro.util.set_rng_state(saved)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def _grid(images: Tensor, image_shape: tuple[int, ...]) -> Any:
    cols = min(len(images), 8)
    return image_grid(images.float().clamp(0, 1), image_shape, math.ceil(len(images) / cols), cols)


def images_of(setup: Setup) -> dict[str, Tensor]:
    """What the grids show, by tag: ``samples`` (z ~ p(z)) and ``reconstructions`` (a row of
    inputs over a row of their reconstructions) for a VAE, ``samples_by_class`` (a row per
    class, one z per column) for M2, ``completions`` (rows: the given pixels with the missing
    ones grey, a completion, the truth) for the CVAE. Inputs come from the validation set (the
    training subset without one), never the test set."""
    model, scored = setup.model, setup.scored
    split = "val" if "val" in scored else "train"
    x = scored[split][:NUM_INPUTS]
    if isinstance(model, pv.VAE):
        return {
            "samples": model.sample(NUM_SAMPLES),
            "reconstructions": torch.cat([x, model.reconstruct(x, weights="mean")]),
        }
    if isinstance(model, pv.M2):
        z = torch.randn(NUM_INPUTS, model.latent_dim, device=model.device, dtype=model.dtype)
        classes = torch.arange(model.num_labels, device=model.device)
        return {
            "samples_by_class": model.decode(
                z.repeat(model.num_labels, 1), classes.repeat_interleave(NUM_INPUTS)
            )
        }
    if isinstance(model, pv.ConditionalVAE):
        mask, c = scored["mask"], scored[f"{split}_given"][:NUM_INPUTS]
        missing = torch.full_like(x, 0.5)
        return {
            "completions": torch.cat(
                [
                    pv.merge_by_mask(missing, c, mask),
                    pv.merge_by_mask(model.sample(c, 1)[0], c, mask),
                    pv.merge_by_mask(x, c, mask),
                ]
            )
        }
    return {}
