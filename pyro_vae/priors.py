"""Priors p(z): modules whose ``forward()`` takes no argument and returns a distribution with
``batch_shape == ()`` and ``event_shape == (latent_dim,)``. The model's data plate broadcasts it
over the examples."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class StandardNormalPrior(nn.Module):
    """The standard normal prior p(z) = N(0, I).

    Its location and scale are buffers, not parameters: nothing here is learnt, and they follow
    the model across ``.to(device)`` and ``.double()``.

    :param int latent_dim: the size of z.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)
