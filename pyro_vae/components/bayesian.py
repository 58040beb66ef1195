"""A Bayesian decoder: an MLP whose weights and biases are global latent variables with a
Normal(0, prior_scale) prior, and the mean-field Normal guide over them.

In the model, ``decoder(z)`` samples every weight once per step (the VAE calls it outside the
data plate, so the weights are shared by all examples and their log-densities are not scaled
by N/B). In the guide, ``decoder.guide()`` samples the same sites from
q(w) = Normal(loc, scale), one independent Normal per weight. :class:`~pyro_vae.models.vae.VAE`
calls that guide from its own, so ``fit`` and a user's ``SVI(vae.model, vae.guide, ...)``
train the weight posterior with no extra code.

Site names are ``"decoder.{layer}.weight"`` and ``"decoder.{layer}.bias"`` (the prefix is
``site_prefix``): they do not depend on which VAE instance holds the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_vae._checks import check_positive_float, check_positive_int


class BayesianMLP(nn.Module):
    """An MLP decoder with a weight prior and a mean-field Normal weight posterior.

    :param int in_dim: input features (the latent size).
    :param hidden_dims: hidden widths.
    :param int out_dim: output features (the likelihood's parameters).
    :param float prior_scale: the prior's standard deviation for every weight and bias.
    :param float init_scale: the guide's starting standard deviation for every weight. It
        starts narrow: the guide's means start where an ordinary network's weights do, and a
        wide posterior would drown that network in weight noise before the encoder and the
        means have learned anything. The KL term then widens it as far as the data allow.
    :param activation: the hidden non-linearity.
    :param str site_prefix: the first part of every weight site's name.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        *,
        prior_scale: float = 1.0,
        init_scale: float = 0.01,
        activation: type[nn.Module] = nn.Softplus,
        site_prefix: str = "decoder",
    ) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        check_positive_int("out_dim", out_dim)
        for width in hidden_dims:
            check_positive_int("hidden_dims entries", width)
        self.prior_scale = check_positive_float("prior_scale", prior_scale)
        check_positive_float("init_scale", init_scale)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.activation = activation()
        self.site_prefix = site_prefix
        self.locs = nn.ParameterDict()
        self.raw_scales = nn.ParameterDict()
        raw_init = math.log(math.expm1(init_scale))  # softplus(raw_init) == init_scale
        for layer, (d_in, d_out) in enumerate(pairwise([in_dim, *hidden_dims, out_dim])):
            # The means start as torch initializes an ordinary linear layer.
            linear = nn.Linear(d_in, d_out)
            for kind in ("weight", "bias"):
                value = getattr(linear, kind).detach()
                self.locs[f"{layer}_{kind}"] = nn.Parameter(value.clone())
                self.raw_scales[f"{layer}_{kind}"] = nn.Parameter(torch.full_like(value, raw_init))
        self.num_layers = len(hidden_dims) + 1

    def site_names(self) -> list[str]:
        """The names of the weight sites, in the order they are sampled."""
        return [
            f"{self.site_prefix}.{layer}.{kind}"
            for layer in range(self.num_layers)
            for kind in ("weight", "bias")
        ]

    def _sites(self) -> list[tuple[str, str]]:
        return list(zip(self.site_names(), self.locs.keys(), strict=True))

    def forward(self, z: Tensor) -> Tensor:
        """Sample the weights from their prior (or, under Pyro's replay, take the guide's
        draw) and apply the network to ``z`` ``(B, in_dim)``."""
        weights = {}
        for site, key in self._sites():
            loc = self.locs[key]
            prior = dist.Normal(loc.new_zeros(()), self.prior_scale).expand(loc.shape)
            weights[key] = pyro.sample(site, prior.to_event(loc.dim()))
        h = z
        for layer in range(self.num_layers):
            h = F.linear(h, weights[f"{layer}_weight"], weights[f"{layer}_bias"])
            if layer < self.num_layers - 1:
                h = self.activation(h)
        return h

    def posterior(self, key: str) -> dist.Normal:
        """q(w) of one weight tensor (``"0_weight"``, ``"0_bias"``, ...), elementwise."""
        return dist.Normal(self.locs[key], F.softplus(self.raw_scales[key]))

    def guide(self) -> None:
        """The mean-field Normal guide over every weight site."""
        for site, key in self._sites():
            pyro.sample(site, self.posterior(key).to_event(self.locs[key].dim()))
