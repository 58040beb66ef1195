"""Plain torch networks. Nothing probabilistic lives here: the distributions are built in
:mod:`pyro_vae.encoders` and :mod:`pyro_vae.likelihoods` from what these networks compute."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import nn


class MLP(nn.Sequential):
    """A multilayer perceptron: ``Linear -> activation`` for each hidden layer, then a final
    ``Linear`` with no activation (its output feeds a distribution's parameters).

    :param int in_dim: input features.
    :param hidden_dims: widths of the hidden layers; empty for a linear map.
    :param int out_dim: output features.
    :param activation: a module class for the hidden non-linearity.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        activation: type[nn.Module] = nn.Softplus,
    ) -> None:
        dims = [in_dim, *hidden_dims]
        layers: list[nn.Module] = []
        for d_in, d_out in pairwise(dims):
            layers += [nn.Linear(d_in, d_out), activation()]
        layers.append(nn.Linear(dims[-1], out_dim))
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim
