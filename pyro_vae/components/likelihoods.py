"""Observation models p(x | z): modules whose ``forward(params)`` turns the decoder's output
``(B, data_dim)`` (one value per feature) into a distribution with ``batch_shape == (B,)`` and
``event_shape == (data_dim,)``. A scale, where a likelihood has one, is the likelihood's own
(fixed, or a learned parameter), not a decoder output.

A likelihood states what data it accepts through its distribution's ``support``; the VAE checks
data against it before any training or evaluation starts. A likelihood of binary data also says
so with ``binary_data = True`` (a class attribute; absent means ``False``): ``fit`` then
binarizes grayscale data dynamically, a fresh draw for every batch.

Which to use: binary data → Bernoulli; grayscale in [0, 1] → continuous Bernoulli, or Bernoulli
with dynamic binarization; 8-bit pixel levels → discretized logistic (a proper probability for
each of the 256 levels, so its log-likelihoods are comparable with those of discrete models);
real values → Normal or Laplace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_vae._checks import check_positive_float, check_positive_int
from pyro_vae.components.distributions import DiscretizedLogistic


class BernoulliLikelihood(nn.Module):
    """p(x | z) = Π_d Bernoulli(x_d; sigmoid(logits_d)), for binary data.

    Grayscale values are not binary: binarize them (``pyro_vae.binarize``, or ``fit``'s dynamic
    binarization) rather than hiding the mismatch with ``validate_args=False``.
    """

    binary_data: ClassVar[bool] = True
    """Its data are 0 or 1: ``fit`` binarizes grayscale data for it, afresh for every batch."""

    def forward(self, logits: Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=logits).to_event(1)


class ContinuousBernoulliLikelihood(nn.Module):
    """p(x | z) = Π_d CB(x_d; sigmoid(logits_d)): the continuous Bernoulli (Loaiza-Ganem &
    Cunningham 2019), a normalized density on [0, 1] for grayscale values. Unlike a Bernoulli
    applied to grayscale pixels, its log-likelihood is a proper log-density.

    Its mean is not sigmoid(logits): ``VAE.reconstruct`` and ``VAE.sample`` use the true mean.
    """

    def forward(self, logits: Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(1)


# softplus(raw) + _MIN_SCALE: the floor keeps a learned scale from collapsing onto features that
# never vary (image borders), where the density, and so the ELBO, would grow without bound.
_MIN_SCALE = 1e-3


def _learned_scale(name: str, scale: float, data_dim: int | None) -> nn.Parameter:
    """The unconstrained parameter of a learned scale starting at ``scale``: one shared, or one
    per feature when ``data_dim`` is given. :func:`_positive` maps it back."""
    check_positive_float(f"{name}: scale", scale)
    if scale <= _MIN_SCALE:
        raise ValueError(f"{name}: a learned scale must start above {_MIN_SCALE}")
    shape = () if data_dim is None else (check_positive_int("data_dim", data_dim),)
    raw = torch.log(torch.expm1(torch.tensor(scale - _MIN_SCALE)))  # softplus⁻¹
    return nn.Parameter(raw.expand(shape).clone())


def _positive(raw_scale: Tensor) -> Tensor:
    return F.softplus(raw_scale) + _MIN_SCALE


class _LocationScaleLikelihood(nn.Module):
    """p(x | z) = Π_d family(x_d; loc_d, scale); the scale fixed or learned."""

    # The distribution's class, called as family(loc, scale).
    family: Callable[[Tensor, Tensor], dist.TorchDistribution]
    # A buffer when the scale is fixed; declared for type checkers, since nn.Module's attribute
    # lookup returns Tensor | Module.
    fixed_scale: Tensor

    def __init__(
        self, scale: float = 1.0, *, learn_scale: bool = False, data_dim: int | None = None
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive_float(f"{name}: scale", scale)
        self.learn_scale = bool(learn_scale)
        if data_dim is not None and not self.learn_scale:
            raise ValueError(
                f"{name}: data_dim is for a learned per-feature scale; pass learn_scale=True "
                "as well"
            )
        if self.learn_scale:
            self.raw_scale = _learned_scale(name, scale, data_dim)
        else:
            self.register_buffer("fixed_scale", torch.tensor(float(scale)))

    @property
    def scale(self) -> Tensor:
        """The observation scale: ``()`` when shared, ``(data_dim,)`` per feature."""
        return _positive(self.raw_scale) if self.learn_scale else self.fixed_scale

    def forward(self, loc: Tensor) -> dist.TorchDistribution:
        return self.family(loc, self.scale.expand(loc.shape)).to_event(1)


class NormalLikelihood(_LocationScaleLikelihood):
    """p(x | z) = Π_d N(x_d; loc_d, scale²), for real-valued data.

    With a linear decoder and a fixed scale this is probabilistic PCA, whose log p(x) has a
    closed form.

    :param float scale: the observation standard deviation (the starting value when learned).
    :param bool learn_scale: learn the scale with the rest of the model.
    :param int data_dim: with ``learn_scale``, one scale per feature; ``None``: one shared.
    """

    family = dist.Normal


class LaplaceLikelihood(_LocationScaleLikelihood):
    """p(x | z) = Π_d Laplace(x_d; loc_d, scale): heavier tails than the Normal, so a few badly
    reconstructed features cost less. Arguments as :class:`NormalLikelihood`."""

    family = dist.Laplace


class DiscretizedLogisticLikelihood(nn.Module):
    """p(x | z) = Π_d DiscretizedLogistic(x_d; loc_d, scale_d, num_levels): a proper probability
    for each of ``num_levels`` pixel levels k / (num_levels − 1) (data in [0, 1] on that grid, such
    as 8-bit images divided by 255), with a learned scale.

    :param int num_levels: the number of pixel levels: 256 for 8-bit images, 17 for the digits.
    :param float scale: the starting scale.
    :param int data_dim: one learned scale per feature; ``None``: one shared scale.
    """

    def __init__(self, num_levels: int = 256, scale: float = 0.1, data_dim: int | None = None):
        super().__init__()
        self.num_levels = check_positive_int("num_levels", num_levels)
        if num_levels < 2:
            raise ValueError(f"num_levels must be at least 2, got {num_levels}")
        self.raw_scale = _learned_scale(type(self).__name__, scale, data_dim)

    @property
    def scale(self) -> Tensor:
        return _positive(self.raw_scale)

    def forward(self, loc: Tensor) -> dist.TorchDistribution:
        return DiscretizedLogistic(loc, self.scale.expand(loc.shape), self.num_levels).to_event(1)
