"""Run by tests/infer/test_distributed.py under ``torchrun --nproc-per-node 2``: the gradient that
DDP averages over two ranks, each with half of a global batch, against the gradient one
process computes on the whole global batch, with the same ε for every example.

Each example i draws its ε from a table fixed in advance (row i of particle k), whichever
rank or batch it sits in: a TorchFunctionMode fills Pyro's ``normal_`` draws from that table.
Rank 0 writes ``{loss name: largest absolute difference of any gradient element}`` to the JSON
file given as the first argument, and, under ``"metrics"``, the differences between evaluation
metrics all-reduced over the two ranks and the same metrics of one process on the whole set.
"""

from __future__ import annotations

import json
import sys

import pyro
import torch
import torch.distributed as dist
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.overrides import TorchFunctionMode

import pyro_vae as pv
from pyro_vae.infer import distributed
from pyro_vae.infer.compiled import CompiledStep
from pyro_vae.infer.distributed import DistributedStep, join
from pyro_vae.infer.objective import Objective
from pyro_vae.jobs.vae import epoch_metrics

NUM_DATA, DATA_DIM, LATENT, PARTICLES = 12, 6, 2, 3
GLOBAL_BATCH = [7, 2, 9, 0, 11, 4, 5, 1]  # 8 of the 12 examples, in shuffled order


class FixedNoise(TorchFunctionMode):
    """Fills the k-th ``normal_`` draw of a step with ``table[k, rows]``."""

    def __init__(self, table: torch.Tensor, rows: list[int]) -> None:
        super().__init__()
        self.table, self.rows, self.calls = table, rows, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.Tensor.normal_:
            noise = self.table[self.calls, self.rows]
            self.calls += 1
            return args[0].copy_(noise.reshape(args[0].shape))
        return func(*args, **(kwargs or {}))


def gradients(step, batch_rows: list[int], x: torch.Tensor, table: torch.Tensor) -> list:
    for parameter in step.trained:
        parameter.grad = None
    with FixedNoise(table, batch_rows):
        step.loss_and_grads(x[batch_rows], num_data=NUM_DATA)
    return [p.grad.clone() for p in step.trained]


def gradient_difference(
    ranks, loss, x: torch.Tensor, table: torch.Tensor, compile: bool = False
) -> float:
    """The largest difference between DDP's averaged gradient and one process's on the whole
    global batch (rank 0; the others return 0). A function of its own, so that its DDP module
    is freed before the process group is destroyed (a reducer outliving its group aborts the
    process at exit)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(ranks.rank)  # different initial weights: DDP must broadcast rank 0's
    vae = pv.VAE(DATA_DIM, LATENT, hidden_dims=(5,))
    objective = Objective(vae, loss)
    objective.parameters(x[:4], num_data=NUM_DATA)
    compiled = CompiledStep(objective) if compile else None
    step = DistributedStep(objective, torch.device("cpu"), compiled=compiled)
    # The ranks' halves as DistributedSampler would deal them.
    mine = GLOBAL_BATCH[ranks.rank :: ranks.world_size]
    if compile:
        # The first call traces and compiles, drawing on its own (through FixedNoise too):
        # a warm-up, so that the measured call draws the table's first particle.
        gradients(step, mine, x, table)
    averaged = gradients(step, mine, x, table)
    if compile:  # the compiled graph ran, not an eager fallback
        assert compiled is not None and compiled.eager_reason is None and compiled.traces == 1
    if not ranks.is_main:
        return 0.0
    whole = gradients(objective, GLOBAL_BATCH, x, table)
    return max(float((a - b).abs().max()) for a, b in zip(averaged, whole, strict=True))


def metrics_difference(ranks) -> float:
    """The run's evaluation metrics all-reduced over the ranks' rows against one process's on
    the whole set: a delta encoder makes every term deterministic, so they must agree up to
    the order of the sums. 11 examples: the ranks get 6 and 5."""
    pyro.set_rng_seed(0)  # the same model on both ranks
    vae = pv.build_vae(DATA_DIM, LATENT, encoder="delta", hidden_dims=[5])
    x = torch.bernoulli(torch.rand(11, DATA_DIM, generator=torch.Generator().manual_seed(2)))
    together = epoch_metrics(vae, x, "test", num_data=NUM_DATA)
    terms = pv.elbo_terms(vae, x, num_data=NUM_DATA)
    alone = [terms.elbo.mean(), terms.reconstruction.mean(), terms.kl.mean()]
    values = torch.arange(11.0) ** 2
    spread = distributed.mean_over_ranks(distributed.rows(values, ranks))
    differences = [abs(together[f"test_{k}"] - float(v)) for k, v in zip(KEYS, alone, strict=True)]
    return max([*differences, abs(float(spread) - float(values.mean()))])


KEYS = ("elbo", "reconstruction", "kl")


def disagreement_refused(ranks) -> bool:
    """fit given a checkpoint on rank 0 alone (the ranks would reach different collectives)
    refuses on every rank before the first step, instead of waiting for ever."""
    pyro.set_rng_seed(distributed.noise_seed(0, ranks.rank))
    vae = pv.VAE(DATA_DIM, LATENT, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((12, DATA_DIM), 0.5))
    try:
        pv.fit(
            vae,
            x,
            num_epochs=1,
            batch_size=3,
            progress=False,
            generator=torch.Generator().manual_seed(0),
            checkpoint=(lambda state: None) if ranks.is_main else None,
        )
    except ValueError as error:
        return "fit's arguments differ between ranks" in str(error)
    return False


def main() -> None:
    ranks, _ = join("cpu")
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand(NUM_DATA, DATA_DIM, generator=generator), generator=generator)
    table = torch.randn(PARTICLES, NUM_DATA, LATENT, generator=generator)
    largest = {}
    for loss in (
        Trace_ELBO(),
        TraceMeanField_ELBO(),
        RenyiELBO(alpha=0, num_particles=PARTICLES),
    ):
        difference = gradient_difference(ranks, loss, x, table)
        if ranks.is_main:
            largest[type(loss).__name__] = difference
        dist.barrier()
    # The compiled loss under DDP (fit(compile=True) under torchrun): its backward feeds the
    # same all-reduce.
    for loss in (Trace_ELBO(), TraceMeanField_ELBO()):
        difference = gradient_difference(ranks, loss, x, table, compile=True)
        if ranks.is_main:
            largest[f"compiled {type(loss).__name__}"] = difference
        dist.barrier()
    largest["metrics"] = metrics_difference(ranks)
    largest["refused"] = float(not disagreement_refused(ranks))
    if ranks.is_main:
        with open(sys.argv[1], "w") as file:
            json.dump(largest, file)
    distributed.leave()


if __name__ == "__main__":
    main()
