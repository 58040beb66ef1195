"""``fit``: stochastic variational inference, the one training core of pyro_vae.

It trains any model and guide (:class:`~pyro_vae.infer.objective.Objective`): a VAE, a VAE with a
Bayesian decoder, or a model of one's own. The loss and its gradients come from a Pyro ELBO
estimator (``Trace_ELBO`` by default) exactly as ``pyro.infer.SVI.step`` computes them, over
the parameters SVI would find. Two things differ from ``SVI.step``, both for speed and neither
touching the maths:

- one ``torch.optim.Adam`` over the parameters, found once before the first step, instead of
  Pyro's optimizer wrapper, which keeps one optimizer per parameter and traces every step to
  find them (Adam works elementwise, so the updates are the same);
- Pyro's and torch's argument validation run on the first step only: the data were checked once
  up front and the shapes at construction, so repeating the checks every step buys nothing.

On a GPU, the loop reads nothing back to the host between two reads (``log_every``): the step
losses and gradient norms stay on the device until then, and the divergence check (a loss or a
gradient that is not finite) runs there, skipping every update from the first bad step on, so
that the read still stops training at that step with the parameters from before it. (Pyro's
eager estimators read values out of the step themselves; the compiled step does not.)

Under ``torchrun`` (:mod:`pyro_vae.infer.distributed`) it trains one model over all processes: each
takes its shard of a shared shuffle, the gradients are averaged by DistributedDataParallel, the
step losses are all-reduced, and only rank 0 calls ``checkpoint``. Every rank must call ``fit``
with the same arguments.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pyro_vae._checks import check_positive_float, check_positive_int
from pyro_vae.components.likelihoods import BernoulliLikelihood
from pyro_vae.data import is_binary, to_tensor
from pyro_vae.infer import distributed
from pyro_vae.infer.compiled import CompiledStep
from pyro_vae.infer.objective import Objective
from pyro_vae.models.vae import VAE


@dataclass
class History:
    """What :func:`fit` measured. Losses are per example, in nats: the training objective
    (−ELBO, or −β-ELBO when β ≠ 1) summed over features and averaged over examples."""

    loss: list[float] = field(default_factory=list)
    """Mean per-example loss of each epoch."""
    step_loss: list[float] = field(default_factory=list)
    """Per-example loss of each step (an unbiased estimate for the whole dataset)."""
    epoch_seconds: list[float] = field(default_factory=list)
    binarized: bool = False
    """Whether the training data were binarized dynamically (a fresh draw for every batch)."""

    @property
    def num_epochs(self) -> int:
        return len(self.loss)


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite. Raised before the optimizer applies that step, so the
    model keeps the parameters of the last finite step."""


def describe_position(epoch: int, step: int) -> str:
    """``epoch`` epochs done and ``step`` steps into the next, as the messages say it."""
    return f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"


# The options of a torch optimizer's param group that choose its implementation.
_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


@dataclass
class TrainingState:
    """Where a :func:`fit` stands between two steps: with the model's weights, everything it
    needs to continue exactly. ``to_dict`` gives plain tensors and values, which
    ``torch.save`` writes and ``torch.load(weights_only=True)`` reads back.

    :meth:`capture` takes it from a running fit; :meth:`restore` puts it back into another.
    """

    epoch: int
    """Epochs completed."""
    step: int
    """Steps completed in the epoch under way; 0 between epochs."""
    order: Tensor | None
    """The shuffle of the epoch under way (``None`` between epochs)."""
    optimizer: dict
    torch_rng: Tensor
    """torch's global random state: the draws of z, of the weights, and of Pyro's estimators."""
    cuda_rng: list[Tensor] | None
    generator_rng: Tensor | None
    """The state of fit's ``generator`` (shuffles, binarization), if one was given."""
    history: History
    rank_states: list[dict[str, Any]] | None = None
    """On many processes (:mod:`pyro_vae.infer.distributed`), every rank's own random states, in
    rank order: ``torch_rng``, ``cuda_rng`` and ``noise_rng`` (its binarization generator);
    ``None`` on one process."""

    def position(self) -> str:
        """Where the run stands, in the words of every message: "epoch 36, step 4" (4 steps into
        epoch 36) or "the end of epoch 35"."""
        return describe_position(self.epoch, self.step)

    @property
    def world_size(self) -> int:
        """The number of processes that trained the run."""
        return 1 if self.rank_states is None else len(self.rank_states)

    def check_world_size(self, world_size: int) -> None:
        """Refuse to go on with another number of processes than the run's: each rank's random
        streams and shard are its own, so the run could go on, but not as it would have;
        refused rather than silently inexact."""
        if world_size == self.world_size:
            return
        how = (
            "without torchrun"
            if self.world_size == 1
            else f"torchrun --nproc-per-node {self.world_size} (on one node; on several, as "
            f"many processes in all)"
        )
        raise ValueError(
            f"resume: the run was trained on {self.world_size} process(es), this is "
            f"{world_size}; resume it with {how}"
        )

    @classmethod
    def capture(
        cls,
        epoch: int,
        step: int,
        order: Tensor | None,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator | None,
        history: History,
        noise: torch.Generator | None = None,
    ) -> TrainingState:
        """The state after ``step`` steps of the epoch after ``epoch`` (0: between epochs).
        On many processes every rank must call it (it gathers their random states, and
        ``noise`` is the rank's binarization generator)."""
        group = distributed.ranks()
        rank_states = None
        if group.distributed:
            rank_states = distributed.all_gather(
                {
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": _cuda_rng(),
                    "noise_rng": None if noise is None else noise.get_state().cpu(),
                }
            )
        return cls(
            epoch=epoch,
            step=step,
            order=order if step else None,
            optimizer=optimizer.state_dict(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=_cuda_rng(),
            generator_rng=None if generator is None else generator.get_state(),
            history=history,
            rank_states=rank_states,
        )

    def restore(
        self,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator | None,
        num_data: int,
        device: torch.device,
        noise: torch.Generator | None = None,
    ) -> tuple[History, int, int, Tensor | None]:
        """Put the optimizer and random states back (on many processes, this rank's own, and
        ``noise``'s); return a copy of the history, the epoch and step to go on from, and the
        epoch's shuffle."""
        group = distributed.ranks()
        self.check_world_size(group.world_size)
        if self.order is not None and len(self.order) != num_data:
            raise ValueError(
                f"resume: the saved run shuffled {len(self.order)} examples, the data has "
                f"{num_data}"
            )
        if (self.generator_rng is None) != (generator is None):
            raise ValueError("resume: pass a generator exactly when the saved run had one")
        # Adam's implementation (fused or not) is this fit's choice (compile, deferred reads),
        # not the saved state's: load_state_dict would take the saved one's along.
        saved = dict(self.optimizer)
        saved["param_groups"] = [
            {**group, **{k: mine[k] for k in _IMPLEMENTATION if k in mine}}
            # Not strict: a different count of groups is load_state_dict's to report.
            for group, mine in zip(
                self.optimizer["param_groups"], optimizer.param_groups, strict=False
            )
        ]
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"resume: the optimizer state does not fit this model: {error}"
            ) from error
        mine: dict[str, Any] = (
            {"torch_rng": self.torch_rng, "cuda_rng": self.cuda_rng, "noise_rng": None}
            if self.rank_states is None
            else self.rank_states[group.rank]
        )
        torch.set_rng_state(mine["torch_rng"])
        if mine["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda_rng"])
        if noise is not None and mine["noise_rng"] is not None:
            noise.set_state(mine["noise_rng"])
        # Both or neither, checked above; the second test is for the type checker.
        if generator is not None and self.generator_rng is not None:
            generator.set_state(self.generator_rng)
        order = None if self.order is None else self.order.to(device)
        return copy.deepcopy(self.history), self.epoch + 1, self.step, order

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict(self): it would deep-copy the optimizer's tensors needlessly.
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        plain["history"] = dataclasses.asdict(self.history)
        return plain

    @classmethod
    def from_dict(cls, plain: dict[str, Any]) -> TrainingState:
        try:
            # rank_states came later: checkpoints of one process saved before it lack it.
            fields = {f.name for f in dataclasses.fields(cls)} - {"rank_states"}
            values = {k: plain[k] for k in fields}
            values["rank_states"] = plain.get("rank_states")
            values["history"] = History(**plain["history"])
            return cls(**values)
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a saved training state ({error})") from error


def fit(
    module: Any,
    data: Tensor | Dataset | tuple[Tensor, ...],
    *,
    num_epochs: int,
    batch_size: int,
    learning_rate: float = 1e-3,
    loss: ELBO | None = None,
    binarize: bool | None = None,
    kl_warmup_epochs: int = 0,
    clip_norm: float | None = None,
    callback: Callable[[int, History], None] | None = None,
    checkpoint: Callable[[TrainingState], None] | None = None,
    checkpoint_every: int | None = None,
    resume: TrainingState | None = None,
    progress: bool | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    log_every: int | None = None,
) -> History:
    """Fit ``module.model`` and ``module.guide`` to ``data`` by stochastic variational
    inference: every parameter Pyro finds in them is trained (:class:`~pyro_vae.infer.objective.
    Objective`), with Pyro's loss and gradients and one ``torch.optim.Adam``.

    :param module: a :class:`~pyro_vae.models.vae.VAE`, or any object whose ``model`` and ``guide``
        take a batch's tensors and ``num_data=`` (the dataset size, for the data plate's
        subsample scaling); trained in place, on the device of its parameters.
    :param data: a tensor ``(N, data_dim)``, a torch ``Dataset`` whose items are tensors (or
        ``(tensor, label)`` pairs) with ``data_dim`` elements, or a tuple of tensors with N
        rows each (the model then gets one batch of each). Moved to the model's device once.
        A module with a ``validate_inputs`` method has it called with all the data tensors
        before training, to refuse what it cannot train on.
    :param num_epochs: passes over the data.
    :param batch_size: examples per SVI step; the ELBO is scaled by N / batch_size.
    :param learning_rate: Adam's step size.
    :param loss: a Pyro ELBO estimator; ``None`` means ``Trace_ELBO()``.
        ``TraceMeanField_ELBO()`` gives an analytic KL where ``kl_divergence(q, p)`` is
        registered (a warning says when it is not, and Pyro falls back to Monte Carlo);
        ``RenyiELBO(alpha=0, num_particles=K)`` importance-weighted training (IWAE), run on
        the unscaled minibatch so that the N / B scale stays outside the log-sum-exp
        (docs/design.md, "IWAE and N/B"). ``num_particles`` of any of them sets the draws.
    :param binarize: draw x ~ Bernoulli(data) afresh for every batch (dynamic binarization).
        ``None`` means: yes when the likelihood is Bernoulli and the data are not already binary.
    :param kl_warmup_epochs: KL warm-up: β rises linearly, step by step, from near 0 to
        ``module.beta`` over the first ``kl_warmup_epochs`` epochs (0: no warm-up).
        ``module.beta`` is restored at the end, even when training stops early.
    :param clip_norm: clip the gradients' total norm to this value before each step.
    :param callback: called as ``callback(epoch, history)`` after each epoch (1-based).
    :param checkpoint: called as ``checkpoint(state)`` with a :class:`TrainingState` after
        each epoch (after ``callback``) and every ``checkpoint_every`` steps; save it (with
        the model's weights) to continue later with ``resume``. While it is set, Ctrl-C
        (SIGINT) finishes the step under way, calls ``checkpoint`` and raises
        ``KeyboardInterrupt`` (on many processes, at the next read of ``log_every``, so that
        every rank stops at the same step).
    :param checkpoint_every: steps between checkpoints within an epoch; ``None``: epochs only.
    :param resume: a :class:`TrainingState` to continue from, with the model's weights
        already loaded. With the same data, arguments, seed and device, the run then ends
        exactly as if it had never stopped.
    :param progress: show a progress bar; ``None`` means only on a terminal.
    :param generator: random source for the shuffling and the binarization.
    :param compile: trace each step once and compile it (:mod:`pyro_vae.infer.compiled`, which says
        what "exact" means then), with PyTorch's fused Adam. A step that cannot be traced
        (``TraceEnum_ELBO``, ``RenyiELBO``, dynamic control flow) runs eager, after one
        warning that names the reason. On many processes the loss alone is compiled, and DDP
        averages the gradients of its backward.
    :param log_every: steps between reads of the step's loss and gradient norm back to the
        host, where they are checked, recorded and shown (``None``: every step on the CPU,
        where a read costs nothing; every 25 on a GPU, where each read waits for the device).
        A non-finite step found late is still the one named, and its update and the later
        ones are skipped on the device (fused Adam's ``found_inf``), so the parameters are
        those before it, as when it is read at once.
    :returns: the :class:`History` of losses.
    :raises ValueError: on bad arguments or data, or a latent site of the model without a
        site in the guide, before any parameter changes.
    :raises TrainingDivergedError: when a loss or a gradient is NaN or infinite, naming the
        epoch and step, before that step changes any parameter.
    """
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
    )
    tensors, binarize = _prepare_data(module, data, binarize)
    group = distributed.ranks()
    device = tensors[0].device
    num_data = len(tensors[0])
    # Reading a value back from the device (a loss, a gradient norm) makes the host wait for
    # it. On the CPU that costs nothing, so every step is read and checked at once; on a GPU
    # the values stay on the device and are read every read_every steps (module docstring).
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
    noise = _noise_generator(generator, group, settings)
    objective = Objective(module, Trace_ELBO() if loss is None else loss)
    first_batch = tuple(t[:batch_size] for t in tensors)
    parameters = objective.parameters(*first_batch, num_data=num_data)
    deferred = read_every > 1
    # Fused Adam: one kernel for all parameters (compile), and the only Adam that skips a step
    # on the device (found_inf) when a deferred read finds a non-finite step too late.
    optimizer = torch.optim.Adam(
        parameters, lr=learning_rate, fused=True if (compile or deferred) else None
    )
    stepper = _stepper(objective, compile, group, device)

    # On many processes each rank takes its shard of the shared shuffle: as many steps on all.
    num_steps = math.ceil(math.ceil(num_data / group.world_size) / batch_size)
    history = History(binarized=binarize)
    first_epoch, first_step, order = 1, 0, None
    if resume is not None:
        history, first_epoch, first_step, order = resume.restore(
            optimizer, generator, num_data, device, noise=noise
        )
    # The KL weight the warm-up climbs to: the model's own (a warm-up needs one, checked above;
    # without one this value is never read).
    target_beta: float = module.beta if kl_warmup_epochs else 1.0
    warmup_steps = kl_warmup_epochs * num_steps

    def save(epoch: int, step: int, order: Tensor | None) -> None:
        # Every rank gathers its random state; rank 0 alone writes.
        training = TrainingState.capture(
            epoch, step, order, optimizer, generator, history, noise=noise
        )
        if checkpoint is not None and group.is_main:
            checkpoint(training)

    with (
        _restored_beta(module),
        _sigint_flag(enabled=checkpoint is not None) as interrupted,
        warnings.catch_warnings(),
    ):
        # Pyro warns of a NaN loss; fit raises TrainingDivergedError instead, naming the step.
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        diverged = torch.zeros((), device=device)  # deferred: a non-finite step was taken
        for epoch in range(first_epoch, num_epochs + 1):
            started = time.perf_counter()
            if order is None:
                order = torch.randperm(num_data, device=device, generator=generator)
            bar = tqdm(
                distributed.shard(order, group).split(batch_size)[first_step:],
                initial=first_step,
                total=num_steps,
                desc=f"epoch {epoch}/{num_epochs}",
                leave=False,
                disable=(None if progress is None else not progress),
            )
            unread: list[tuple[int, Outcome]] = []
            stop = False
            for step, indices in enumerate(bar, start=first_step + 1):
                global_step = (epoch - 1) * num_steps + step
                batch = tuple(t[indices] for t in tensors)
                if binarize:
                    batch = (torch.bernoulli(batch[0], generator=noise), *batch[1:])
                if warmup_steps:
                    module.beta = target_beta * min(1.0, global_step / warmup_steps)
                outcome = _gradients(
                    stepper,
                    optimizer,
                    batch,
                    num_data,
                    clip_norm,
                    # Pyro's and torch's argument checks on the first step only: the data were
                    # checked up front and the shapes do not change between steps.
                    validate=global_step == 1,
                    interrupted=interrupted.is_set(),
                    on_host=not (deferred or group.distributed),
                )
                unread.append((step, outcome))
                if deferred:
                    assert isinstance(outcome, Tensor)  # deferred outcomes stay on the device
                    diverged = diverged.logical_or(~torch.isfinite(outcome[:2]).all())
                    optimizer.found_inf = diverged.float()  # type: ignore[attr-defined]
                at_checkpoint = checkpoint_every is not None and global_step % checkpoint_every == 0
                # On one process a Ctrl-C is known on the host at once: read and stop now.
                asked = not group.distributed and interrupted.is_set()
                if (
                    step % read_every == 0
                    or step == num_steps
                    or global_step == 1
                    or at_checkpoint
                    or asked
                ):
                    values, stop = _read(
                        unread,
                        f"at epoch {epoch}, step {{step}} of {num_steps}",
                        # The first step of a fresh run starts from the initial parameters: a
                        # loss that is not finite there is no learning rate's doing.
                        data=tensors[0] if global_step == 1 else None,
                    )
                    history.step_loss.extend(values)
                    stop = stop or asked
                    unread = []
                    if step % 25 == 0 or deferred:  # as often as the bar is worth updating
                        bar.set_postfix(loss=f"{values[-1]:.2f}", refresh=False)
                optimizer.step()
                if step < num_steps and checkpoint is not None and not unread:
                    if stop:
                        save(epoch - 1, step, order)
                        raise KeyboardInterrupt
                    if at_checkpoint:
                        save(epoch - 1, step, order)
            # Summed in step order from the stored step losses, so that a resumed epoch gets
            # the very same number as an uninterrupted one.
            history.loss.append(sum(history.step_loss[-num_steps:]) / num_steps)
            history.epoch_seconds.append(time.perf_counter() - started)
            first_step, order = 0, None
            if callback is not None:
                callback(epoch, history)
            if checkpoint is not None:
                save(epoch, 0, None)
                # A Ctrl-C during the callback counts too (on many processes, the next step's
                # all-reduce brings it to every rank).
                if stop or (not group.distributed and interrupted.is_set()):
                    raise KeyboardInterrupt
    return history


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
) -> None:
    check_positive_int("num_epochs", num_epochs)
    check_positive_int("batch_size", batch_size)
    device, dtype = _device_and_dtype(module)
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


def _prepare_data(
    module: Any, data: Tensor | Dataset | tuple[Tensor, ...], binarize: bool | None
) -> tuple[tuple[Tensor, ...], bool]:
    """The data as tensors on the module's device, the first (x) checked against the model;
    and whether to binarize x dynamically."""
    device, dtype = _device_and_dtype(module)
    if isinstance(data, tuple):
        if not data or not all(isinstance(t, Tensor) for t in data):
            raise ValueError("data given as a tuple must hold tensors (one per model argument)")
        if len({len(t) for t in data}) != 1:
            lengths = ", ".join(str(len(t)) for t in data)
            raise ValueError(f"the tensors of data must have as many rows each, got {lengths}")
        tensors = data
    else:
        data_dim = getattr(module, "data_dim", None)
        if isinstance(data, Tensor):
            tensors = (data,)  # as to_tensor would return it
        elif data_dim is None:
            raise ValueError("pass data as a tensor or a tuple of tensors for this model")
        else:
            tensors = (to_tensor(data, data_dim),)
    x = tensors[0]
    if not x.is_floating_point():  # checked before the cast below would hide it
        raise ValueError(f"training data must have a floating dtype, got {x.dtype}")
    tensors = tuple(
        t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tensors
    )
    x = tensors[0]
    if binarize is None:
        bernoulli = isinstance(getattr(module, "likelihood", None), BernoulliLikelihood)
        binarize = bernoulli and not is_binary(x)
    validate_data = getattr(module, "validate_data", None)
    if callable(validate_data):
        validate_data(x, "training data", probabilities=binarize)
    # The model's own check of all its data tensors (M2's labels, say), before any step.
    validate_inputs = getattr(module, "validate_inputs", None)
    if callable(validate_inputs):
        validate_inputs(*tensors)
    return tensors, binarize


def _device_and_dtype(module: Any) -> tuple[torch.device, torch.dtype]:
    if isinstance(module, VAE):
        return module.device, module.dtype
    if isinstance(module, torch.nn.Module):
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _stepper(
    objective: Objective, compile: bool, group: distributed.Ranks, device: torch.device
) -> Objective | CompiledStep | distributed.DistributedStep:
    """What computes each step's loss and gradients: the objective itself, its compiled step,
    or, on many processes, its DDP-wrapped module."""
    if not group.distributed:
        return CompiledStep(objective) if compile else objective
    # Compiled under DDP: the loss alone is compiled, and autograd's backward through it
    # brings the gradients to DDP's hooks, which average them.
    return distributed.DistributedStep(
        objective, device, compiled=CompiledStep(objective) if compile else None
    )


def _noise_generator(
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


def _cuda_rng() -> list[Tensor] | None:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _gradients(
    stepper: Objective | CompiledStep | distributed.DistributedStep,
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


# What a step leaves to be read (_gradients): its per-example loss, gradient norm and stop flag.
Outcome = Tensor | tuple[float, float, float]


def _read(
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


class _Flag:
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
def _sigint_flag(enabled: bool) -> Iterator[_Flag]:
    """While enabled (and in the main thread, the only one that receives signals), Ctrl-C sets
    a flag instead of raising at an arbitrary point, such as half-way through an optimizer
    step; the loop checks the flag between steps. A second Ctrl-C raises at once."""
    flag = _Flag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, flag.set)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
