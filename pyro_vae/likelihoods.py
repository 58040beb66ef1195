"""Observation models p(x | z): modules whose ``forward(params)`` turns the decoder's output
``(B, ...)`` into a distribution with ``batch_shape == (B,)`` and ``event_shape == (data_dim,)``.

A likelihood states what data it accepts through its distribution's ``support``; the VAE checks
data against it before any training or evaluation starts."""

from __future__ import annotations

import pyro.distributions as dist
from torch import Tensor, nn


class BernoulliLikelihood(nn.Module):
    """p(x | z) = Π_d Bernoulli(x_d; sigmoid(logits_d)), for binary data.

    Grayscale values are not binary: binarize them (``pyro_vae.binarize``, or ``fit``'s dynamic
    binarization) rather than hiding the mismatch with ``validate_args=False``.
    """

    def forward(self, logits: Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=logits).to_event(1)


class NormalLikelihood(nn.Module):
    """p(x | z) = Π_d N(x_d; loc_d, scale²) with a fixed, shared observation scale.

    With a linear decoder this is probabilistic PCA, whose log p(x) has a closed form.

    :param float scale: the observation noise standard deviation, > 0.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"NormalLikelihood: scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, loc: Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, self.scale).to_event(1)
