"""What the code asks of a torch distribution: its family for messages, and whether it is a
diagonal Normal or has a density at any point. Plain torch, shared by the components, the
estimators and the training core."""

from __future__ import annotations

import torch


def is_diagonal_normal(d: torch.distributions.Distribution) -> bool:
    """Whether ``d`` is a Normal over a vector with independent coordinates."""
    return (
        isinstance(d, torch.distributions.Independent)
        and isinstance(d.base_dist, torch.distributions.Normal)
        and d.reinterpreted_batch_ndims == 1
    )


def has_density_everywhere(d: torch.distributions.Distribution) -> bool:
    """Whether ``d`` has a closed-form density at any point (diagonal or full-covariance
    Normal), as a mixture of posteriors (VampPrior) or an aggregate posterior needs. A Delta
    has none, and a flow's needs an inversion per point."""
    return is_diagonal_normal(d) or isinstance(d, torch.distributions.MultivariateNormal)


def describe(d: torch.distributions.Distribution) -> str:
    """A distribution's family for messages: ``Normal (independent)``, ``MultivariateNormal``."""
    if isinstance(d, torch.distributions.Independent):
        return f"{describe(d.base_dist)} (independent)"
    return type(d).__name__
