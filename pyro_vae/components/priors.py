"""Priors p(z): modules whose ``forward()`` takes no argument and returns a distribution with
``batch_shape == ()`` and ``event_shape == (latent_dim,)``. The model's data plate broadcasts it
over the examples.

A prior with learnable parameters is trained with the rest of the model (its parameters are
the VAE's). A prior that needs the VAE's encoder (the VampPrior) has a ``bind_encoder(encoder)``
method, which :class:`~pyro_vae.models.vae.VAE` calls when it is built.
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
from pyro_vae.components.distributions import describe, has_density_everywhere

# softplus(_SOFTPLUS_ONE) == 1: unconstrained scales start at a scale of one.
_SOFTPLUS_ONE = float(torch.log(torch.expm1(torch.tensor(1.0))))


class StandardNormalPrior(nn.Module):
    """The standard normal prior p(z) = N(0, I).

    Its location and scale are buffers, not parameters: nothing here is learned, and they follow
    the model across ``.to(device)`` and ``.double()``.

    :param int latent_dim: the size of z.
    """

    # Buffers, declared for type checkers (nn.Module's attribute lookup returns Tensor | Module).
    loc: Tensor
    scale: Tensor

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class DiagonalNormalPrior(nn.Module):
    """A learnable diagonal Gaussian p(z) = N(m, diag s²), starting at N(0, I).

    :param int latent_dim: the size of z.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(torch.full((latent_dim,), _SOFTPLUS_ONE))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, F.softplus(self.raw_scale)).to_event(1)


class MixtureOfGaussiansPrior(nn.Module):
    """A learnable mixture of ``num_components`` diagonal Gaussians,
    p(z) = Σ_k π_k N(z; m_k, diag s_k²).

    The component means start at standard normal draws, so the components begin apart; the
    weights start equal and the scales at one. No closed-form KL against a Gaussian posterior
    exists, so ``TraceMeanField_ELBO`` estimates this KL by Monte Carlo.

    :param int latent_dim: the size of z.
    :param int num_components: K.
    """

    def __init__(self, latent_dim: int, num_components: int = 10) -> None:
        super().__init__()
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.num_components = check_positive_int("num_components", num_components)
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim))
        self.raw_scales = nn.Parameter(torch.full((num_components, latent_dim), _SOFTPLUS_ONE))

    def forward(self) -> dist.TorchDistribution:
        components = dist.Normal(self.locs, F.softplus(self.raw_scales)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


class VampPrior(nn.Module):
    """The VampPrior (Tomczak & Welling 2018): an equal-weight mixture of the encoder's own
    posteriors at ``num_pseudo_inputs`` learnable pseudo-inputs u_k,
    p(z) = (1/K) Σ_k q(z | u_k).

    It uses the VAE's encoder, which :class:`~pyro_vae.models.vae.VAE` binds when it is built (or
    pass ``encoder=``). The encoder is referenced, not owned: its weights stay the encoder's, so
    they are neither saved twice nor registered twice with Pyro. Its posteriors must have a
    density at any z (diagonal or full-covariance Normal), which rules out the Delta and flow
    encoders.

    :param int data_dim: the size of x (and of each pseudo-input).
    :param int num_pseudo_inputs: K.
    :param encoder: the encoder to use; ``None`` until the VAE binds its own.
    """

    # Set by bind_encoder outside nn.Module's registry; declared here for type checkers.
    _encoder: nn.Module | None

    def __init__(
        self, data_dim: int, num_pseudo_inputs: int = 100, encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.data_dim = check_positive_int("data_dim", data_dim)
        self.num_pseudo_inputs = check_positive_int("num_pseudo_inputs", num_pseudo_inputs)
        # Pseudo-inputs start as uniform noise in [0, 1], the range of image data.
        self.pseudo_inputs = nn.Parameter(torch.rand(num_pseudo_inputs, data_dim))
        self.bind_encoder(encoder)

    def bind_encoder(self, encoder: nn.Module | None) -> None:
        # object.__setattr__ bypasses nn.Module's registration of child modules (see above).
        object.__setattr__(self, "_encoder", encoder)

    def forward(self) -> dist.TorchDistribution:
        if self._encoder is None:
            raise ValueError("VampPrior has no encoder: build it into a VAE, or pass encoder=")
        posteriors = self._encoder(self.pseudo_inputs)
        if not has_density_everywhere(posteriors):
            raise ValueError(
                f"VampPrior needs posteriors with a density at every z (diagonal or "
                f"full-covariance Normal); the encoder gives {describe(posteriors)}"
            )
        weights = dist.Categorical(logits=self.pseudo_inputs.new_zeros(self.num_pseudo_inputs))
        return dist.MixtureSameFamily(weights, posteriors)


class FlowPrior(nn.Module):
    """A normalizing-flow prior: z = f(ε), ε ~ N(0, I), where f⁻¹ is ``flow_depth`` masked
    autoregressive layers (Pyro's ``AffineAutoregressive``) with the order of z reversed
    between them.

    The layers run in the direction that makes log p(z) one network pass per layer (the ELBO
    evaluates it at every step); drawing z from the prior, which only ``VAE.sample`` does,
    takes ``latent_dim`` passes per layer.

    :param int latent_dim: the size of z, at least 2 (an autoregressive layer on one dimension
        is a plain affine map).
    :param int flow_depth: the number of autoregressive layers.
    :param flow_hidden_dims: hidden widths of each layer's autoregressive network; default
        ``(4 * latent_dim,)``. (As in :class:`~pyro_vae.components.encoders.IAFEncoder`;
        ``hidden_dims``
        elsewhere means the widths of the encoder's and decoder's MLPs.)
    """

    # Buffers, declared for type checkers (nn.Module's attribute lookup returns Tensor | Module).
    loc: Tensor
    scale: Tensor
    reverse: Tensor

    def __init__(
        self, latent_dim: int, flow_depth: int = 2, flow_hidden_dims: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.flow_depth = check_positive_int("flow_depth", flow_depth)
        if latent_dim < 2:
            raise ValueError(f"FlowPrior needs latent_dim >= 2, got {latent_dim}")
        hidden = list(flow_hidden_dims or [4 * latent_dim])
        self.layers = nn.ModuleList(
            T.affine_autoregressive(latent_dim, hidden) for _ in range(flow_depth)
        )
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        self.register_buffer("reverse", torch.arange(latent_dim - 1, -1, -1))

    def forward(self) -> dist.TorchDistribution:
        transforms: list[T.Transform] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                transforms.append(T.Permute(self.reverse))
            # .inv: sampling runs the autoregressive inverse, log_prob the one-pass direction.
            # (A ModuleList yields plain Modules to mypy; these are the layers built above.)
            transforms.append(cast(T.AffineAutoregressive, layer).inv)
        # TransformedDistribution applies the list from the base, so reverse the f⁻¹ order.
        base = dist.Normal(self.loc, self.scale).to_event(1)
        return dist.TransformedDistribution(base, transforms[::-1])
