"""``fit``: stochastic variational inference, the one training core of pyro_vae.

It trains any model and guide (:class:`~pyro_vae.infer.objective.Objective`): a VAE, a VAE with a
Bayesian decoder, or a model of one's own. The loss and its gradients come from a Pyro ELBO
estimator (``Trace_ELBO`` by default) exactly as ``pyro.infer.SVI.step`` computes them, over
the parameters SVI would find. Two things differ from ``SVI.step``, both for speed and neither
touching the maths:

- one optimizer over the parameters, found once before the first step (by default
  ``torch.optim.Adam``), instead of Pyro's optimizer wrapper, which keeps one optimizer per
  parameter and traces every step to find them (Adam works elementwise, so the updates are the
  same);
- Pyro's and torch's argument validation run on the first step only: the data were checked once
  up front and the shapes at construction, so repeating the checks every step buys nothing.

What ``fit`` reads of the module, where present: ``data_dim`` (to read a ``Dataset``),
``likelihood.binary_data`` (to binarize grayscale data dynamically), ``validate_data`` and
``validate_inputs`` (called on the data before any step), ``beta`` (the KL warm-up), and
``device``/``dtype`` (else those of its parameters).

While ``checkpoint`` is set, Ctrl-C (SIGINT) finishes the step under way, calls ``checkpoint``
and raises ``KeyboardInterrupt``; a second Ctrl-C raises at once. How a step is made
(eager, compiled or under DDP) and read back is :mod:`pyro_vae.infer.step`'s; where a run stands,
:mod:`pyro_vae.infer.state`'s. Under ``torchrun`` (:mod:`pyro_vae.infer.distributed`) every
rank must call ``fit`` with the same arguments (docs/design.md, "Many processes"); on a GPU
the values stay on the device between two reads (docs/design.md, "Host reads").
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from pyro.infer import ELBO, Trace_ELBO
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pyro_vae._checks import check_positive_float, check_positive_int
from pyro_vae.infer import distributed
from pyro_vae.infer.batches import EpochOrder, InMemoryRows, Rows, Shuffled, prepare_rows
from pyro_vae.infer.objective import Objective, as_model_and_guide, device_and_dtype
from pyro_vae.infer.state import History, TrainingState
from pyro_vae.infer.step import (
    OptimizerFactory,
    Outcome,
    Stepper,
    StopFlag,
    compute_gradients,
    make_optimizer,
    make_stepper,
    noise_generator,
    read_outcomes,
    sigint_flag,
)

_log = logging.getLogger(__name__)
"""``pyro_vae.infer.fit``: a line per epoch at INFO (on rank 0), for a script or a notebook's
log where no progress bar shows; ``logging.basicConfig(level=logging.INFO)`` shows it."""


def fit(
    module: Any,
    data: Tensor | Dataset | tuple[Tensor, ...] | tuple[Dataset],
    *,
    num_epochs: int,
    batch_size: int,
    learning_rate: float = 1e-3,
    loss: ELBO | None = None,
    optimizer: OptimizerFactory | None = None,
    binarize: bool | None = None,
    kl_warmup_epochs: int = 0,
    clip_norm: float | None = None,
    callback: Callable[[int, History], bool | None] | None = None,
    checkpoint: Callable[[TrainingState], None] | None = None,
    checkpoint_every: int | None = None,
    resume: TrainingState | None = None,
    progress: bool | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    log_every: int | None = None,
    num_workers: int = 0,
) -> History:
    """Fit ``module.model`` and ``module.guide`` to ``data`` by stochastic variational
    inference: every parameter Pyro finds in them is trained, with Pyro's loss and gradients.
    For torchrun and for the reads back from a GPU, see docs/design.md ("Many processes",
    "Host reads"); the module docstring says what ``fit`` reads of ``module``.

    A model of one's own is a pair of functions, as Pyro's ``SVI(model, guide, ...)`` takes
    them: ``fit((model, guide), (x, y), ...)``, where ``guide`` may be an autoguide such as
    ``pyro.infer.autoguide.AutoNormal(model)``. The contract: fit calls ``model(*batch,
    num_data=N)`` and ``guide(*batch, num_data=N)``, ``batch`` a minibatch of B rows of the
    data's tensors (in the order given) and ``N`` the number of rows in all the data; the model
    weighs the minibatch by N/B in its data plate,
    ``with pyro.plate("data", size=num_data, subsample=x):`` (or ``pyro.plate("data",
    num_data, subsample_size=len(x))``). A model or guide without ``num_data``, and a model
    whose observations carry no N/B scale on a minibatch, are refused with a ``ValueError``.
    Under ``RenyiELBO`` (IWAE) the steps call them without ``num_data`` (the batch standing
    for itself; the N/B scale is applied outside the log-sum-exp), so such a model's plate
    takes ``size=num_data or len(x)``.

    :param module: a ``(model, guide)`` pair of functions, or an object with ``model`` and
        ``guide`` methods (a :class:`~pyro_vae.VAE`), taking a batch's tensors and
        ``num_data=``.
    :param data: a tensor ``(N, data_dim)``, a tuple of N-row tensors (in memory), a
        ``TensorDataset`` (its tensors are the model's arguments, as a tuple's are; for a model
        with a ``data_dim`` it is streamed as any ``Dataset``), or a map-style ``Dataset`` of
        examples for a model with a ``data_dim``, streamed batch by batch through a
        ``DataLoader``; a tuple holding one such ``Dataset`` is that ``Dataset`` (so that a
        caller can hand over its data as a tuple whatever they are).
    :param num_epochs: passes over the data.
    :param batch_size: examples per step; the ELBO is scaled by N / batch_size.
    :param learning_rate: the default optimizer's (Adam's) step size.
    :param loss: a Pyro ELBO estimator (``num_particles`` sets the draws); ``None``: Trace_ELBO.
    :param optimizer: ``params -> torch.optim.Optimizer``; ``None``: Adam at ``learning_rate``.
    :param binarize: x ~ Bernoulli(data) afresh per batch; ``None``: for binary-data likelihoods.
    :param kl_warmup_epochs: epochs over which β climbs, step by step, to ``module.beta``.
    :param clip_norm: clip the gradients' total norm to this value before each step.
    :param callback: called as ``callback(epoch, history)`` after each epoch (1-based); a
        return of ``True`` ends training after that epoch (early stopping), checkpoint written.
    :param checkpoint: called with a :class:`TrainingState` after each epoch and at Ctrl-C.
    :param checkpoint_every: steps between checkpoints within an epoch; ``None``: epochs only.
    :param resume: a :class:`TrainingState` to continue exactly from, weights already loaded.
    :param progress: show a progress bar; ``None`` means only on a terminal. Whatever it is,
        each epoch's loss and time go to the ``logging`` logger ``pyro_vae.infer.fit`` at INFO
        (rank 0 only): ``logging.basicConfig(level=logging.INFO)`` prints a line per epoch
        off a terminal, in a script or a notebook's log.
    :param generator: random source for the shuffling and the binarization.
    :param compile: trace and compile each step (:mod:`pyro_vae.infer.compiled`).
    :param log_every: steps between reads back to the host; ``None``: 1 on a CPU, 25 on a GPU.
    :param num_workers: the ``DataLoader``'s worker processes for a streamed ``Dataset``.
    :returns: the :class:`History` of losses.
    :raises ValueError: on bad arguments or data, before any parameter changes.
    :raises TrainingDivergedError: at a NaN or infinite loss or gradient, before that step.
    """
    if isinstance(data, tuple) and len(data) == 1 and isinstance(data[0], Dataset):
        data = data[0]
    module = as_model_and_guide(module, data)
    if log_every is not None:
        check_positive_int("log_every", log_every)
    _check_arguments(
        num_epochs,
        batch_size,
        learning_rate,
        clip_norm,
        checkpoint_every,
        resume,
        kl_warmup_epochs,
        module,
        generator,
        optimizer,
    )
    # A Dataset streams through a DataLoader; tensors are indexed in memory (batches.py).
    streamed = isinstance(data, Dataset) and not isinstance(data, Tensor)
    rows, binarize = prepare_rows(module, data, binarize, batch_size, streamed, num_workers)
    # A batch larger than the data is all of it. Clamped before the steps see the size: a
    # size past 2**63 - 1 overflows torch's index arithmetic (Tensor.split, DataLoader).
    batch_size = min(batch_size, rows.num_data)
    group = distributed.ranks()
    device = device_and_dtype(module)[0]
    num_data = rows.num_data
    # Reading a value back from the device (a loss, a gradient norm) makes the host wait for
    # it. On the CPU that costs nothing, so every step is read and checked at once; on a GPU
    # the values stay on the device and are read every read_every steps (docs/design.md).
    read_every = log_every or (1 if device.type == "cpu" else 25)
    settings = {
        "num_data": num_data,
        "num_epochs": num_epochs,
        "batch_size": batch_size,
        "checkpoint": checkpoint is not None,
        "checkpoint_every": checkpoint_every,
        "read_every": read_every,
        "resume": None if resume is None else (resume.epoch, resume.step),
    }
    noise = noise_generator(generator, group, settings)
    objective = Objective(module, Trace_ELBO() if loss is None else loss)
    first_batch = rows.first(batch_size)
    parameters = objective.parameters(*first_batch, num_data=num_data)
    trainer = make_optimizer(optimizer, parameters, learning_rate, compile, read_every)
    stepper = make_stepper(objective, compile, group, device)

    epochs = _epoch_order(module, rows, batch_size)
    # On many processes each rank takes its shard of the shared shuffle: as many steps on all.
    num_steps = math.ceil(math.ceil(epochs.length / group.world_size) / batch_size)
    history = History(binarized=binarize)
    first_epoch, first_step, order = 1, 0, None
    if resume is not None:
        history, first_epoch, first_step, order = resume.restore(
            trainer, generator, epochs.length, device, noise=noise
        )
    with (
        _restored_beta(module),
        sigint_flag(enabled=checkpoint is not None) as interrupted,
        warnings.catch_warnings(),
    ):
        # Pyro warns of a NaN loss; fit raises TrainingDivergedError instead, naming the step.
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        run = _Run(
            module=module,
            rows=rows,
            stepper=stepper,
            optimizer=trainer,
            history=history,
            group=group,
            generator=generator,
            noise=noise,
            binarize=binarize,
            num_data=num_data,
            batch_size=batch_size,
            num_epochs=num_epochs,
            num_steps=num_steps,
            clip_norm=clip_norm,
            read_every=read_every,
            # The KL weight the warm-up climbs to: the model's own (a warm-up needs one,
            # checked above; without one this value is never read).
            target_beta=module.beta if kl_warmup_epochs else 1.0,
            warmup_steps=kl_warmup_epochs * num_steps,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            progress=progress,
            interrupted=interrupted,
            diverged=torch.zeros((), device=device),
        )
        for epoch in range(first_epoch, num_epochs + 1):
            started = time.perf_counter()
            if order is None:
                order = epochs.draw(generator, device)
            stop = _train_epoch(run, epoch, first_step, order)
            # Summed in step order from the stored step losses, so that a resumed epoch gets
            # the very same number as an uninterrupted one.
            history.loss.append(sum(history.step_loss[-num_steps:]) / num_steps)
            history.epoch_seconds.append(time.perf_counter() - started)
            if group.is_main:
                _log.info(
                    "epoch %d/%d: loss %.4f nats per example, %.2fs",
                    epoch,
                    num_epochs,
                    history.loss[-1],
                    history.epoch_seconds[-1],
                )
            first_step, order = 0, None
            # On many processes the callback must decide alike on every rank (from all-reduced
            # numbers), or the ranks would part ways.
            enough = callback(epoch, history) is True if callback is not None else False
            if checkpoint is not None:
                run.save(epoch, 0, None)
                # A Ctrl-C during the callback counts too (on many processes, the next step's
                # all-reduce brings it to every rank).
                if stop or (not group.distributed and interrupted.is_set()):
                    raise KeyboardInterrupt
            if enough:
                break
    return history


def _epoch_order(module: Any, rows: Rows, batch_size: int) -> EpochOrder:
    """Each epoch's order of rows: the module's own (``module.epoch_order(*tensors,
    batch_size=B)``, given the data in memory) where it has one, else a shuffle."""
    epoch_order = getattr(module, "epoch_order", None)
    if callable(epoch_order) and isinstance(rows, InMemoryRows):
        order: EpochOrder = epoch_order(*rows.tensors, batch_size=batch_size)
        return order
    return Shuffled(rows.num_data)


@dataclass
class _Run:
    """What one call of :func:`fit` fixes before its first step, for :func:`_train_epoch`."""

    module: Any
    rows: Rows
    stepper: Stepper
    optimizer: torch.optim.Optimizer
    history: History
    group: distributed.Ranks
    generator: torch.Generator | None
    noise: torch.Generator | None
    """The binarization's generator (:func:`~pyro_vae.infer.step.noise_generator`)."""
    binarize: bool
    num_data: int
    batch_size: int
    num_epochs: int
    num_steps: int
    """Steps per epoch."""
    clip_norm: float | None
    read_every: int
    target_beta: float
    warmup_steps: int
    checkpoint: Callable[[TrainingState], None] | None
    checkpoint_every: int | None
    progress: bool | None
    interrupted: StopFlag
    diverged: Tensor
    """Deferred reads: whether a step not finite was taken, on the device."""

    @property
    def deferred(self) -> bool:
        """Whether steps are read back late, a non-finite one skipped on the device meanwhile."""
        return self.read_every > 1

    def save(self, epoch: int, step: int, order: Tensor | None) -> None:
        """Hand ``checkpoint`` the state after ``step`` steps of the epoch after ``epoch``.
        Every rank gathers its random state; rank 0 alone writes."""
        training = TrainingState.capture(
            epoch, step, order, self.optimizer, self.generator, self.history, noise=self.noise
        )
        if self.checkpoint is not None and self.group.is_main:
            self.checkpoint(training)


def _train_epoch(run: _Run, epoch: int, first_step: int, order: Tensor) -> bool:
    """Train epoch ``epoch`` over the shuffle ``order`` from step ``first_step + 1`` on,
    recording the step losses; return whether a stop (Ctrl-C) was asked for at its last read.
    Raises ``KeyboardInterrupt`` after a checkpoint when one is asked for within the epoch."""
    group, optimizer, num_steps = run.group, run.optimizer, run.num_steps
    index_batches = distributed.shard(order, group).split(run.batch_size)[first_step:]
    bar = tqdm(
        index_batches,
        initial=first_step,
        total=num_steps,
        desc=f"epoch {epoch}/{run.num_epochs}",
        leave=False,
        disable=(None if run.progress is None else not run.progress),
    )
    unread: list[tuple[int, Outcome]] = []
    stop = False
    fetched = run.rows.batches(index_batches)
    for step, (_, batch) in enumerate(zip(bar, fetched, strict=True), start=first_step + 1):
        global_step = (epoch - 1) * num_steps + step
        if run.binarize:
            batch = (torch.bernoulli(batch[0], generator=run.noise), *batch[1:])
        if run.warmup_steps:
            run.module.beta = run.target_beta * min(1.0, global_step / run.warmup_steps)
        outcome = compute_gradients(
            run.stepper,
            optimizer,
            batch,
            run.num_data,
            run.clip_norm,
            # Pyro's and torch's argument checks on the first step only: the data were checked
            # up front and the shapes do not change between steps.
            validate=global_step == 1,
            interrupted=run.interrupted.is_set(),
            on_host=not (run.deferred or group.distributed),
        )
        unread.append((step, outcome))
        if run.deferred:
            assert isinstance(outcome, Tensor)  # deferred outcomes stay on the device
            run.diverged = run.diverged.logical_or(~torch.isfinite(outcome[:2]).all())
            # The fused optimizer skips this update and every later one on the device.
            optimizer.found_inf = run.diverged.float()  # type: ignore[attr-defined]
        at_checkpoint = run.checkpoint_every is not None and global_step % run.checkpoint_every == 0
        # On one process a Ctrl-C is known on the host at once: read and stop now.
        asked = not group.distributed and run.interrupted.is_set()
        if (
            step % run.read_every == 0
            or step == num_steps
            or global_step == 1
            or at_checkpoint
            or asked
        ):
            values, stop = read_outcomes(
                unread,
                f"at epoch {epoch}, step {{step}} of {num_steps}",
                # The first step of a fresh run starts from the initial parameters: a loss
                # that is not finite there is no learning rate's doing.
                data=run.rows.scanned if global_step == 1 else None,
            )
            run.history.step_loss.extend(values)
            stop = stop or asked
            unread = []
            if step % 25 == 0 or run.deferred:  # as often as the bar is worth updating
                bar.set_postfix(loss=f"{values[-1]:.2f}", refresh=False)
        optimizer.step()
        if step < num_steps and run.checkpoint is not None and not unread:
            if stop:
                run.save(epoch - 1, step, order)
                raise KeyboardInterrupt
            if at_checkpoint:
                run.save(epoch - 1, step, order)
    return stop


def _check_arguments(
    num_epochs: int,
    batch_size: int,
    learning_rate: float,
    clip_norm: float | None,
    checkpoint_every: int | None,
    resume: TrainingState | None,
    kl_warmup_epochs: int,
    module: Any,
    generator: object,
    optimizer: object,
) -> None:
    check_positive_int("num_epochs", num_epochs)
    check_positive_int("batch_size", batch_size)
    device, dtype = device_and_dtype(module)
    if device.type == "meta":
        raise ValueError(
            "the model is on the meta device, which holds shapes only and no values: build it "
            "on the CPU or a GPU (or give its meta tensors values, e.g. with to_empty() and "
            "load_state_dict)"
        )
    if dtype == torch.float16:
        # Not a matter of the learning rate: in float16 a dataset's ELBO (N examples times
        # their log-densities) overflows at 65504, and Adam's eps (1e-8) rounds to 0.
        raise ValueError(
            "the model's parameters are torch.float16, which fit cannot train in: the loss of "
            "a dataset overflows its largest value (65504) and Adam's eps (1e-8) rounds to 0 "
            "in it; convert the model with .float() (the data follow the model's dtype)"
        )
    # A step or a gradient norm below the smallest normal number of the parameters' dtype
    # rounds to nothing (or to a subnormal, far less precise) when it meets the parameters:
    # such a run would train nothing and say nothing.
    tiny = torch.finfo(dtype).tiny
    check_positive_float("learning_rate", learning_rate)
    if learning_rate < tiny:
        raise ValueError(
            f"learning_rate={learning_rate!r} is below the smallest normal {dtype} number "
            f"({tiny:.3g}), the model's dtype: every step would round to nothing"
        )
    if clip_norm is not None:
        check_positive_float("clip_norm", clip_norm)
        if clip_norm < tiny:
            raise ValueError(
                f"clip_norm={clip_norm!r} is below the smallest normal {dtype} number "
                f"({tiny:.3g}), the model's dtype: the clipped gradients would round to zero"
            )
    _check_generator(generator, device)
    if optimizer is not None and not callable(optimizer):
        raise ValueError(
            "optimizer must be a function from the parameters to a torch.optim.Optimizer, "
            f"got {type(optimizer).__name__}"
        )
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
    if resume is not None and not isinstance(resume, TrainingState):
        raise ValueError(f"resume must be a TrainingState, got {type(resume).__name__}")
    if isinstance(kl_warmup_epochs, bool) or not isinstance(kl_warmup_epochs, int):
        raise ValueError(f"kl_warmup_epochs must be an integer >= 0, got {kl_warmup_epochs!r}")
    if kl_warmup_epochs < 0:
        raise ValueError(f"kl_warmup_epochs must be an integer >= 0, got {kl_warmup_epochs}")
    if kl_warmup_epochs and not hasattr(module, "beta"):
        raise ValueError(
            f"kl_warmup_epochs needs a model with a beta (KL weight); "
            f"{type(module).__name__} has none"
        )


def _check_generator(generator: object, device: torch.device) -> None:
    """fit's ``generator`` must be a ``torch.Generator`` on the device of the model and data
    (the shuffles and the binarization draw on that device)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        kind = f"{type(generator).__module__}.{type(generator).__qualname__}"
        raise ValueError(
            f"generator must be a torch.Generator (or None), got {kind}: {generator!r}"
        )
    made_on = generator.device
    if made_on.type != device.type or (
        made_on.index is not None and device.index is not None and made_on.index != device.index
    ):
        raise ValueError(
            f"generator is on {made_on} but the model and data are on {device}; make it "
            f"there: torch.Generator({str(device)!r})"
        )


@contextlib.contextmanager
def _restored_beta(module: Any) -> Iterator[None]:
    if not hasattr(module, "beta"):
        yield
        return
    beta = module.beta
    try:
        yield
    finally:
        module.beta = beta
