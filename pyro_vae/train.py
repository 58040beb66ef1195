"""``fit``: stochastic variational inference for a :class:`~pyro_vae.model.VAE`.

The loss and its gradients come from a Pyro ELBO estimator (``Trace_ELBO`` by default) applied
to ``vae.model`` and ``vae.guide``, exactly as ``pyro.infer.SVI.step`` would compute them. Two
things differ from ``SVI.step``, both for speed and neither touching the maths:

- one ``torch.optim.Adam`` over ``vae.parameters()`` instead of Pyro's optimizer wrapper, which
  keeps one optimizer per parameter and traces every step to find them;
- Pyro's and torch's argument validation run on the first step only: the data were checked once
  up front and the shapes at construction, so repeating the checks every step buys nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pyro_vae._checks import check_positive_float, check_positive_int
from pyro_vae.data import is_binary, to_tensor
from pyro_vae.distributions import describe
from pyro_vae.kl import has_closed_form_kl
from pyro_vae.likelihoods import BernoulliLikelihood
from pyro_vae.model import VAE


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


@dataclass
class TrainingState:
    """Where a :func:`fit` stands between two steps: with the model's weights, everything it
    needs to continue exactly. ``to_dict`` gives plain tensors and values, which
    ``torch.save`` writes and ``torch.load(weights_only=True)`` reads back."""

    epoch: int
    """Epochs completed."""
    step: int
    """Steps completed in the epoch under way; 0 between epochs."""
    order: Tensor | None
    """The shuffle of the epoch under way (``None`` between epochs)."""
    optimizer: dict
    torch_rng: Tensor
    """torch's global random state: the draws of z and of Pyro's estimators."""
    cuda_rng: list[Tensor] | None
    generator_rng: Tensor | None
    """The state of fit's ``generator`` (shuffles, binarization), if one was given."""
    history: History

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict(self): it would deep-copy the optimizer's tensors needlessly.
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        plain["history"] = dataclasses.asdict(self.history)
        return plain

    @classmethod
    def from_dict(cls, plain: dict[str, Any]) -> TrainingState:
        try:
            fields = {f.name for f in dataclasses.fields(cls)}
            values = {k: plain[k] for k in fields}
            values["history"] = History(**plain["history"])
            return cls(**values)
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a saved training state ({error})") from error


def fit(
    vae: VAE,
    data: Tensor | Dataset,
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
) -> History:
    """Fit ``vae`` to ``data`` by stochastic variational inference.

    :param vae: the model; trained in place, on the device of its parameters.
    :param data: a tensor ``(N, data_dim)``, or a torch ``Dataset`` whose items are tensors (or
        ``(tensor, label)`` pairs) with ``data_dim`` elements. Moved to the model's device once.
    :param num_epochs: passes over the data.
    :param batch_size: examples per SVI step; the ELBO is scaled by N / batch_size.
    :param learning_rate: Adam's step size.
    :param loss: a Pyro ELBO estimator; ``None`` means ``Trace_ELBO()``.
        ``TraceMeanField_ELBO()`` gives an analytic KL where ``kl_divergence(q, p)`` is
        registered (a warning says when it is not, and Pyro falls back to Monte Carlo);
        ``RenyiELBO(alpha=0, num_particles=K)`` importance-weighted training (IWAE), run on
        the unscaled minibatch so that the N / B scale stays outside the log-sum-exp
        (DESIGN.md §4, trap 6). ``num_particles`` of any of them sets the draws per example.
    :param binarize: draw x ~ Bernoulli(data) afresh for every batch (dynamic binarization).
        ``None`` means: yes when the likelihood is Bernoulli and the data are not already binary.
    :param kl_warmup_epochs: KL warm-up: β rises linearly, step by step, from near 0 to
        ``vae.beta`` over the first ``kl_warmup_epochs`` epochs (0: no warm-up). ``vae.beta``
        is restored at the end, even when training stops early.
    :param clip_norm: clip the gradients' total norm to this value before each step.
    :param callback: called as ``callback(epoch, history)`` after each epoch (1-based).
    :param checkpoint: called as ``checkpoint(state)`` with a :class:`TrainingState` after
        each epoch (after ``callback``) and every ``checkpoint_every`` steps; save it (with
        the model's weights) to continue later with ``resume``. While it is set, Ctrl-C
        (SIGINT) finishes the step under way, calls ``checkpoint`` and raises
        ``KeyboardInterrupt``.
    :param checkpoint_every: steps between checkpoints within an epoch; ``None``: epochs only.
    :param resume: a :class:`TrainingState` to continue from, with the model's weights
        already loaded. With the same data, arguments, seed and device, the run then ends
        exactly as if it had never stopped.
    :param progress: show a progress bar; ``None`` means only on a terminal.
    :param generator: random source for the shuffling and the binarization.
    :returns: the :class:`History` of losses.
    :raises ValueError: on bad arguments or data, before any parameter changes.
    :raises TrainingDivergedError: when a loss or a gradient is NaN or infinite, naming the
        epoch and step, before that step changes any parameter.
    """
    check_positive_int("num_epochs", num_epochs)
    check_positive_int("batch_size", batch_size)
    check_positive_float("learning_rate", learning_rate)
    reference = vae._reference_tensor()
    x = to_tensor(data, vae.data_dim)
    if not x.is_floating_point():  # checked before the cast below would hide it
        raise ValueError(f"training data must have a floating dtype, got {x.dtype}")
    x = x.to(device=reference.device, dtype=reference.dtype)
    if binarize is None:
        binarize = isinstance(vae.likelihood, BernoulliLikelihood) and not is_binary(x)
    vae.validate_data(x, "training data", probabilities=binarize)
    loss = Trace_ELBO() if loss is None else loss
    if not isinstance(loss, ELBO):
        raise ValueError(f"loss must be a pyro.infer.ELBO, got {type(loss).__name__}")
    if clip_norm is not None:
        check_positive_float("clip_norm", clip_norm)
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
    if resume is not None and not isinstance(resume, TrainingState):
        raise ValueError(f"resume must be a TrainingState, got {type(resume).__name__}")
    if isinstance(kl_warmup_epochs, bool) or not isinstance(kl_warmup_epochs, int):
        raise ValueError(f"kl_warmup_epochs must be an integer >= 0, got {kl_warmup_epochs!r}")
    if kl_warmup_epochs < 0:
        raise ValueError(f"kl_warmup_epochs must be an integer >= 0, got {kl_warmup_epochs}")
    if isinstance(loss, TraceMeanField_ELBO) and not has_closed_form_kl(vae):
        warnings.warn(
            f"TraceMeanField_ELBO: no closed-form KL is registered between the encoder's "
            f"{describe(vae.encoder(x[:2]))} and the prior's {describe(vae.prior())}, so "
            "Pyro estimates this KL by Monte Carlo, as Trace_ELBO does",
            stacklevel=2,
        )
    # RenyiELBO's log-sum-exp over particles must see each example's unscaled log-weights, so
    # it runs on the minibatch alone and the N / B scale is applied to its result afterwards.
    scale_outside = isinstance(loss, RenyiELBO)

    num_data = x.shape[0]
    num_steps = math.ceil(num_data / batch_size)
    optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    history = History(binarized=binarize)
    first_epoch, first_step, order = 1, 0, None
    if resume is not None:
        history, first_epoch, first_step, order = _restore(
            resume, optimizer, generator, num_data, x.device
        )
    target_beta = vae.beta
    warmup_steps = kl_warmup_epochs * num_steps

    def state(epoch: int, step: int, order: Tensor | None) -> TrainingState:
        return TrainingState(
            epoch=epoch,
            step=step,
            order=order if step else None,
            optimizer=optimizer.state_dict(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            generator_rng=None if generator is None else generator.get_state(),
            history=history,
        )

    # A private param store: the user's global one neither leaks into this fit nor receives
    # this model's parameters (DESIGN.md §4, trap 2).
    with (
        pyro.get_param_store().scope(),
        _restored_beta(vae),
        _sigint_flag(enabled=checkpoint is not None) as interrupted,
        warnings.catch_warnings(),
    ):
        # Pyro warns of a NaN loss; fit raises TrainingDivergedError instead, naming the step.
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        for epoch in range(first_epoch, num_epochs + 1):
            started = time.perf_counter()
            if order is None:
                order = torch.randperm(num_data, device=x.device, generator=generator)
            bar = tqdm(
                order.split(batch_size)[first_step:],
                initial=first_step,
                total=num_steps,
                desc=f"epoch {epoch}/{num_epochs}",
                leave=False,
                disable=(None if progress is None else not progress),
            )
            for step, indices in enumerate(bar, start=first_step + 1):
                global_step = (epoch - 1) * num_steps + step
                batch = x[indices]
                if binarize:
                    batch = torch.bernoulli(batch, generator=generator)
                if warmup_steps:
                    vae.beta = target_beta * min(1.0, global_step / warmup_steps)
                optimizer.zero_grad(set_to_none=True)
                with pyro.validation_enabled(global_step == 1):
                    if scale_outside:
                        step_loss = loss.loss_and_grads(vae.model, vae.guide, batch)
                        per_example = float(step_loss) / len(batch)
                        _scale_gradients(parameters, num_data / len(batch))
                    else:
                        step_loss = loss.loss_and_grads(vae.model, vae.guide, batch, num_data)
                        per_example = float(step_loss) / num_data
                where = f"at epoch {epoch}, step {step} of {num_steps}"
                if not math.isfinite(per_example):
                    raise TrainingDivergedError(
                        f"loss is {per_example} {where}; the parameters are those before this "
                        "step (try a smaller learning_rate)"
                    )
                gradient_norm = _gradient_norm(parameters, clip_norm)
                if not math.isfinite(gradient_norm):
                    raise TrainingDivergedError(
                        f"gradient norm is {gradient_norm} {where}; the parameters are those "
                        "before this step (try a smaller learning_rate or clip_norm)"
                    )
                optimizer.step()
                history.step_loss.append(per_example)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{per_example:.2f}", refresh=False)
                if step < num_steps and checkpoint is not None:
                    if interrupted.is_set():
                        checkpoint(state(epoch - 1, step, order))
                        raise KeyboardInterrupt
                    if checkpoint_every and global_step % checkpoint_every == 0:
                        checkpoint(state(epoch - 1, step, order))
            # Summed in step order from the stored step losses, so that a resumed epoch gets
            # the very same number as an uninterrupted one.
            history.loss.append(sum(history.step_loss[-num_steps:]) / num_steps)
            history.epoch_seconds.append(time.perf_counter() - started)
            first_step, order = 0, None
            if callback is not None:
                callback(epoch, history)
            if checkpoint is not None:
                checkpoint(state(epoch, 0, None))
                if interrupted.is_set():
                    raise KeyboardInterrupt
    return history


@contextlib.contextmanager
def _restored_beta(vae: VAE) -> Iterator[None]:
    beta = vae.beta
    try:
        yield
    finally:
        vae.beta = beta


def _scale_gradients(parameters: list[Tensor], factor: float) -> None:
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.mul_(factor)


def _restore(
    state: TrainingState,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None,
    num_data: int,
    device: torch.device,
) -> tuple[History, int, int, Tensor | None]:
    """Put the optimizer and random states back; return the history and where to go on."""
    if state.order is not None and len(state.order) != num_data:
        raise ValueError(
            f"resume: the saved run shuffled {len(state.order)} examples, the data has {num_data}"
        )
    if (state.generator_rng is None) != (generator is None):
        raise ValueError("resume: pass a generator exactly when the saved run had one")
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError) as error:
        raise ValueError(f"resume: the optimizer state does not fit this model: {error}") from error
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng)
    if generator is not None:
        generator.set_state(state.generator_rng)
    history = copy.deepcopy(state.history)
    order = None if state.order is None else state.order.to(device)
    return history, state.epoch + 1, state.step, order


def _gradient_norm(parameters: list[Tensor], clip_norm: float | None) -> float:
    if clip_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(parameters, clip_norm))
    grads = [p.grad for p in parameters if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


class _Flag:
    def __init__(self) -> None:
        self._set = False

    def set(self, *_: object) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@contextlib.contextmanager
def _sigint_flag(enabled: bool) -> Iterator[_Flag]:
    """While enabled (and in the main thread, the only one that receives signals), Ctrl-C sets
    a flag instead of raising at an arbitrary point, such as half-way through an optimizer
    step; the loop checks the flag between steps."""
    flag = _Flag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, flag.set)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
