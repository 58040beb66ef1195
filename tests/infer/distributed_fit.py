"""Run by tests/infer/test_distributed.py under ``torchrun --nproc-per-node 2``: ``fit`` itself
on two ranks, against one process with the global batch.

:func:`train` fits :class:`Location`, a model without latents: its loss and gradients are
deterministic, so two ranks of batch B and one process of batch 2B, which see the same global
batches (the shared shuffle, dealt alternately), take the same steps up to the order of the
sums. What fit records must then be the same: the step losses (all-reduced, then divided by
the number of ranks), the epoch losses, the steps per epoch, and β at every step of a KL
warm-up (whose length is counted in the ranks' own steps). :func:`first_binarized_batch` gives
the first batch a rank binarizes, drawn from its own generator.

Rank 0 writes ``{"fit": train(...), "binarized": [each rank's first binarized batch]}`` to the
JSON file given as the first argument.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

import pyro_vae as pv
from pyro_vae.infer import distributed

# 14 examples: two shards of 7, no padding, so that the ranks' global batches are exactly one
# process's; batches of 3 per rank: 3 steps an epoch (3, 3, 1), as one process's 6, 6, 2.
NUM_DATA, DATA_DIM, BATCH, EPOCHS, WARMUP_EPOCHS, SEED = 14, 4, 3, 3, 2, 7


class Location(PyroModule):
    """x ~ N(loc, I) in the data plate, and a penalty β |loc|² outside it (counted once per
    step, like a global KL): a loss with no random draw, that a warm-up's β changes."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(DATA_DIM, dtype=torch.float64))
        self.beta = 1.0
        self.betas: list[float] = []
        self.batches: list[torch.Tensor] = []

    @pyro_method
    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        pyro.factor("penalty", -self.beta * self.loc.pow(2).sum())
        with pyro.plate("data", size=num_data, subsample=x):
            pyro.sample("x", dist.Normal(self.loc, 1.0).to_event(1), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        # Once per step (and once for fit's look at the model before the first step).
        self.betas.append(self.beta)
        self.batches.append(x.detach().clone())


def data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(NUM_DATA, DATA_DIM, dtype=torch.float64, generator=generator) + 2.0


def train(batch_size: int) -> dict[str, Any]:
    """fit with a KL warm-up; what it recorded, and β at each step."""
    pyro.clear_param_store()
    model = Location()
    history = pv.fit(
        model,
        data(),
        num_epochs=EPOCHS,
        batch_size=batch_size,
        learning_rate=0.05,
        kl_warmup_epochs=WARMUP_EPOCHS,
        progress=False,
        generator=torch.Generator().manual_seed(SEED),
    )
    return {"step_loss": history.step_loss, "loss": history.loss, "betas": model.betas[1:]}


def first_binarized_batch() -> list[list[float]]:
    """The first batch this rank binarizes from data that are all 0.5: its draw alone."""
    pyro.clear_param_store()
    model = Location()
    pv.fit(
        model,
        torch.full((NUM_DATA, DATA_DIM), 0.5, dtype=torch.float64),
        num_epochs=1,
        batch_size=BATCH,
        binarize=True,
        progress=False,
        generator=torch.Generator().manual_seed(SEED),
    )
    return model.batches[1].tolist()  # [0] is fit's look at the first batch, not binarized


def main() -> None:
    ranks, _ = distributed.join("cpu")
    # Each rank's own torch state (fit refuses equal ones), as the jobs seed it.
    pyro.set_rng_seed(distributed.noise_seed(0, ranks.rank))
    fitted = train(BATCH)
    binarized = distributed.all_gather(first_binarized_batch())
    if ranks.is_main:
        with open(sys.argv[1], "w") as file:
            json.dump({"fit": fitted, "binarized": binarized}, file)
    distributed.leave()


if __name__ == "__main__":
    main()
