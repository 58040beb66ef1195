"""One training step of :func:`~pyro_vae.infer.fit.fit`, and what it leaves to be read.

:func:`make_stepper` chooses what computes a step's loss and gradients: the
:class:`~pyro_vae.infer.objective.Objective` itself (eager), its
:class:`~pyro_vae.infer.compiled.CompiledStep`, or, on many processes, its
:class:`~pyro_vae.infer.distributed.DistributedStep`. :func:`compute_gradients` runs one step
and leaves the gradients in ``.grad`` (clipped) for the optimizer; its :data:`Outcome` (the
per-example loss, the gradient norm and the stop flag) stays on the device until
:func:`read_outcomes` reads the steps not read yet, all at once, and refuses a non-finite one
(docs/design.md, "Host reads"). :func:`make_optimizer` makes the optimizer the step feeds, and
:func:`sigint_flag` turns Ctrl-C into the stop flag that a step carries.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch
from torch import Tensor

from pyro_vae.infer import distributed
from pyro_vae.infer.compiled import CompiledStep
from pyro_vae.infer.objective import Objective
from pyro_vae.infer.state import TrainingDivergedError

# Builds the optimizer from the trained parameters (fit's ``optimizer``).
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]

# What computes a step's loss and gradients (make_stepper).
Stepper = Objective | CompiledStep | distributed.DistributedStep

# What a step leaves to be read (compute_gradients): its per-example loss, gradient norm and
# stop flag.
Outcome = Tensor | tuple[float, float, float]


def make_stepper(
    objective: Objective, compile: bool, group: distributed.Ranks, device: torch.device
) -> Stepper:
    """What computes each step's loss and gradients: the objective itself, its compiled step,
    or, on many processes, its DDP-wrapped module."""
    if not group.distributed:
        return CompiledStep(objective) if compile else objective
    # Compiled under DDP: the loss alone is compiled, and autograd's backward through it
    # brings the gradients to DDP's hooks, which average them.
    return distributed.DistributedStep(
        objective, device, compiled=CompiledStep(objective) if compile else None
    )


def make_optimizer(
    factory: OptimizerFactory | None,
    parameters: list[Tensor],
    learning_rate: float,
    compile: bool,
    read_every: int,
) -> torch.optim.Optimizer:
    """The optimizer of ``parameters``: ``factory``'s, checked, or Adam at ``learning_rate``.
    Reads every ``read_every > 1`` steps need a fused one: it skips a step on the device
    (``found_inf``) once a step is found not finite, until the read stops training there."""
    deferred = read_every > 1
    if factory is None:
        # Fused Adam: one kernel for all parameters (compile), and the only Adam that skips a
        # step on the device (found_inf) when a deferred read finds a non-finite step too late.
        return torch.optim.Adam(
            parameters, lr=learning_rate, fused=True if (compile or deferred) else None
        )
    made = factory(list(parameters))
    if not isinstance(made, torch.optim.Optimizer):
        raise ValueError(
            f"optimizer must return a torch.optim.Optimizer, got {type(made).__name__}"
        )
    held = {id(p) for group in made.param_groups for p in group["params"]}
    missing = sum(id(p) not in held for p in parameters)
    if missing:
        raise ValueError(
            f"the optimizer lacks {missing} of the {len(parameters)} parameters it was given; "
            "training would leave them as they are"
        )
    if deferred and not all(group.get("fused") for group in made.param_groups):
        # An optimizer that is not fused cannot skip a step on the device (found_inf): a
        # non-finite step found at a late read would already have changed the parameters.
        raise ValueError(
            f"reads every {read_every} steps (log_every, 25 by default on a GPU) need a fused "
            "optimizer, which skips a non-finite step on the device: make it with fused=True "
            "(Adam, AdamW, SGD and Adagrad offer it), or pass log_every=1"
        )
    return made


def noise_generator(
    generator: torch.Generator | None, group: distributed.Ranks, settings: dict[str, Any]
) -> torch.Generator | None:
    """The generator of the binarization: ``generator`` itself on one process. On many, the
    shuffle must be one for all ranks and the noise each rank's own: ``generator`` (the same
    on every rank, checked) shuffles, and each rank binarizes from a generator of its own,
    seeded from ``generator``'s seed and the rank; and torch's random states (the draws of
    z) must differ between ranks, checked."""
    if not group.distributed:
        return generator
    if generator is None:
        raise ValueError(
            "training on many processes needs a generator, seeded the same on every rank: "
            "it draws the shuffle that the ranks share"
        )
    states = distributed.all_gather(
        (_digest(generator.get_state()), _digest(torch.get_rng_state()), settings)
    )
    if len({repr(agreed) for _, _, agreed in states}) != 1:
        # A collective reached by some ranks only would wait for the others for ever: every
        # rank must make the same steps, reads and checkpoints.
        raise ValueError(
            "fit's arguments differ between ranks ("
            + "; ".join(f"rank {r}: {agreed}" for r, (_, _, agreed) in enumerate(states))
            + "); call fit with the same arguments on every rank (only rank 0 writes the "
            "checkpoints it is given)"
        )
    if len({shuffle for shuffle, _, _ in states}) != 1:
        raise ValueError(
            "the generator differs between ranks; seed it the same on every rank (it draws "
            "the shuffle that the ranks share)"
        )
    if len({draws for _, draws, _ in states}) != group.world_size:
        raise ValueError(
            "torch's random state is the same on two ranks, which would draw the same z on "
            "both; seed each rank apart, e.g. torch.manual_seed(pyro_vae.infer.distributed."
            "noise_seed(seed, rank))"
        )
    seed = distributed.noise_seed(generator.initial_seed(), group.rank, "binarization")
    return torch.Generator(generator.device).manual_seed(seed)


def _digest(state: Tensor) -> str:
    return hashlib.sha256(state.cpu().numpy().tobytes()).hexdigest()


def compute_gradients(
    stepper: Stepper,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Tensor, ...],
    num_data: int,
    clip_norm: float | None,
    *,
    validate: bool,
    interrupted: bool,
    on_host: bool,
) -> Outcome:
    """The loss and gradients of one SVI step, the gradients left in ``.grad`` (clipped) for
    the optimizer. Returns the per-example loss (on many processes the mean over the ranks),
    the gradient norm, and whether a stop was asked for (on many processes: by any rank): as
    Python numbers when ``on_host`` (one process reading every step, where plain numbers cost
    least), else on the device, without reading them."""
    optimizer.zero_grad(set_to_none=True)
    with pyro.validation_enabled(validate):
        loss = stepper.loss_and_grads(*batch, num_data=num_data)
    trained = stepper.trained
    if on_host:
        norm = _gradient_norm(trained, clip_norm, batch[0].device)
        return (float(loss) / num_data, float(norm), float(interrupted))
    device = batch[0].device
    # float64, as Python's float: the step losses are the same numbers as fit's before. (A
    # Python float, from Pyro's eager step, is filled in on the device: no copy from the host.)
    if isinstance(loss, Tensor):
        per_example = loss.to(torch.float64) / num_data
    else:
        per_example = torch.full((), loss, dtype=torch.float64, device=device) / num_data
    # new_full fills on the device; torch.tensor(x, device=cuda) would copy from the host and
    # wait for the device: a host sync at every step.
    shared = torch.stack([per_example, per_example.new_full((), float(interrupted))])
    group = distributed.ranks()
    if group.distributed:
        # One small all-reduce per step: a non-finite loss on any rank reaches all of them,
        # so that every rank skips or stops at the same step, and the loss is the global one.
        distributed.all_reduce_sum(shared)
        shared[0] /= group.world_size
    norm = _gradient_norm(trained, clip_norm, device)
    return torch.stack([shared[0], norm.to(device, torch.float64), shared[1]])


def _gradient_norm(trained: list[Tensor], clip_norm: float | None, device: torch.device) -> Tensor:
    """The gradients' total norm (before clipping them to ``clip_norm``, if given)."""
    if clip_norm is not None:
        return torch.nn.utils.clip_grad_norm_(trained, clip_norm)
    grads = [p.grad for p in trained if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)


def read_outcomes(
    unread: list[tuple[int, Outcome]], where: str, data: Tensor | None = None
) -> tuple[list[float], bool]:
    """Read the outcomes of the steps not read yet back to the host, at once; return their
    per-example losses and whether a stop was asked for. A loss or gradient norm that is not
    finite raises, naming the first such step (``where``, with ``{step}``): a
    :class:`TrainingDivergedError`, or, on the first step of a fresh run (``data``: all the
    training data), a ``ValueError`` about the data, since no learning rate has acted yet."""
    outcomes = [outcome for _, outcome in unread]
    rows: list = (
        outcomes if isinstance(outcomes[0], tuple) else torch.stack(outcomes).tolist()  # type: ignore[arg-type]
    )
    for (step, _), (per_example, norm, _stop) in zip(unread, rows, strict=True):
        for what, value, hint in (
            ("loss", per_example, "a smaller learning_rate"),
            ("gradient norm", norm, "a smaller learning_rate or clip_norm"),
        ):
            if not math.isfinite(value):
                if data is not None:
                    raise ValueError(_not_scored(f"the {what} is {value}", data))
                raise TrainingDivergedError(
                    f"{what} is {value} {where.format(step=step)}; the parameters are those "
                    f"before this step (try {hint})"
                )
    return [row[0] for row in rows], any(row[2] > 0 for row in rows)


def _not_scored(what: str, data: Tensor) -> str:
    largest = float(data.abs().max())
    finfo = torch.finfo(data.dtype)
    return (
        f"{what} at the first step, from the initial parameters, before any learning rate "
        f"acted: the model cannot score the training data in {data.dtype} (their largest "
        f"magnitude is {largest:.3g}; the largest {data.dtype} is {finfo.max:.3g}, and a "
        "likelihood squares values and sums them over features and examples): rescale the "
        "data, use float64, or check the model's settings (such as beta)"
    )


class StopFlag:
    """Whether a stop was asked for (Ctrl-C): set by the SIGINT handler of :func:`sigint_flag`."""

    def __init__(self) -> None:
        self._set = False

    def set(self, *_: object) -> None:
        if self._set:
            # A second Ctrl-C: the user will not wait for the step and the checkpoint. Stop at
            # once; every file on disk is whole (atomic writes), the newest checkpoint with it.
            raise KeyboardInterrupt
        self._set = True

    def is_set(self) -> bool:
        return self._set


@contextlib.contextmanager
def sigint_flag(enabled: bool) -> Iterator[StopFlag]:
    """While enabled (and in the main thread, the only one that receives signals), Ctrl-C sets
    a flag instead of raising at an arbitrary point, such as half-way through an optimizer
    step; the loop checks the flag between steps. A second Ctrl-C raises at once."""
    flag = StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, flag.set)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
