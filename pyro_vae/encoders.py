"""Amortized guides q(z | x): modules whose ``forward(x)`` maps a batch ``(B, data_dim)`` to a
reparameterized distribution with ``batch_shape == (B,)`` and ``event_shape == (latent_dim,)``.

The encoder's *weights* are what training learns. The mean μ(x) and standard deviation σ(x) of
q(z | x) are its *outputs*: a different pair for every example x."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_vae.networks import MLP


class DiagonalNormalEncoder(nn.Module):
    """q(z | x) = N(μ(x), diag σ(x)²), μ and σ computed by one MLP with two output heads.

    σ(x) = softplus(raw) + ``min_scale``: softplus rather than exp so that a large raw output
    cannot overflow, and a floor so that σ cannot underflow to zero (log q would be infinite).

    :param int data_dim: the size of x.
    :param int latent_dim: the size of z.
    :param hidden_dims: the MLP's hidden widths.
    :param float min_scale: the smallest σ the encoder can output.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.min_scale = min_scale
        self.net = MLP(data_dim, hidden_dims, 2 * latent_dim)

    def forward(self, x: Tensor) -> dist.TorchDistribution:
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + self.min_scale
        return dist.Normal(loc, scale).to_event(1)
