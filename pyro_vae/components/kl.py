"""Closed-form KL divergences that torch lacks, registered with ``torch.distributions`` (which
Pyro's ``TraceMeanField_ELBO`` consults) when this module is imported. Whether a VAE's KL is
closed form: :func:`~pyro_vae.models.vae.has_closed_form_kl`.

Registered here:

- KL(N(μ, Σ) ‖ N(m, diag s²)): a full-covariance Normal posterior against a diagonal Normal
  prior (``FullCovarianceNormalEncoder`` with the standard or a learnable diagonal prior).

Each is tested against a Monte-Carlo estimate (tests/components/test_kl.py).
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Independent, MultivariateNormal, Normal
from torch.distributions.kl import register_kl


@register_kl(MultivariateNormal, Independent)
def _kl_full_covariance_normal_diagonal_normal(q: MultivariateNormal, p: Independent) -> Tensor:
    """½ [tr(S⁻¹Σ) + (m − μ)ᵀ S⁻¹ (m − μ) − D + log det S − log det Σ], S = diag s²."""
    if not (isinstance(p.base_dist, Normal) and p.reinterpreted_batch_ndims == 1):
        # NotImplementedError is what kl_divergence raises for an unregistered pair, and what
        # TraceMeanField_ELBO takes as its cue to fall back to Monte Carlo.
        raise NotImplementedError
    prior_variance = p.base_dist.scale.pow(2)
    posterior_variance = q.scale_tril.pow(2).sum(-1)  # diag(L Lᵀ)_i = Σ_j L_ij²
    trace = (posterior_variance / prior_variance).sum(-1)
    mahalanobis = ((p.base_dist.loc - q.loc).pow(2) / prior_variance).sum(-1)
    log_det_prior = prior_variance.log().sum(-1)
    log_det_posterior = 2 * q.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    dim = q.event_shape[-1]
    return 0.5 * (trace + mahalanobis - dim + log_det_prior - log_det_posterior)
