"""The pieces :mod:`pyro_vae.infer.gaps` fits and scores q* with: a guide of one Gaussian per
example (:class:`LocalGaussian`), and the model with a Bayesian decoder's weights held at their
posterior mean paired with any guide of z (:class:`FixedWeights`), which the package's
estimators ``elbo`` and ``log_likelihood`` read as they read a VAE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor

from pyro_vae.infer.estimators import VAELike


class FixedWeights:
    """The model with its global latents (a Bayesian decoder's weights) held at their posterior
    mean, paired with a guide of z: the :class:`VAELike` that ``elbo`` and ``log_likelihood``
    read, so that every ELBO and bound of :mod:`pyro_vae.infer.gaps` is of one p(x, z)."""

    weight_guide = None

    def __init__(self, vae: VAELike, guide: Callable[..., Any]) -> None:
        self._vae = vae
        means = vae.weight_means() if vae.weight_guide is not None else {}
        self.model: Callable[..., Any] = (
            poutine.condition(vae.model, data=means) if means else vae.model
        )
        self.guide: Callable[..., Any] = poutine.condition(guide, data=means) if means else guide
        self.prior, self.encoder, self.likelihood = vae.prior, vae.encoder, vae.likelihood

    def weight_means(self) -> dict[str, Tensor]:
        return {}

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._vae.encode(x)

    def decode(self, z: Tensor, weights: str = "mean") -> Tensor:
        return self._vae.decode(z, "mean")

    def validate_data(
        self, x: object, what: str = "data", *, probabilities: bool = False
    ) -> Tensor:
        return self._vae.validate_data(x, what, probabilities=probabilities)


class LocalGaussian:
    """A guide with the model's signature: q(z_n) = N(m_n, L_n L_nᵀ) for each of ``examples``,
    at the model's latent site and plate (``names``), its parameters from ``params()``:
    ``(loc (n, D), scale (n, D))`` or, for the full family, ``(loc, scale_tril (n, D, D))``.

    It is also called on copies of the examples stacked, ``examples.repeat(k, 1)``: the layout
    in which ``elbo`` and ``log_likelihood`` draw k particles at once, each copy drawing its
    own z. Rows in any other order are refused, so no example is ever scored under another's
    q*.

    With ``sticking=True`` (for fitting), the site is the same draw z = m + L ε, but as a Delta
    whose log-density is log q(z) with q's parameters detached: Trace_ELBO then computes the
    same ELBO, with the "sticking the landing" gradient (Roeder, Wu & Duvenaud 2017), the
    pathwise part alone. Its noise vanishes where q matches the posterior, so a few hundred
    steps reach the optimum instead of wandering around it at the step size's scale. An even
    number of copies then draws in antithetic pairs (ε and −ε)."""

    def __init__(
        self,
        examples: Tensor,
        params: Callable[[], tuple[Tensor, Tensor]],
        full: bool,
        names: tuple[str, str],
        sticking: bool = False,
    ) -> None:
        self.examples, self.params, self.full, self.sticking = examples, params, full, sticking
        self.site, self.plate = names
        # The rows last found to be copies of the examples, and their version then: SVI calls
        # the guide on one tensor at every step, compared once (until it is written to).
        self._checked: tuple[Tensor, int] | None = None

    def __call__(self, x: Tensor, num_data: int | None = None) -> Tensor:
        copies, rest = divmod(len(x), len(self.examples))
        if self._checked is None or self._checked[0] is not x or self._checked[1] != x._version:
            # Each copy compared with the examples in place (no stacked copy of them is made).
            if rest or not all(
                torch.equal(block, self.examples) for block in x.split(len(self.examples))
            ):
                raise RuntimeError("a local guide was called on rows other than its examples")
            self._checked = (x, x._version)
        loc, scale = self.params()
        loc, scale = loc.repeat(copies, 1), scale.repeat(copies, *(1,) * (scale.dim() - 1))
        q = gaussian(loc, scale)
        # The model's own site and plate, of the same size: Trace_ELBO pairs the two sites.
        with pyro.plate(self.plate, size=len(x) if num_data is None else num_data, subsample=x):
            if not self.sticking:
                return pyro.sample(self.site, q)
            z = q.rsample()
            if copies % 2 == 0:
                # Antithetic pairs: the second half of the copies draws −ε where the first drew
                # ε. Each draw is still from q; the pair's noise cancels where log p(x, z) is
                # locally quadratic in z, in the gradient of the mean.
                half = len(z) // 2
                z = torch.cat([z[:half], 2 * loc[:half] - z[:half]])
            frozen = gaussian(loc.detach(), scale.detach())
            delta = dist.Delta(z, log_density=frozen.log_prob(z), event_dim=1)
            return pyro.sample(self.site, delta)


def gaussian(loc: Tensor, scale: Tensor) -> dist.TorchDistribution:
    """N(loc, diag scale²) for a scale ``(n, D)``, N(loc, scale scaleᵀ) for a Cholesky factor
    ``(n, D, D)``."""
    if scale.dim() == loc.dim() + 1:
        return dist.MultivariateNormal(loc, scale_tril=scale)
    return dist.Normal(loc, scale).to_event(1)
