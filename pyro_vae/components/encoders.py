"""Amortized guides q(z | x): modules whose ``forward(x)`` maps a batch ``(B, data_dim)`` to a
reparameterized distribution with ``batch_shape == (B,)`` and ``event_shape == (latent_dim,)``.

The encoder's *weights* are what training learns. The mean μ(x) and standard deviation σ(x) of
q(z | x) are its *outputs*: a different pair for every example x.

Every encoder reads x through one network (``.net``): an MLP with ``hidden_dims``, or a small
convolutional network when ``image_shape`` is given. Only the read-out of its outputs differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_vae._checks import check_positive_int
from pyro_vae.components.networks import DEFAULT_HIDDEN_DIMS, feature_network, output_layer


def _positive_scale(raw: Tensor, min_scale: float) -> Tensor:
    # softplus rather than exp, so that a large raw output cannot overflow; a floor, so that a
    # scale cannot underflow to zero (log q would be infinite).
    return F.softplus(raw) + min_scale


class _NetworkEncoder(nn.Module):
    """What every encoder here shares: x read through one network with ``num_outputs``
    outputs, and the floor on its scales."""

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        num_outputs: int,
        hidden_dims: Sequence[int],
        image_shape: Sequence[int] | None,
        min_scale: float,
    ) -> None:
        super().__init__()
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.min_scale = min_scale
        self.net = feature_network(data_dim, num_outputs, hidden_dims, image_shape)


class DiagonalNormalEncoder(_NetworkEncoder):
    """q(z | x) = N(μ(x), diag σ(x)²); μ and σ are the two halves of one network's output.

    σ(x) = softplus(raw) + ``min_scale``.

    :param int data_dim: the size of x.
    :param int latent_dim: the size of z.
    :param hidden_dims: the MLP's hidden widths.
    :param image_shape: ``(height, width)`` or ``(channels, height, width)``: read x with a
        convolutional network instead of the MLP.
    :param float min_scale: the smallest σ the encoder can output.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        *,
        image_shape: Sequence[int] | None = None,
        min_scale: float = 1e-4,
    ) -> None:
        check_positive_int("latent_dim", latent_dim)
        super().__init__(data_dim, latent_dim, 2 * latent_dim, hidden_dims, image_shape, min_scale)

    def forward(self, x: Tensor) -> dist.TorchDistribution:
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return dist.Normal(loc, _positive_scale(raw_scale, self.min_scale)).to_event(1)


class FullCovarianceNormalEncoder(_NetworkEncoder):
    """q(z | x) = N(μ(x), L(x) L(x)ᵀ): a full covariance through its Cholesky factor L(x),
    a lower-triangular matrix with a positive diagonal (softplus + ``min_scale``) and free
    entries below it, all outputs of the network.

    Against a diagonal Normal prior, the KL is closed form (registered in
    :mod:`pyro_vae.components.kl`), so ``TraceMeanField_ELBO`` uses it.

    Arguments as :class:`DiagonalNormalEncoder`.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        *,
        image_shape: Sequence[int] | None = None,
        min_scale: float = 1e-4,
    ) -> None:
        check_positive_int("latent_dim", latent_dim)
        num_off_diagonal = latent_dim * (latent_dim - 1) // 2
        super().__init__(
            data_dim,
            latent_dim,
            2 * latent_dim + num_off_diagonal,
            hidden_dims,
            image_shape,
            min_scale,
        )
        # The entries below the diagonal start at zero, so that training starts from the same
        # posterior as the diagonal encoder's; with a default init they start around ±0.5 and
        # the last of d latents would begin with a variance near 1 + d/6.
        with torch.no_grad():
            read_out = output_layer(self.net)
            read_out.weight[2 * latent_dim :].zero_()
            read_out.bias[2 * latent_dim :].zero_()
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, x: Tensor) -> dist.TorchDistribution:
        d = self.latent_dim
        out = self.net(x)
        loc, raw_diagonal, below = out[..., :d], out[..., d : 2 * d], out[..., 2 * d :]
        strictly_lower = out.new_zeros(*out.shape[:-1], d, d)
        strictly_lower[..., self.rows, self.cols] = below  # autograd tracks this write
        scale_tril = strictly_lower + torch.diag_embed(
            _positive_scale(raw_diagonal, self.min_scale)
        )
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)


class IAFEncoder(_NetworkEncoder):
    """A normalizing-flow posterior (Kingma et al. 2016): z₀ ~ N(μ(x), diag σ(x)²), then
    ``flow_depth`` inverse autoregressive flow layers, each conditioned on a context vector
    h(x) from the same network, with the order of z reversed between layers:

        z_t = s_t ⊙ z_{t−1} + (1 − s_t) ⊙ m_t,   (m_t, s_t) = AR-NN_t(z_{t−1}, h(x)).

    Sampling and the density of a sample are one network pass per layer. μ(x) and σ(x) are
    those of the base z₀; the mean and standard deviation of z itself have no closed form
    (``VAE.encode`` estimates them). There is no closed-form KL either, so
    ``TraceMeanField_ELBO`` estimates it by Monte Carlo.

    :param int flow_depth: the number of IAF layers.
    :param int context_dim: the size of h(x).
    :param flow_hidden_dims: hidden widths of each layer's autoregressive network; default
        ``(4 * latent_dim,)``.

    Other arguments as :class:`DiagonalNormalEncoder`; ``latent_dim`` must be at least 2.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        *,
        flow_depth: int = 2,
        context_dim: int = 32,
        flow_hidden_dims: Sequence[int] | None = None,
        image_shape: Sequence[int] | None = None,
        min_scale: float = 1e-4,
    ) -> None:
        check_positive_int("latent_dim", latent_dim)
        check_positive_int("context_dim", context_dim)
        if latent_dim < 2:
            raise ValueError(f"IAFEncoder needs latent_dim >= 2, got {latent_dim}")
        super().__init__(
            data_dim,
            latent_dim,
            2 * latent_dim + context_dim,
            hidden_dims,
            image_shape,
            min_scale,
        )
        self.flow_depth = check_positive_int("flow_depth", flow_depth)
        self.context_dim = context_dim
        hidden = list(flow_hidden_dims or [4 * latent_dim])
        # stable=True is Kingma et al.'s gated update above, numerically safer than exp(log s).
        self.layers = nn.ModuleList(
            T.conditional_affine_autoregressive(latent_dim, context_dim, hidden, stable=True)
            for _ in range(flow_depth)
        )
        self.register_buffer("reverse", torch.arange(latent_dim - 1, -1, -1), persistent=False)

    def forward(self, x: Tensor) -> dist.TorchDistribution:
        d = self.latent_dim
        out = self.net(x)
        loc, raw_scale, context = out[..., :d], out[..., d : 2 * d], out[..., 2 * d :]
        base = dist.Normal(loc, _positive_scale(raw_scale, self.min_scale)).to_event(1)
        transforms: list[T.Transform] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                transforms.append(T.Permute(self.reverse))
            # A ModuleList yields plain Modules to mypy; these are the layers built above.
            transforms.append(cast(T.ConditionalAffineAutoregressive, layer).condition(context))
        return dist.TransformedDistribution(base, transforms)


class DeltaEncoder(_NetworkEncoder):
    """A deterministic encoder, q(z | x) = δ(z − μ(x)): a plain autoencoder whose code is a
    MAP estimate of z. log q = 0, so the "KL" term is −log p(μ(x)), a penalty that keeps codes
    where the prior puts mass; σ(x) is zero.

    Arguments as :class:`DiagonalNormalEncoder`, without ``min_scale``.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        *,
        image_shape: Sequence[int] | None = None,
    ) -> None:
        check_positive_int("latent_dim", latent_dim)
        super().__init__(data_dim, latent_dim, latent_dim, hidden_dims, image_shape, 0.0)

    def forward(self, x: Tensor) -> dist.TorchDistribution:
        return dist.Delta(self.net(x), event_dim=1)
