"""What is measured of a trained conditional VAE (:mod:`pyro_vae.models.cvae`) and its
baseline: the importance-weighted log p(x | c), the terms of the conditional ELBO, the spread of
the completions of one condition, and the completions drawn in the quadrant task's figure
(:func:`~pyro_vae.plots.plot_completions`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyro_vae._checks import check_positive_int
from pyro_vae.components.networks import check_image_shape
from pyro_vae.infer.estimators import progress_bar
from pyro_vae.models import contract
from pyro_vae.models.cvae import ConditionalBaseline, ConditionalVAE
from pyro_vae.models.masks import check_mask, merge_by_mask, split_by_mask


def _log_weights(module: ConditionalVAE | ConditionalBaseline, x: Tensor, c: Tensor) -> Tensor:
    """log p(x, z | c) − log q(z | x, c) per row, one z ~ q per row, read off a trace of the
    guide replayed into the model: the importance weights of RenyiELBO / IWAE, from the
    unscaled log-densities (neither β nor a minibatch scale belongs in log p(x | c))."""
    guide_trace = poutine.trace(module.guide).get_trace(x, c)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(x, c)
    log_weight = x.new_zeros(x.shape[0])
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace = prune_subsample_sites(trace)
        trace.compute_log_prob()
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if not site["cond_indep_stack"]:
                raise ValueError(
                    f"site {name!r} is outside the data plate (a global latent): "
                    "conditional_log_likelihood integrates over per-example latents only"
                )
            log_weight = log_weight + sign * site["unscaled_log_prob"]
    return log_weight


@torch.no_grad()
def conditional_log_likelihood(
    module: ConditionalVAE | ConditionalBaseline,
    x: Tensor,
    c: Tensor,
    num_particles: int = 1000,
    chunk_size: int = 4096,
    progress: bool | None = None,
) -> Tensor:
    """Per-example importance-weighted estimate of log p(x | c) in nats, ``(N,)``:

        log (1/K) Σ_k p(x | z_k, c) p(z_k | c) / q(z_k | x, c),   z_k ~ q(z | x, c),

    ``K = num_particles`` (Burda et al.'s bound, conditioned on c: the one Pyro's
    ``RenyiELBO(alpha=0, num_particles=K)`` trains). Its exponential is an unbiased estimate
    of p(x | c); the log is a lower bound in expectation that tends to log p(x | c) as K
    grows. For :class:`ConditionalBaseline`, which has no latent, every weight is
    log p(x | c) itself, exact for any K (pass ``num_particles=1``).

    Work is done in chunks of at most ``chunk_size`` (example, particle) rows per forward
    pass, combined with a running log-sum-exp, so memory stays bounded for any K and the
    chunk size does not change the value.

    :param x: the part to predict ``(N, data_dim)``, in the likelihood's support (binarized,
        for a Bernoulli likelihood).
    :param c: the condition ``(N, condition_dim)``.
    :param progress: show a progress bar over the chunks; ``None``: only on a terminal.
        Without a bar, a line at least every 10 s goes to the logger ``pyro_vae.progress``
        (:func:`~pyro_vae.infer.estimators.progress_bar`).
    """
    _check_module(module)
    x = module.validate_data(x, "x")
    c = module.validate_condition(c, x.shape[0])
    check_positive_int("num_particles", num_particles)
    check_positive_int("chunk_size", chunk_size)
    examples_per_chunk = max(1, min(len(x), chunk_size))
    particles_per_chunk = max(1, chunk_size // examples_per_chunk)
    # The chunks are made as they are needed, not listed up front: a list would hold one entry
    # per pass, unbounded in K.
    chunks = (
        (start_row, min(particles_per_chunk, num_particles - start))
        for start_row in range(0, len(x), examples_per_chunk)
        for start in range(0, num_particles, particles_per_chunk)
    )
    num_chunks = math.ceil(len(x) / examples_per_chunk) * math.ceil(
        num_particles / particles_per_chunk
    )
    results: list[Tensor] = []
    running: Tensor | None = None
    done = 0
    # Off a terminal, where no bar shows, a progress line at least every 10 s, as log p(x)'s.
    for start_row, count in progress_bar(chunks, "log p(x|c)", num_chunks, progress):
        rows = slice(start_row, start_row + examples_per_chunk)
        xb, cb = x[rows], c[rows]
        # One pass over `count` copies of the batch: row k * n + i is particle k of example i.
        log_weights = _log_weights(module, xb.repeat(count, 1), cb.repeat(count, 1))
        chunk_lse = torch.logsumexp(log_weights.reshape(count, len(xb)), dim=0)
        # A new batch of examples starts at its first chunk of particles.
        running = chunk_lse if running is None or done == 0 else torch.logaddexp(running, chunk_lse)
        done += count
        if done == num_particles:
            results.append(running - math.log(num_particles))
            done = 0
    return torch.cat(results)


class ConditionalELBOTerms(NamedTuple):
    """Per-example terms of the conditional ELBO, in nats, ``(N,)`` each, from one draw
    z ~ q(z | x, c) per example: ``reconstruction`` log p(x | z, c), ``kl`` the Monte-Carlo
    estimate log q(z | x, c) − log p(z | c) of KL(q(z | x, c) ‖ p(z | c)) (0 for the baseline,
    which has no latent). ``elbo`` is their difference, the K=1 case of
    :func:`conditional_log_likelihood`: a lower bound on log p(x | c) in expectation."""

    reconstruction: Tensor
    kl: Tensor

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl


@torch.no_grad()
def conditional_elbo_terms(
    module: ConditionalVAE | ConditionalBaseline, x: Tensor, c: Tensor, chunk_size: int = 4096
) -> ConditionalELBOTerms:
    """The :class:`ConditionalELBOTerms` of ``x`` given ``c``, read off the log-densities of a
    guide trace replayed into the model (unscaled: neither β nor a minibatch scale), in chunks
    of ``chunk_size`` examples: cheap enough to watch each epoch, where
    :func:`conditional_log_likelihood` with many particles is the final score."""
    _check_module(module)
    x = module.validate_data(x, "x")
    c = module.validate_condition(c, x.shape[0])
    check_positive_int("chunk_size", chunk_size)
    reconstruction, kl = [], []
    for xb, cb in zip(x.split(chunk_size), c.split(chunk_size), strict=True):
        guide_trace = prune_subsample_sites(poutine.trace(module.guide).get_trace(xb, cb))
        model_trace = prune_subsample_sites(
            poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(xb, cb)
        )
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        observed = xb.new_zeros(len(xb))
        divergence = xb.new_zeros(len(xb))
        for site in model_trace.nodes.values():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                observed = observed + site["unscaled_log_prob"]
            else:
                divergence = divergence - site["unscaled_log_prob"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                divergence = divergence + site["unscaled_log_prob"]
        reconstruction.append(observed)
        kl.append(divergence)
    return ConditionalELBOTerms(torch.cat(reconstruction), torch.cat(kl))


@torch.no_grad()
def sample_spread(cvae: ConditionalVAE, c: Tensor, num_particles: int = 100) -> Tensor:
    """How much the CVAE's completions vary for one condition: the standard deviation over
    ``num_particles`` draws z ~ p(z | c) of the likelihood's mean, averaged over the predicted
    features, ``(B,)``. 0 would mean a deterministic map, like the baseline's."""
    if check_positive_int("num_particles", num_particles) < 2:
        raise ValueError("sample_spread needs num_particles >= 2 for a standard deviation")
    return cvae.sample(c, num_particles).std(0).mean(-1)


# ---------------------------------------------------------------------------- the figure's data


class Completions(NamedTuple):
    """The rows of the completion figure, each a batch of flattened images ``(B, D)``
    (``samples``: ``(num_completions, B, D)``). The predicted rows keep the given pixels and fill
    in the missing ones, as Pyro's example does; ``inputs`` has NaN where pixels are missing."""

    inputs: Tensor
    truth: Tensor
    baseline: Tensor
    samples: Tensor
    mask: Tensor
    image_shape: tuple[int, int, int]


@torch.no_grad()
def completions(
    cvae: ConditionalVAE,
    baseline: ConditionalBaseline,
    images: Tensor,
    mask: Tensor,
    image_shape: Sequence[int],
    num_completions: int = 5,
) -> Completions:
    """The figure's data for ``images`` ``(B, D)``: inputs (given pixels only), ground truth,
    the baseline's prediction and ``num_completions`` CVAE completions of each, one draw
    z ~ p(z | c) apiece."""
    shape = check_image_shape(image_shape)
    images = contract.check_form(images, "images", math.prod(shape))
    mask = check_mask(mask, images.shape[1]).to(images.device)
    x, c = split_by_mask(images, mask)
    if cvae.data_dim != x.shape[1] or cvae.condition_dim != c.shape[1]:
        raise ValueError(
            f"the mask splits images into {x.shape[1]} missing and {c.shape[1]} given pixels; "
            f"the CVAE predicts {cvae.data_dim} from {cvae.condition_dim}"
        )
    if baseline.data_dim != x.shape[1] or baseline.condition_dim != c.shape[1]:
        raise ValueError(
            f"the mask splits images into {x.shape[1]} missing and {c.shape[1]} given pixels; "
            f"the baseline predicts {baseline.data_dim} from {baseline.condition_dim}"
        )
    inputs = merge_by_mask(torch.full_like(x, math.nan), c, mask)
    return Completions(
        inputs=inputs,
        truth=images,
        baseline=merge_by_mask(baseline.predict(c), c, mask),
        samples=merge_by_mask(cvae.sample(c, num_completions), c, mask),
        mask=mask,
        image_shape=shape,
    )


def _check_module(module: object) -> None:
    if not isinstance(module, (ConditionalVAE, ConditionalBaseline)):
        raise ValueError(
            f"module must be a ConditionalVAE or ConditionalBaseline, got {type(module).__name__}"
        )
