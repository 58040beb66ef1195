"""Per-example estimators of the ELBO and of log p(x), in nats.

All of them read log-densities off Pyro traces of ``vae.guide`` replayed into ``vae.model``: the
maths stays Pyro's, and the same code serves any prior, encoder or likelihood. They run the model
with ``num_data=None`` and read each site's *unscaled* log-density, so neither minibatch scaling
(docs/design.md, "IWAE and N/B") nor β enters: they measure the true ELBO of a β-VAE.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from tqdm.auto import tqdm

from pyro_vae._checks import check_positive_int
from pyro_vae._distributions import has_density_everywhere, is_diagonal_normal

PROGRESS_SECONDS = 10.0
"""Off a terminal, where no bar shows, a long estimate logs a line at least this often."""

_progress_log = logging.getLogger("pyro_vae.progress")
"""``pyro_vae.progress``: a long estimate's progress at INFO, every :data:`PROGRESS_SECONDS`
while no progress bar shows (off a terminal, or ``progress=False``); the scripts print it."""

_Item = TypeVar("_Item")
_clock = time.monotonic


def progress_bar(
    items: Iterable[_Item], desc: str, total: int | None, progress: bool | None
) -> Iterator[_Item]:
    """``items`` under a tqdm bar (``progress``: shown; ``None``: only on a terminal). Where
    no bar shows, a line ``DESC: i of n (p%), t s, about r s left`` goes to the logger
    ``pyro_vae.progress`` at INFO whenever the next item would end more than
    :data:`PROGRESS_SECONDS` after the last line (judged from the mean item's time so far), so
    the gaps stay under it while the items take about alike."""
    bar = tqdm(items, desc=desc, total=total, disable=None if progress is None else not progress)
    if not bar.disable:
        yield from bar
        return
    started = last = _clock()
    for done, item in enumerate(bar, start=1):
        yield item
        now = _clock()
        per_item = (now - started) / done
        if total is not None and done < total and now + per_item - last >= PROGRESS_SECONDS:
            _progress_log.info(
                "%s: %d of %d (%.0f%%), %.0fs, about %.0fs left",
                desc,
                done,
                total,
                100 * done / total,
                now - started,
                per_item * (total - done),
            )
            last = now


class VAELike(Protocol):
    """What the estimators use of a VAE (:class:`~pyro_vae.VAE` has it all): its Pyro program,
    its parts, and its checks of the data."""

    @property
    def model(self) -> Callable[..., Any]: ...
    @property
    def guide(self) -> Callable[..., Any]: ...
    @property
    def prior(self) -> Callable[[], Any]:
        """p(z), a distribution, when called."""

    @property
    def encoder(self) -> Callable[[Tensor], Any]:
        """x -> q(z | x), a distribution."""

    @property
    def likelihood(self) -> Callable[[Tensor], Any]:
        """The decoder's output -> p(x | z), a distribution."""

    @property
    def weight_guide(self) -> Callable[[], object] | None:
        """The guide of a Bayesian decoder's weights; ``None`` for a deterministic decoder."""

    def weight_means(self) -> dict[str, Tensor]: ...
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]: ...
    def decode(self, z: Tensor, weights: str = ...) -> Tensor: ...
    def validate_data(self, x: object, what: str = ..., *, probabilities: bool = ...) -> Tensor: ...


class ELBOTerms(NamedTuple):
    """Per-example terms of the ELBO, in nats.

    ``reconstruction`` is E_q[log p(x | z)] and ``kl`` the Monte-Carlo estimate of
    KL(q(z | x) ‖ p(z)) = E_q[log q(z | x) − log p(z)], each ``(N,)`` and averaged over the
    particles. ``global_kl`` is the KL of the global latents (a Bayesian decoder's weights),
    KL(q(w) ‖ p(w)), estimated the same way, a scalar; 0 for a deterministic decoder. It counts
    once for a whole dataset of ``num_data`` examples, so each example carries
    ``global_kl / num_data`` of it, as in the training loss. When x is that whole dataset,
    Σ_n elbo_n is its ELBO, a lower bound on log p(x_1, ..., x_N) with z and the weights
    integrated out.
    """

    reconstruction: Tensor
    kl: Tensor
    global_kl: Tensor
    num_data: int

    @property
    def global_kl_per_example(self) -> Tensor:
        return self.global_kl / self.num_data

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl - self.global_kl_per_example


def _log_prob_parts(trace: poutine.Trace, observed: bool) -> tuple[Tensor, Tensor]:
    """The summed log-densities of a trace's observed (or latent) sites: per example for the
    sites in a plate, ``(B,)``, and in total for the global sites outside every plate."""
    trace = prune_subsample_sites(trace)
    trace.compute_log_prob()
    local, global_ = torch.zeros(()), torch.zeros(())
    for site in trace.nodes.values():
        if site["type"] != "sample" or site["is_observed"] != observed:
            continue
        # Pyro's "log_prob" is multiplied by the site's scale (β, and N/B in minibatches);
        # the unscaled density is the one the ELBO and log p(x) are made of.
        log_prob = site["unscaled_log_prob"]
        if site["cond_indep_stack"]:
            local = local + log_prob
        else:
            global_ = global_ + log_prob
    return local, global_


def _one_particle(
    vae: VAELike, x: Tensor, weights: str = "sample"
) -> tuple[Tensor, Tensor, Tensor]:
    """(log p(x | z), log q(z | x) − log p(z), log q(w) − log p(w)) for one draw of the global
    latents w and one z ~ q(z | x) per example. ``weights="mean"`` fixes w at its posterior
    mean instead (the global term is then 0)."""
    model, guide = vae.model, vae.guide
    if weights == "mean" and vae.weight_guide is not None:
        means = vae.weight_means()
        model, guide = poutine.condition(model, data=means), poutine.condition(guide, data=means)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    reconstruction, _ = _log_prob_parts(model_trace, observed=True)
    log_prior, log_weight_prior = _log_prob_parts(model_trace, observed=False)
    log_posterior, log_weight_posterior = _log_prob_parts(guide_trace, observed=False)
    return reconstruction, log_posterior - log_prior, log_weight_posterior - log_weight_prior


@torch.no_grad()
def elbo_terms(
    vae: VAELike,
    x: Tensor,
    num_particles: int = 1,
    chunk_size: int = 1024,
    num_data: int | None = None,
) -> ELBOTerms:
    """The ELBO's reconstruction and KL terms per example, averaged over ``num_particles``
    draws of z ~ q(z | x) (and of the weights of a Bayesian decoder, one draw per particle and
    batch, shared by the batch as in training).

    :param vae: a VAE (:class:`VAELike`).
    :param x: data ``(N, data_dim)`` inside the likelihood's support.
    :param num_particles: draws of z per example.
    :param chunk_size: examples per forward pass (bounds memory).
    :param num_data: the dataset size over which the global KL is spread; ``None``: ``len(x)``.
        Pass the training set's size to compare with the training loss.
    """
    vae.validate_data(x)
    check_positive_int("num_particles", num_particles)
    check_positive_int("chunk_size", chunk_size)
    num_data = len(x) if num_data is None else check_positive_int("num_data", num_data)
    reconstruction: list[Tensor] = []
    kl: list[Tensor] = []
    global_kl = torch.zeros(())
    # Running sums over the particles, not a list of them: memory stays that of one pass for
    # any num_particles.
    for batch in x.split(chunk_size):
        reconstruction_sum, kl_sum = torch.zeros(()), torch.zeros(())
        for _ in range(num_particles):
            r, k, g = _one_particle(vae, batch)
            reconstruction_sum, kl_sum, global_kl = (
                reconstruction_sum + r,
                kl_sum + k,
                global_kl + g,
            )
        reconstruction.append(reconstruction_sum / num_particles)
        kl.append(kl_sum / num_particles)
    num_passes = num_particles * math.ceil(len(x) / chunk_size)
    return ELBOTerms(torch.cat(reconstruction), torch.cat(kl), global_kl / num_passes, num_data)


def elbo(
    vae: VAELike,
    x: Tensor,
    num_particles: int = 1,
    chunk_size: int = 1024,
    num_data: int | None = None,
) -> Tensor:
    """Per-example ELBO in nats, ``(N,)``: E_q[log p(x | z)] − KL(q(z | x) ‖ p(z)) (less the
    example's share of a Bayesian decoder's weight KL), estimated with ``num_particles`` draws
    per example. Arguments as :func:`elbo_terms`."""
    return elbo_terms(vae, x, num_particles, chunk_size, num_data).elbo


@torch.no_grad()
def log_likelihood(
    vae: VAELike,
    x: Tensor,
    num_particles: int = 1000,
    chunk_size: int = 4096,
    progress: bool | None = None,
) -> Tensor:
    """Per-example importance-weighted lower bound on log p(x) (Burda et al. 2016), ``(N,)``:

        log (1/K) Σ_k p(x, z_k) / q(z_k | x),   z_k ~ q(z | x),   K = ``num_particles``,

    the bound Pyro's ``RenyiELBO(alpha=0, num_particles=K)`` trains (IWAE). It is at least the
    ELBO in expectation, and tends to log p(x) as K grows. Work is done in chunks of at most
    ``chunk_size`` (example, particle) rows per forward pass, so memory stays bounded for any K;
    the chunks are combined with a running log-sum-exp, so the chunk size does not change the
    value.

    With a Bayesian decoder it bounds log p(x | w̄), the likelihood *conditional on the
    posterior-mean weights* w̄ = E_q[w]: importance sampling runs over z only, with the
    decoder's weights fixed at w̄ (not a bound marginal over the weights).

    :param progress: show a progress bar over the chunks; ``None``: only on a terminal.
        Without a bar, a line at least every 10 s goes to the logger ``pyro_vae.progress``
        (:func:`progress_bar`).
    """
    vae.validate_data(x)
    check_positive_int("num_particles", num_particles)
    check_positive_int("chunk_size", chunk_size)
    examples_per_chunk = max(1, min(len(x), chunk_size))
    particles_per_chunk = max(1, chunk_size // examples_per_chunk)
    # The chunks are made as they are needed, not listed up front: a list would hold one entry
    # per pass, unbounded in K.
    chunks = (
        (batch, start, min(particles_per_chunk, num_particles - start))
        for batch in x.split(examples_per_chunk)
        for start in range(0, num_particles, particles_per_chunk)
    )
    num_chunks = math.ceil(len(x) / examples_per_chunk) * math.ceil(
        num_particles / particles_per_chunk
    )
    results: list[Tensor] = []
    running: Tensor | None = None
    for batch, start, count in progress_bar(chunks, "log p(x)", num_chunks, progress):
        n = batch.shape[0]
        # One pass over `count` copies of the batch: row k * n + i is particle k of example i.
        repeated = batch.repeat(count, 1)
        reconstruction, kl, _ = _one_particle(vae, repeated, weights="mean")
        log_weights = (reconstruction - kl).reshape(count, n)
        chunk_lse = torch.logsumexp(log_weights, dim=0)
        # A new example batch starts at its first particle chunk.
        running = (
            chunk_lse if running is None or start == 0 else torch.logaddexp(running, chunk_lse)
        )
        if start + count == num_particles:
            results.append(running - math.log(num_particles))
    return torch.cat(results)


@torch.no_grad()
def weight_spread(vae: VAELike, x: Tensor, num_particles: int = 100) -> tuple[Tensor, Tensor]:
    """What a Bayesian decoder's weight uncertainty does to reconstructions: with z = μ(x)
    fixed, the pixel-wise mean and standard deviation of the likelihood's mean over
    ``num_particles`` weight draws from their guide, each ``(N, data_dim)``. For a
    deterministic decoder the spread is zero."""
    check_positive_int("num_particles", num_particles)
    loc, _ = vae.encode(x)
    # Welford's running mean and sum of squared deviations, not a stack of the draws: memory
    # stays that of one reconstruction for any num_particles.
    mean = vae.likelihood(vae.decode(loc)).mean
    squares = torch.zeros_like(mean)
    for count in range(2, num_particles + 1):
        draw = vae.likelihood(vae.decode(loc)).mean
        delta = draw - mean
        mean = mean + delta / count
        squares = squares + delta * (draw - mean)
    return mean, (squares / (num_particles - 1)).sqrt() if num_particles > 1 else squares


# ---------------------------------------------------------------- how the latent space is used


class ActiveUnits(NamedTuple):
    """Latent dimensions that carry information about x (Burda et al. 2016): dimension i is
    active when Cov_x(E_q[z_i | x]) exceeds ``threshold``; collapsed dimensions have a mean
    that ignores x (and a posterior equal to the prior)."""

    num_active: int
    """The number of active dimensions."""
    variance: Tensor
    """Cov_x(E_q[z_i | x]) for each dimension, ``(latent_dim,)``."""
    threshold: float


@torch.no_grad()
def active_units(vae: VAELike, x: Tensor, threshold: float = 0.01) -> ActiveUnits:
    """Count the active latent dimensions over the examples ``x`` (at least two)."""
    vae.validate_data(x)
    if len(x) < 2:
        raise ValueError("active_units needs at least two examples: it measures a variance")
    loc, _ = vae.encode(x)
    variance = loc.var(dim=0)
    return ActiveUnits(int((variance > threshold).sum()), variance, float(threshold))


@torch.no_grad()
def kl_per_dimension(vae: VAELike, x: Tensor, chunk_size: int = 1024) -> Tensor:
    """KL(q(z_i | x) ‖ p(z_i)) per example and latent dimension, ``(N, latent_dim)``, in closed
    form; the row sums are the examples' KL terms. It needs a factorized posterior and prior
    (diagonal Normal encoder; standard or diagonal Normal prior): otherwise the KL does not
    split into dimensions and a ``ValueError`` says so. ``chunk_size``: examples per pass."""
    vae.validate_data(x)
    check_positive_int("chunk_size", chunk_size)
    prior = vae.prior()
    rows = []
    for batch in x.split(chunk_size):
        posterior = vae.encoder(batch)
        if not (is_diagonal_normal(posterior) and is_diagonal_normal(prior)):
            raise ValueError(
                "KL per dimension needs a diagonal Normal posterior and prior; this VAE has "
                f"{type(posterior).__name__} and {type(prior).__name__}"
            )
        q, p = posterior.base_dist, prior.base_dist.expand(posterior.base_dist.batch_shape)
        rows.append(torch.distributions.kl_divergence(q, p))
    return torch.cat(rows)


class KLDecomposition(NamedTuple):
    """Hoffman & Johnson (2016): the average KL term splits into the information z carries
    about x and the distance of the aggregate posterior from the prior,

        (1/N) Σ_n KL(q(z|x_n) ‖ p(z)) = I(x; z) + KL(q(z) ‖ p(z)),  q(z) = (1/N) Σ_n q(z|x_n).

    Monte-Carlo estimates in nats with their standard errors; the identity holds exactly for
    the estimates, which share their draws."""

    average_kl: float
    mutual_information: float
    marginal_kl: float
    average_kl_se: float
    mutual_information_se: float
    marginal_kl_se: float


@torch.no_grad()
def kl_decomposition(
    vae: VAELike,
    x: Tensor,
    num_particles: int = 1,
    chunk_size: int = 2**20,
    progress: bool | None = None,
) -> KLDecomposition:
    """Estimate :class:`KLDecomposition` over the examples ``x`` (the empirical data
    distribution), drawing ``num_particles`` z ~ q(z | x_n) per example. log q(z) needs the
    density of every posterior q(z | x_m) at every draw: N² work, done in chunks of at most
    ``chunk_size`` (draw, posterior) log-densities per pass, each computed over the latent_dim
    coordinates; the draws, the posteriors and the examples are all split as needed, so memory
    stays bounded for any N and K. The encoder's posteriors must have a density at any z
    (diagonal or full-covariance Normal).

    The empirical q(z) includes each draw's own posterior, so I(x; z) is biased low and the
    marginal KL high by about e^I / N; both are bounded by log N. The average KL is unbiased.

    :param progress: show a progress bar over the chunks; ``None``: only on a terminal.
        Without a bar, a line at least every 10 s goes to the logger ``pyro_vae.progress``
        (:func:`progress_bar`).
    """
    vae.validate_data(x)
    check_positive_int("num_particles", num_particles)
    check_positive_int("chunk_size", chunk_size)
    num_data = len(x)
    # Posteriors in blocks of at most chunk_size, each block scored against at most
    # chunk_size // block draws per pass: (particles per pass) x (examples per pass) x block.
    block = min(num_data, chunk_size)
    draws_per_pass = max(1, chunk_size // block)
    examples_per_pass = max(1, min(num_data, draws_per_pass // num_particles))
    particles_per_pass = max(1, min(num_particles, draws_per_pass // examples_per_pass))
    blocks = [vae.encoder(part) for part in x.split(block)]
    if not has_density_everywhere(blocks[0]):
        raise ValueError(
            "kl_decomposition needs posteriors with a density at any z (diagonal or "
            f"full-covariance Normal), not {type(blocks[0]).__name__}"
        )
    prior = vae.prior()
    mutual, marginal = [], []
    starts = range(0, num_data, examples_per_pass)
    for start in progress_bar(starts, "I(x; z)", len(starts), progress):
        own = vae.encoder(x[start : start + examples_per_pass])
        mutual_sum, marginal_sum = torch.zeros(()), torch.zeros(())
        for first in range(0, num_particles, particles_per_pass):
            z = own.sample((min(particles_per_pass, num_particles - first),))  # (S, C, D)
            log_q_own = own.log_prob(z)  # (S, C)
            # log q(z) = log (1/N) Σ_m q(z | x_m): every draw against every example's
            # posterior, a block of them at a time, combined by a running log-sum-exp.
            log_q_sum = torch.logsumexp(blocks[0].log_prob(z.unsqueeze(-2)), dim=-1)
            for posteriors in blocks[1:]:
                log_q_block = torch.logsumexp(posteriors.log_prob(z.unsqueeze(-2)), dim=-1)
                log_q_sum = torch.logaddexp(log_q_sum, log_q_block)
            log_q_aggregate = log_q_sum - math.log(num_data)
            log_p = prior.log_prob(z)
            mutual_sum = mutual_sum + (log_q_own - log_q_aggregate).sum(0)
            marginal_sum = marginal_sum + (log_q_aggregate - log_p).sum(0)
        mutual.append(mutual_sum / num_particles)
        marginal.append(marginal_sum / num_particles)
    mi, mk = torch.cat(mutual), torch.cat(marginal)
    total = mi + mk

    def se(values: Tensor) -> float:
        return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan

    return KLDecomposition(
        float(total.mean()), float(mi.mean()), float(mk.mean()), se(total), se(mi), se(mk)
    )
