"""How good the encoder's q(z | x) is, example by example: the amortization gap and the
approximation gap (Cremer, Li & Duvenaud, "Inference Suboptimality in Variational
Autoencoders", 2018).

For each example x_n, :func:`inference_gaps` fits a Gaussian q*_n(z) of its own by SVI, with the
model frozen, started at the encoder's q(z | x_n). Then

    amortization gap   = ELBO(q*) − ELBO(q(z | x))   what sharing one encoder costs;
    approximation gap  = log p(x) − ELBO(q*)          what the Gaussian family costs,

with log p(x) the importance-weighted bound of :func:`~pyro_vae.infer.estimators.log_likelihood`
at K draws from q* (its proposal is q*, which fits each example at least as well as the
encoder). Both gaps are ≥ 0 in expectation, up to the optimizer's convergence; the IW bound is
below log p(x) by a bias that shrinks with K, so the approximation gap is, if anything,
understated (by about 0.03 nats at K = 1000 on Fashion-MNIST and MNIST VAEs: docs/design.md).

The maths is Pyro's: q* is a guide of ``pyro.param``s (one set per example, in the model's data
plate, so the examples are fitted independently and all at once), fitted by ``SVI`` with
``Trace_ELBO``; the ELBOs and the IW bound are the package's estimators run on that guide. No
formula is written here.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim.lr_scheduler import PyroLRScheduler
from torch import Tensor

from pyro_vae._checks import check_positive_float, check_positive_int
from pyro_vae._distributions import describe, is_diagonal_normal
from pyro_vae.infer.estimators import VAELike, elbo, log_likelihood, progress_bar
from pyro_vae.infer.local_gaussian import FixedWeights, LocalGaussian

# Each call's local parameters get names of their own in Pyro's param store (and leave it when
# the call ends), so that two calls, or a user's own params, never share an entry.
_calls = itertools.count()
# Convergence is judged against the average of the iterates over the last fifth of the steps
# at the full step size (the steps before the step size falls).
WINDOW_FRACTION = 0.2
# The step size falls by this factor over the second half of the steps (constant before).
STEP_SIZE_DECAY = 0.001
# Adam's second-moment decay: a memory of about 20 steps, not torch's 1000. A q* started far
# from its optimum sees large gradients on the way and small ones on arrival; with a long
# memory of the large ones, Adam's steps on arrival are too small to finish.
BETA2 = 0.95
# Draws of z per example and SVI step, by family (full covariance?), where not given. The full
# family's scale has D(D+1)/2 entries per example, whose gradients are noisier: on a digits VAE
# with a full-covariance encoder, q* fitted with 2 draws a step fell 0.034 nats short of the one
# fitted with 8 (or 3000 steps); the diagonal family's, 0.005.
SVI_PARTICLES = {False: 2, True: 8}
# Rows per forward pass (and examples per block) by default. Passes of about a thousand rows
# keep a pass's activations and per-pixel log-probabilities within the cores' caches: on a
# Fashion-MNIST VAE (784 pixels), 500 inputs took 14.8 s in passes of 4096 rows and 12.1-12.6 s
# in passes of 1024, the same estimates to the digit (benchmarks/README.md).
CHUNK_SIZE = 1024


class GapsModel(VAELike, Protocol):
    """What :func:`inference_gaps` uses of a model: a :class:`VAELike` whose guide and model
    have one latent site per example, and its modules and parameters (frozen while q* is
    fitted). The site is ``z`` in the plate ``"data"``, as in the VAE, unless the model names
    others in ``latent_site`` and ``latent_plate``."""

    def parameters(self) -> Iterator[Tensor]: ...
    def modules(self) -> Iterator[Any]: ...


class InferenceGaps(NamedTuple):
    """Per-example results of :func:`inference_gaps`, in nats; ``(N,)`` unless said.

    ``*_se`` are the Monte-Carlo standard errors of each example's estimate. For averages over
    the examples, with the standard error of the mean over them, use :meth:`average`."""

    encoder_elbo: Tensor
    """ELBO of the encoder's q(z | x)."""
    optimized_elbo: Tensor
    """ELBO of q*, the Gaussian fitted to the example alone."""
    log_likelihood: Tensor
    """The importance-weighted bound on log p(x), K draws from q*."""
    encoder_elbo_se: Tensor
    optimized_elbo_se: Tensor
    loc: Tensor
    """μ(x), the encoder's mean, ``(N, latent_dim)``."""
    scale: Tensor
    """σ(x), the encoder's standard deviations, ``(N, latent_dim)``."""
    optimized_loc: Tensor
    """μ*, ``(N, latent_dim)``."""
    optimized_scale: Tensor
    """σ*, the standard deviations of q*, ``(N, latent_dim)``."""
    optimized_scale_tril: Tensor | None
    """q*'s Cholesky factor, ``(N, latent_dim, latent_dim)``, for the full-covariance
    family; ``None`` for the diagonal one."""
    elbo_change: Tensor
    """|ELBO(q*) − ELBO(q')| / |ELBO(q*)|, q' the average of the iterates over the last fifth
    of the steps at the full step size, both estimated with the same draws."""
    converged: Tensor
    """``elbo_change <= tolerance``, a bool per example."""
    full_covariance: bool
    num_steps: int
    num_particles: int
    iw_particles: int
    tolerance: float
    seconds: float
    """How long the whole estimate took."""

    @property
    def amortization_gap(self) -> Tensor:
        """ELBO(q*) − ELBO(q(z | x)): what sharing one encoder network costs."""
        return self.optimized_elbo - self.encoder_elbo

    @property
    def approximation_gap(self) -> Tensor:
        """log p(x) − ELBO(q*): what the Gaussian family costs, however it is fitted."""
        return self.log_likelihood - self.optimized_elbo

    @property
    def standardized_shift(self) -> Tensor:
        """(μ(x) − μ*) / σ*, per example and dimension: how far the encoder's mean is from the
        best one, in units of q*'s spread."""
        return (self.loc - self.optimized_loc) / self.optimized_scale

    @property
    def scale_ratio(self) -> Tensor:
        """σ(x) / σ*, per example and dimension: above 1, the encoder is less sure than the
        best Gaussian of its own."""
        return self.scale / self.optimized_scale

    def optimized_posterior(self) -> dist.TorchDistribution:
        """q* for every example, batch shape ``(N,)``."""
        if self.optimized_scale_tril is not None:
            return dist.MultivariateNormal(self.optimized_loc, scale_tril=self.optimized_scale_tril)
        return dist.Normal(self.optimized_loc, self.optimized_scale).to_event(1)

    @staticmethod
    def average(values: Tensor) -> tuple[float, float]:
        """The mean over the examples of a per-example quantity and its standard error (the
        spread over the examples, over √N; NaN for one example)."""
        n = len(values)
        se = float(values.std() / math.sqrt(n)) if n > 1 else math.nan
        return float(values.mean()), se


@torch.no_grad()
def _encoder_moments(vae: GapsModel, x: Tensor, full: bool | None) -> tuple[Tensor, Tensor, bool]:
    """μ(x) and the encoder's scale (σ(x), or its Cholesky factor for the full family), and the
    family: that of the encoder's posterior when ``full`` is ``None``."""
    posterior = vae.encoder(x)
    if isinstance(posterior, torch.distributions.MultivariateNormal):
        loc, tril = posterior.loc, posterior.scale_tril
        std = tril.pow(2).sum(-1).sqrt()
        family = True
    elif is_diagonal_normal(posterior):
        loc, std = posterior.mean, posterior.stddev
        tril, family = torch.diag_embed(std), False
    else:
        # A flow: no Gaussian family to match; q* is full-covariance, started at its moments.
        loc, std = vae.encode(x)
        tril, family = torch.diag_embed(std), True
    if not bool((std > 0).all()) or not bool(torch.isfinite(loc).all()):
        raise ValueError(
            f"inference_gaps needs an encoder with a finite μ(x) and σ(x) > 0; this one gives a "
            f"{describe(posterior)} with σ from {float(std.min()):.3g}"
        )
    full = family if full is None else full
    return loc, tril if full else std, full


@contextlib.contextmanager
def _frozen(vae: GapsModel) -> Iterator[None]:
    """The model's parameters with ``requires_grad`` off for the duration: no gradient reaches
    them, so nothing can move them, and no ``.grad`` is left on the user's tensors. Its modules
    are in evaluation mode meanwhile, as Pyro asks of a module with frozen parameters (and as
    a dropout or batch-norm layer would need); every flag is put back as it was."""
    modes = [(module, module.training) for module in vae.modules()]
    thawed = [p for p in vae.parameters() if p.requires_grad]
    for module, _ in modes:
        module.training = False
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _unit_beta(vae: object) -> Iterator[None]:
    """β = 1 for the duration: β scales the model's z site (docs/design.md, "β"), and q* must
    maximize the true ELBO, not the β-weighted one."""
    if not hasattr(vae, "beta"):
        yield
        return
    beta = vae.beta
    vae.beta = 1.0
    try:
        yield
    finally:
        vae.beta = beta


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draws from ``seed`` on a fork of torch's random state: the same ε for every ELBO that
    is estimated under it (common random numbers), and no change to the draws after it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _constant_steps(num_steps: int) -> int:
    """The steps at the full step size, the first half."""
    return num_steps // 2


def _step_size(step: int, num_steps: int) -> float:
    """The factor on the step size: 1 over the first half, then down geometrically to
    :data:`STEP_SIZE_DECAY` at the last step (far first, then fine)."""
    half = _constant_steps(num_steps)
    if step < half:
        return 1.0
    return float(STEP_SIZE_DECAY ** ((step - half) / max(1, num_steps - 1 - half)))


def _elbo_draws(
    program: FixedWeights, x: Tensor, num_particles: int, chunk_size: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Each example's ELBO under ``program`` from ``num_particles`` draws, and its Monte-Carlo
    standard error, ``(n,)`` each; every pass is ``x`` stacked ``k`` times, one particle per
    copy, as many rows as ``chunk_size`` allows."""
    per_pass = max(1, chunk_size // len(x))
    draws = []
    with _seeded(seed, x.device):
        for start in range(0, num_particles, per_pass):
            copies = min(per_pass, num_particles - start)
            rows = x.repeat(copies, 1)
            draws.append(elbo(program, rows, chunk_size=len(rows)).reshape(copies, len(x)))
    stacked = torch.cat(draws)
    se = stacked.std(0) / math.sqrt(num_particles) if num_particles > 1 else stacked[0] * math.nan
    return stacked.mean(0), se


def inference_gaps(
    vae: GapsModel,
    x: Tensor,
    *,
    num_steps: int = 300,
    learning_rate: float = 0.1,
    svi_particles: int | None = None,
    num_particles: int = 100,
    iw_particles: int = 1000,
    tolerance: float = 1e-3,
    full_covariance: bool | None = None,
    chunk_size: int = CHUNK_SIZE,
    progress: bool | None = None,
) -> InferenceGaps:
    """Fit a Gaussian q*(z) to each example of ``x`` by SVI and measure how far the encoder's
    q(z | x) is from it (the amortization gap) and q* from log p(x) (the approximation gap).

    - **The family.** ``full_covariance=None`` matches the encoder's: diagonal for a diagonal
      Normal encoder, full covariance for a full-covariance one. An encoder of another family
      (a flow) gets the full-covariance family, started at its moments; its "amortization
      gap" then also compares the families, and may be negative.
    - **The fit.** q*_n starts at the encoder's q(z | x_n). Its parameters are Pyro params in
      the encoder's own units (m_n = μ_n + L_n u_n and scale L_n T_n, with u_n = 0 and T_n = I
      at the start, L_n the encoder's σ or Cholesky factor), so one step size suits every
      dimension whatever its σ. ``num_steps`` of Adam through ``SVI``/``Trace_ELBO``, each
      with ``svi_particles`` draws of z per example (in antithetic pairs; ``None``: 2 for the
      diagonal family, 8 for the full one, :data:`SVI_PARTICLES`), at
      ``learning_rate``: constant over the first half of the steps, so that q* can travel
      about ``learning_rate * num_steps / 2`` of the encoder's σ (15 by default, far more
      than a trained encoder is usually off), then falling 1000-fold. The model is frozen
      (see the code), β is taken as 1 (the true ELBO), and a Bayesian decoder's weights are
      held at their posterior mean, as in
      :func:`~pyro_vae.infer.estimators.log_likelihood`.
    - **The estimates.** Each ELBO from ``num_particles`` draws per example, the encoder's and
      q*'s from the same draws of ε (so the gap's noise partly cancels), with their standard
      errors; log p(x) from ``iw_particles`` draws of q*.
    - **Convergence.** An example is marked not converged (``converged``) when its ELBO
      changed by more than ``tolerance`` (relative) from the average of its iterates over the
      last fifth of the steps at the full step size to q*: it was still moving when the step
      size began to fall. The mark is cautious: a q* that arrived only while the step size
      fell is marked too.

    Work goes in blocks of at most ``chunk_size`` examples, each fitted on its own, and passes
    of at most about ``chunk_size`` rows; ``x`` must be in the likelihood's support.

    ``progress``: bars over the SVI steps and the bound's passes (``None``: only on a
    terminal); where no bar shows, a line at least every 10 s goes to the logger
    ``pyro_vae.progress``, as for :func:`~pyro_vae.infer.estimators.log_likelihood`.
    """
    vae.validate_data(x)
    check_positive_int("num_steps", num_steps)
    check_positive_float("learning_rate", learning_rate)
    if svi_particles is not None:
        check_positive_int("svi_particles", svi_particles)
    check_positive_int("num_particles", num_particles)
    check_positive_int("iw_particles", iw_particles)
    check_positive_float("tolerance", tolerance)
    check_positive_int("chunk_size", chunk_size)
    if len(x) == 0:
        raise ValueError("inference_gaps needs at least one example")
    started = time.perf_counter()
    loc, scale, full = _encoder_moments(vae, x, full_covariance)
    if svi_particles is None:
        svi_particles = SVI_PARTICLES[full]
    settings = _Settings(
        num_steps, learning_rate, svi_particles, num_particles, iw_particles, chunk_size, progress
    )
    blocks = [
        _fit_block(vae, *part, full, settings)
        for part in zip(
            x.split(chunk_size), loc.split(chunk_size), scale.split(chunk_size), strict=True
        )
    ]
    columns = {name: torch.cat([block[name] for block in blocks]) for name in blocks[0]}
    std = _marginal_std(scale, full)
    return InferenceGaps(
        loc=loc,
        scale=std,
        optimized_scale=_marginal_std(columns["optimized_scale"], full),
        optimized_scale_tril=columns.pop("optimized_scale") if full else None,
        converged=columns["elbo_change"] <= tolerance,
        full_covariance=full,
        num_steps=num_steps,
        num_particles=num_particles,
        iw_particles=iw_particles,
        tolerance=tolerance,
        seconds=time.perf_counter() - started,
        **{name: value for name, value in columns.items() if name != "optimized_scale"},
    )


class _Settings(NamedTuple):
    num_steps: int
    learning_rate: float
    svi_particles: int
    num_particles: int
    iw_particles: int
    chunk_size: int
    progress: bool | None


def _marginal_std(scale: Tensor, full: bool) -> Tensor:
    """The standard deviations of N(·, diag scale²), or of N(·, L Lᵀ) for a Cholesky factor L
    (the norms of its rows)."""
    return scale.pow(2).sum(-1).sqrt() if full else scale


def _fit_block(
    vae: GapsModel, x: Tensor, loc0: Tensor, scale0: Tensor, full: bool, settings: _Settings
) -> dict[str, Tensor]:
    """Fit q* to one block of examples, started at the encoder's ``loc0`` and ``scale0`` (σ, or
    the Cholesky factor for the full family), and estimate its columns of
    :class:`InferenceGaps` (``optimized_scale`` as q*'s scale of the same kind)."""
    num_steps = settings.num_steps
    prefix = f"inference_gaps_{next(_calls)}"

    def fitted() -> tuple[Tensor, Tensor]:
        # In the encoder's units: u and v (and the shear of the full family) start at zero.
        u = pyro.param(f"{prefix}.shift", lambda: torch.zeros_like(loc0))
        v = pyro.param(f"{prefix}.log_stretch", lambda: torch.zeros_like(loc0))
        if not full:
            return loc0 + scale0 * u, scale0 * v.exp()
        shear = pyro.param(f"{prefix}.shear", lambda: torch.zeros_like(scale0))
        stretch = shear.tril(-1) + torch.diag_embed(v.exp())
        return loc0 + (scale0 @ u.unsqueeze(-1)).squeeze(-1), scale0 @ stretch

    names = (getattr(vae, "latent_site", "z"), getattr(vae, "latent_plate", "data"))
    program = FixedWeights(vae, LocalGaussian(x, fitted, full, names, sticking=True))
    # Adam on each param, with the step size of _step_size: Pyro's wrapper of torch's LambdaLR.
    optimizer = PyroLRScheduler(
        torch.optim.lr_scheduler.LambdaLR,
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": settings.learning_rate, "betas": (0.9, BETA2)},
            "lr_lambda": lambda step: _step_size(step, num_steps),
        },
    )
    # The model is frozen two ways. SVI steps the params it finds in the trace, and
    # poutine.block hides the model's (its networks', which pyro.module registers) from it,
    # so that only q*'s are stepped; and _frozen turns requires_grad off on the model's
    # parameters, so that no gradient is computed for them at all (nor left on them).
    svi = SVI(
        poutine.block(program.model, hide_types=["param"]),
        program.guide,
        optimizer,
        loss=Trace_ELBO(),
    )
    # Convergence is judged against the average of the iterates over the last fifth of the
    # steps at the full step size. Not one iterate: where the gradients stay noisy (a posterior
    # that is not Gaussian, or a family that cannot match it), one iterate there is off by the
    # step size's jitter, and most inputs of a trained VAE would be called unconverged for it
    # (digits: 48 of 360 passed against one iterate, 334 against the average).
    window, half = max(1, round(WINDOW_FRACTION * num_steps)), _constant_steps(num_steps)
    earlier = _Average((loc0, scale0))
    final = (loc0, scale0)
    store = pyro.get_param_store()
    rows = x.repeat(settings.svi_particles, 1)
    try:
        # Gradients on even under a caller's no_grad (the explain report runs under one).
        # Validation off, as in training's steps: x was validated once, and q*'s parameters
        # are checked below.
        with torch.enable_grad(), _frozen(vae), _unit_beta(vae), pyro.validation_enabled(False):
            for step in progress_bar(range(num_steps), "q* by SVI", num_steps, settings.progress):
                svi.step(rows)
                optimizer.step()
                if half - window <= step < half:
                    earlier.add(fitted())
            loc, scale = fitted()
            final = (loc.detach(), scale.detach())
    finally:
        for name in [name for name in store.keys() if name.startswith(f"{prefix}.")]:
            del store[name]
    if not all(bool(torch.isfinite(value).all()) for value in final):
        raise ValueError(
            "inference_gaps: q* left the finite numbers during SVI (a step size too large "
            "for this model?); try a smaller learning_rate"
        )
    snapshot = earlier.value()
    num_particles, chunk_size = settings.num_particles, settings.chunk_size
    with torch.no_grad(), pyro.validation_enabled(False):
        # One seed for the three ELBOs: the same draws of ε (common random numbers).
        seed = int(torch.randint(2**62, ()))
        encoder = _elbo_draws(FixedWeights(vae, vae.guide), x, num_particles, chunk_size, seed)
        previous = FixedWeights(vae, LocalGaussian(x, lambda: snapshot, full, names))
        before, _ = _elbo_draws(previous, x, num_particles, chunk_size, seed)
        optimized = FixedWeights(vae, LocalGaussian(x, lambda: final, full, names))
        after = _elbo_draws(optimized, x, num_particles, chunk_size, seed)
        bound = log_likelihood(
            optimized, x, settings.iw_particles, chunk_size, progress=settings.progress
        )
    return {
        "encoder_elbo": encoder[0],
        "optimized_elbo": after[0],
        "log_likelihood": bound,
        "encoder_elbo_se": encoder[1],
        "optimized_elbo_se": after[1],
        "optimized_loc": final[0],
        "optimized_scale": final[1],
        "elbo_change": (after[0] - before).abs() / after[0].abs(),
    }


class _Average:
    """The running average of a pair of tensors, or ``start`` while none was added."""

    def __init__(self, start: tuple[Tensor, Tensor]) -> None:
        self.start, self.count = start, 0
        self.sums = (torch.zeros_like(start[0]), torch.zeros_like(start[1]))

    def add(self, values: tuple[Tensor, Tensor]) -> None:
        with torch.no_grad():
            self.sums = (self.sums[0] + values[0], self.sums[1] + values[1])
        self.count += 1

    def value(self) -> tuple[Tensor, Tensor]:
        if self.count == 0:
            return self.start
        return self.sums[0] / self.count, self.sums[1] / self.count
