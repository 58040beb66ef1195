"""Distributions that Pyro and torch lack. Each is a Pyro ``TorchDistribution`` with a proper,
normalized ``log_prob``, a ``support`` the VAE checks data against, and an exact ``mean``."""

from __future__ import annotations

from typing import ClassVar, TypeAlias

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F

# Defined with the other plain-torch helpers, where the training core reads them too.
from pyro_vae._distributions import describe as describe
from pyro_vae._distributions import has_density_everywhere as has_density_everywhere
from pyro_vae._distributions import is_diagonal_normal as is_diagonal_normal

# What torch's Distribution.expand and .sample accept as a shape.
_Shape: TypeAlias = "torch.Size | list[int] | tuple[int, ...]"


class _Grid(constraints.Constraint):
    """Values k / (num_levels − 1) for k = 0 … num_levels − 1 (within float rounding)."""

    is_discrete = True
    event_dim = 0

    def __init__(self, num_levels: int) -> None:
        self.num_levels = num_levels
        super().__init__()

    def check(self, value: Tensor) -> Tensor:
        scaled = value * (self.num_levels - 1)
        # 1e-3 of a bin: float32 pixels k / 255 come back within about 1e-5 of k.
        return (value >= 0) & (value <= 1) & ((scaled - scaled.round()).abs() < 1e-3)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_levels={self.num_levels})"


class DiscretizedLogistic(TorchDistribution):
    """A logistic distribution binned onto the grid {0, 1/(n−1), …, 1} of ``n = num_levels``
    pixel levels (Salimans et al. 2017, PixelCNN++): bin k gets the logistic mass between its
    midpoints with its neighbours, and the two end bins also get the tails beyond 0 and 1, so
    the probabilities of the n levels sum to one exactly.

    :param loc: the logistic's location (any real; values near [0, 1] are useful).
    :param scale: the logistic's scale, > 0.
    :param int num_levels: the number of pixel levels (256 for 8-bit images).
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    has_rsample = False

    def __init__(
        self, loc: Tensor, scale: Tensor, num_levels: int = 256, validate_args: bool | None = None
    ) -> None:
        if num_levels < 2:
            raise ValueError(f"num_levels must be at least 2, got {num_levels}")
        self.loc, self.scale = broadcast_all(loc, scale)
        self.num_levels = int(num_levels)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self) -> constraints.Constraint:
        return _Grid(self.num_levels)

    def expand(
        self, batch_shape: _Shape, _instance: DiscretizedLogistic | None = None
    ) -> DiscretizedLogistic:
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.num_levels = self.num_levels
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        last = self.num_levels - 1
        # Snap to the grid, so that float rounding in the data cannot move a value off its bin.
        level = (value * last).round().clamp(0, last)
        half_bin = 0.5 / last
        centred = level / last - self.loc
        upper = (centred + half_bin) / self.scale
        lower = (centred - half_bin) / self.scale
        # log(σ(u) − σ(l)) = log σ(u) + log σ(−l) + log(1 − exp(−(u − l))), stable for any u, l.
        width = 1.0 / (last * self.scale)  # u − l
        interior = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(-width))
        first = F.logsigmoid(upper)  # all mass below the first midpoint
        final = F.logsigmoid(-lower)  # all mass above the last midpoint
        return torch.where(level == 0, first, torch.where(level == last, final, interior))

    def _levels(self) -> Tensor:
        """The values k / (num_levels − 1), ``(num_levels,)``."""
        return torch.linspace(0, 1, self.num_levels, dtype=self.loc.dtype, device=self.loc.device)

    def _level_probs(self) -> Tensor:
        """P(level k) for every k: ``batch_shape + (num_levels,)``."""
        grid = self._levels().expand(*self.batch_shape, self.num_levels)
        expanded = DiscretizedLogistic(
            self.loc.unsqueeze(-1), self.scale.unsqueeze(-1), self.num_levels, validate_args=False
        )
        return expanded.log_prob(grid).exp()

    @property
    def mean(self) -> Tensor:
        return (self._level_probs() * self._levels()).sum(-1)

    @property
    def variance(self) -> Tensor:
        levels = self._levels()
        probs = self._level_probs()
        return (probs * levels.pow(2)).sum(-1) - (probs * levels).sum(-1).pow(2)

    @torch.no_grad()
    def sample(self, sample_shape: _Shape = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
        continuous = self.loc + self.scale * (u.log() - (-u).log1p())
        last = self.num_levels - 1
        return (continuous * last).round().clamp(0, last) / last
