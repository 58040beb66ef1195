"""Training on many processes: ``torchrun``, ``torch.distributed`` and DDP, as they are.

``torchrun --nproc-per-node N scripts/train.py ...`` starts N processes (ranks) and gives each
its place in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, the rendezvous).
:func:`join` turns that into a process group (gloo on the CPU, NCCL on CUDA, one GPU per rank);
:func:`~pyro_vae.infer.fit.fit` sees the group and trains one model over all ranks
(docs/design.md, "Many processes"):

- the loss is the :class:`~pyro_vae.infer.objective.Objective`'s, computed by a module wrapped in
  ``DistributedDataParallel`` (:class:`DistributedStep`), whose averaged gradient is the
  gradient of the global batch (:meth:`DistributedStep.loss_and_grads` says why);
- every rank starts from rank 0's parameters (DDP broadcasts them) and draws its own noise;
- each epoch's shuffle is shared and sharded as ``DistributedSampler(drop_last=False)`` shards
  it (:func:`shard`);
- metrics are all-reduced, and only rank 0 writes.

Without torchrun nothing here does anything: one process, as before.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pyro_vae.infer.compiled import CompiledStep
from pyro_vae.infer.objective import Objective

# How long a rank waits in a collective (an all-reduce of gradients, of metrics) for the others
# before it gives up with an error: a rank that died or hangs never holds the others for ever.
# torchrun itself stops the other ranks at once when one exits with an error; this bounds the
# cases it cannot see (a frozen machine of a multi-node run). Long enough for rank 0 to write
# a checkpoint or a figure while the others wait.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes that train one model."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that speaks and writes."""
        return self.rank == 0


def ranks() -> Ranks:
    """The ranks of the initialized process group, or one process when there is none."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def describe(batch_size: int) -> str:
    """How many processes train, for a job's first line ("" on one process)."""
    group = ranks()
    if not group.distributed:
        return ""
    return (
        f"; {group.world_size} processes (torchrun), global batch {group.world_size} × "
        f"{batch_size} = {group.world_size * batch_size}"
    )


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets
    torch.distributed's environment variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def process_rank() -> int:
    """This process's rank: the process group's, or, before the group is joined, the one
    torchrun gave it (``RANK``); 0 for a process on its own."""
    if ranks().distributed or not launched_by_torchrun():
        return ranks().rank
    return int(os.environ["RANK"])


def join(device: str) -> tuple[Ranks, str]:
    """Join the process group that ``torchrun`` describes in the environment: gloo on the CPU,
    NCCL on CUDA with this rank's GPU (``LOCAL_RANK``). Returns the ranks and the device this
    process trains on (``device`` itself without torchrun, ``cuda:LOCAL_RANK`` for
    ``cuda``).

    :raises ValueError: when CUDA is asked for and this node has fewer GPUs than ranks.
    """
    if not launched_by_torchrun() or ranks().distributed:
        return ranks(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(device).type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} needs a GPU of its own, but this node has "
                f"{torch.cuda.device_count()}; start at most that many processes per node"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return ranks(), device


def leave(*, finished: bool = True) -> None:
    """Leave the process group, if this process joined one. ``finished``: every rank got to
    the end, so they wait for each other first and tear the group down together (a rank
    tearing down while another still works in the group can abort that one); after an error
    a rank leaves at once, since the others may be gone."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            try:
                dist.barrier()
            except RuntimeError:
                pass  # another rank failed after all and left: nothing to wait for
        # A DDP module kept alive by a reference cycle would outlive the group, and its
        # reducer then aborts the process at exit: collect it first.
        gc.collect()
        dist.destroy_process_group()


# What the error of a collective whose peer died or hung says: gloo raises a plain RuntimeError
# ("Connection reset by peer", "Connection closed by peer", "Timed out waiting ..."). Other
# errors of gloo or NCCL (a size mismatch, a duplicate GPU, out of memory) are bugs or setup
# errors, and keep their traceback.
_LOST_CONTACT = ("Connection reset", "Connection closed", "by peer", "Timed out", "timed out")


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` is a collective's failure to reach the other ranks (one of them died,
    or hangs past :data:`COLLECTIVE_TIMEOUT`), on many processes."""
    if not ranks().distributed or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, dist.DistNetworkError) or any(m in str(error) for m in _LOST_CONTACT)


# The random streams of a rank, each seeded apart (noise_seed).
NOISE_STREAMS = ("z", "binarization")


def noise_seed(seed: int, rank: int, stream: str = "z") -> int:
    """The seed of rank ``rank``'s own random draws of ``stream`` (``"z"``: torch's global
    state, the draws of z; ``"binarization"``: fit's binarization generator) in a run seeded
    with ``seed``: derived with numpy's SeedSequence, so that the streams of different ranks,
    of different purposes, and of the run's other uses of ``seed`` do not overlap.
    32 bits: numpy's global seed (``pyro.set_rng_seed``) takes no more."""
    key = (2, rank, NOISE_STREAMS.index(stream))
    (state,) = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint32)
    return int(state)


def seed_noise(seed: int) -> None:
    """On many processes, seed this rank's own draws of z apart from the others' (call it after
    the model was built alike on every rank, before fit); on one process, nothing."""
    group = ranks()
    if group.distributed:
        pyro.set_rng_seed(noise_seed(seed, group.rank, "z"))


def shard(order: Tensor, ranks: Ranks) -> Tensor:
    """This rank's part of an epoch's shuffle ``order`` (the same on every rank), taken as
    ``torch.utils.data.DistributedSampler(drop_last=False)`` takes it: the order is padded to a
    multiple of the world size with its own first entries, and rank r takes every
    world-size-th entry from r. Every example is seen in each epoch; when N is not a multiple
    of the world size, the first (world size − N mod world size) of the shuffle are seen twice,
    so that every rank has as many examples, and every step as large a batch."""
    if not ranks.distributed:
        return order
    size = len(order)
    padding = math.ceil(size / ranks.world_size) * ranks.world_size - size
    if padding:
        repeats = math.ceil(padding / size)
        order = torch.cat([order, order.repeat(repeats)[:padding]])
    return order[ranks.rank :: ranks.world_size]


def all_reduce_sum(values: Tensor) -> Tensor:
    """``values`` summed over the ranks (in place, and returned); unchanged on one process."""
    if ranks().distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` on one
    process."""
    if not ranks().distributed:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class _LossModule(nn.Module):
    """The objective as a ``torch.nn.Module``: its forward is Pyro's differentiable loss, and
    its parameters are the trained module's, which DDP broadcasts and all-reduces."""

    def __init__(self, objective: Objective, compiled: CompiledStep | None) -> None:
        super().__init__()
        self.trained_module = objective.module
        self._loss: Callable[..., Tensor] = (
            objective.differentiable_loss if compiled is None else compiled.differentiable_loss
        )

    def forward(self, *batch: Tensor, num_data: int) -> Tensor:
        return self._loss(*batch, num_data=num_data)


class DistributedStep:
    """One SVI step over all ranks: the :class:`~pyro_vae.infer.objective.Objective`'s loss,
    computed
    by a module wrapped in ``DistributedDataParallel``, so that backward averages the gradients
    over the ranks.

    :param objective: the model, guide and ELBO; :meth:`Objective.parameters` already called.
        Every parameter it trains must belong to the module (``nn.Module.parameters()``): DDP
        broadcasts and averages those alone.
    :param device: the device of this rank.
    :param compiled: the objective's :class:`~pyro_vae.infer.compiled.CompiledStep`, to compute the
        loss with a compiled graph (whose backward DDP's hooks see as any other), or ``None``.
    """

    def __init__(
        self, objective: Objective, device: torch.device, compiled: CompiledStep | None = None
    ) -> None:
        if not isinstance(objective.module, nn.Module):
            raise ValueError(
                f"training on many processes needs the model to be a torch.nn.Module (DDP "
                f"averages its parameters' gradients), got {type(objective.module).__name__}"
            )
        own = {id(p) for p in objective.module.parameters()}
        outside = [tuple(p.shape) for p in objective.trained if id(p) not in own]
        if outside:
            raise ValueError(
                f"training on many processes: {len(outside)} trained parameter(s) (shapes "
                f"{', '.join(map(str, outside[:3]))}) are not parameters of the "
                f"{type(objective.module).__name__} module (bare pyro.param?), so DDP would "
                "neither broadcast nor average them; make them parameters of the module"
            )
        self.trained = objective.trained
        # DDP broadcasts rank 0's parameters and buffers here: every rank starts from them.
        self.ddp = DistributedDataParallel(
            _LossModule(objective, compiled), device_ids=[device] if device.type == "cuda" else None
        )

    def loss_and_grads(self, *batch: Tensor, num_data: int) -> Tensor:
        """This rank's loss (its minibatch's, scaled to the dataset) and, in ``.grad``, the
        gradient of the global batch: the average over the ranks.

        Why the scale is N / B, with B the rank's own batch size: rank r's loss is
        (N / B) Σ_{i in its batch} ℓ_i, an estimate of the whole dataset's loss from its B
        examples, and DDP averages the W ranks' gradients: (1/W) Σ_r (N / B) Σ_{i in r} ∇ℓ_i
        = (N / (W B)) Σ_{i in the global batch} ∇ℓ_i, the gradient of the same estimate made
        from the global batch of W B examples. Every rank has as large a batch at every step
        (:func:`shard` pads), so the factor is the same on all. Under IWAE the scale multiplies
        each rank's log-sum-exp bound from outside (Objective.differentiable_loss), and the
        average is again the global batch's."""
        loss = self.ddp(*batch, num_data=num_data)
        loss.backward()
        return loss.detach()


def rows(x: Tensor, ranks: Ranks) -> Tensor:
    """This rank's share of an evaluation set: every world-size-th row from its rank, no row
    twice (unlike training's :func:`shard`), so that :func:`mean_over_ranks` is the set's mean."""
    return x[ranks.rank :: ranks.world_size] if ranks.distributed else x


def mean_over_ranks(local: Tensor) -> float:
    """The mean of the per-example values ``local`` (1-D) of every rank's :func:`rows`
    together: the mean over the whole set. On one process exactly ``local.mean().item()``."""
    if not ranks().distributed:
        return local.mean().item()
    totals = torch.stack([local.sum().double(), local.new_tensor(float(len(local))).double()])
    all_reduce_sum(totals)
    return (totals[0] / totals[1]).item()
