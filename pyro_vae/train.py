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
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pyro_vae._checks import check_positive_float, check_positive_int
from pyro_vae.data import is_binary, to_tensor
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
    callback: Callable[[int, History], None] | None = None,
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
    :param callback: called as ``callback(epoch, history)`` after each epoch (1-based).
    :param progress: show a progress bar; ``None`` means only on a terminal.
    :param generator: random source for the shuffling and the binarization.
    :returns: the :class:`History` of losses.
    :raises ValueError: on bad arguments or data, before any parameter changes.
    :raises TrainingDivergedError: when a loss is NaN or infinite, naming the epoch and step.
    """
    check_positive_int("num_epochs", num_epochs)
    check_positive_int("batch_size", batch_size)
    check_positive_float("learning_rate", learning_rate)
    reference = vae._reference_tensor()
    x = to_tensor(data, vae.data_dim).to(device=reference.device, dtype=reference.dtype)
    if binarize is None:
        binarize = isinstance(vae.likelihood, BernoulliLikelihood) and not is_binary(x)
    vae.validate_data(x, "training data", probabilities=binarize)
    loss = Trace_ELBO() if loss is None else loss
    if not isinstance(loss, ELBO):
        raise ValueError(f"loss must be a pyro.infer.ELBO, got {type(loss).__name__}")
    if isinstance(kl_warmup_epochs, bool) or not isinstance(kl_warmup_epochs, int):
        raise ValueError(f"kl_warmup_epochs must be an integer >= 0, got {kl_warmup_epochs!r}")
    if kl_warmup_epochs < 0:
        raise ValueError(f"kl_warmup_epochs must be an integer >= 0, got {kl_warmup_epochs}")
    if isinstance(loss, TraceMeanField_ELBO) and not has_closed_form_kl(vae):
        warnings.warn(
            f"TraceMeanField_ELBO: no closed-form KL is registered between the encoder's "
            f"{_describe(vae.encoder(x[:2]))} and the prior's {_describe(vae.prior())}, so "
            "Pyro estimates this KL by Monte Carlo, as Trace_ELBO does",
            stacklevel=2,
        )
    # RenyiELBO's log-sum-exp over particles must see each example's unscaled log-weights, so
    # it runs on the minibatch alone and the N / B scale is applied to its result afterwards.
    scale_outside = isinstance(loss, RenyiELBO)

    num_data = x.shape[0]
    optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    history = History(binarized=binarize)
    num_steps = math.ceil(num_data / batch_size)
    target_beta = vae.beta
    warmup_steps = kl_warmup_epochs * num_steps
    # A private param store: the user's global one neither leaks into this fit nor receives
    # this model's parameters (DESIGN.md §4, trap 2).
    with pyro.get_param_store().scope(), _restored_beta(vae):
        for epoch in range(1, num_epochs + 1):
            started = time.perf_counter()
            order = torch.randperm(num_data, device=x.device, generator=generator)
            epoch_total = 0.0
            bar = tqdm(
                order.split(batch_size),
                total=num_steps,
                desc=f"epoch {epoch}/{num_epochs}",
                leave=False,
                disable=(None if progress is None else not progress),
            )
            for step, indices in enumerate(bar, start=1):
                batch = x[indices]
                if binarize:
                    batch = torch.bernoulli(batch, generator=generator)
                if warmup_steps:
                    global_step = (epoch - 1) * num_steps + step
                    vae.beta = target_beta * min(1.0, global_step / warmup_steps)
                optimizer.zero_grad(set_to_none=True)
                with pyro.validation_enabled(epoch == 1 and step == 1):
                    if scale_outside:
                        step_loss = loss.loss_and_grads(vae.model, vae.guide, batch)
                        per_example = float(step_loss) / len(batch)
                        _scale_gradients(optimizer, num_data / len(batch))
                    else:
                        step_loss = loss.loss_and_grads(vae.model, vae.guide, batch, num_data)
                        per_example = float(step_loss) / num_data
                if not math.isfinite(per_example):
                    raise TrainingDivergedError(
                        f"loss is {per_example} at epoch {epoch}, step {step} of {num_steps}; "
                        "the parameters are those before this step (try a smaller "
                        "learning_rate)"
                    )
                optimizer.step()
                history.step_loss.append(per_example)
                epoch_total += per_example
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{per_example:.2f}", refresh=False)
            history.loss.append(epoch_total / num_steps)
            history.epoch_seconds.append(time.perf_counter() - started)
            if callback is not None:
                callback(epoch, history)
    return history


@contextlib.contextmanager
def _restored_beta(vae: VAE) -> Iterator[None]:
    beta = vae.beta
    try:
        yield
    finally:
        vae.beta = beta


def _scale_gradients(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                parameter.grad.mul_(factor)


def _describe(d: torch.distributions.Distribution) -> str:
    while isinstance(d, torch.distributions.Independent):
        d = d.base_dist
    return type(d).__name__
