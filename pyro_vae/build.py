"""Build a VAE from component *names*: what the command line and checkpoints use, so that a
run is described by plain values and rebuilt exactly from them.

In Python, pass component objects to :class:`~pyro_vae.model.VAE` directly (``prior=``,
``encoder=``, ...); :func:`build_vae` is the same with names, one keyword per swap::

    build_vae(784, 50, prior="flow", encoder="iaf", likelihood="discretized-logistic")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from pyro_vae import encoders, likelihoods, priors
from pyro_vae.bayesian import BayesianMLP
from pyro_vae.model import VAE
from pyro_vae.networks import MLP, DeconvNet

PRIORS = ("standard-normal", "diagonal-normal", "mixture", "vamp", "flow")
ENCODERS = ("diagonal", "full-covariance", "iaf", "delta")
LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "normal", "laplace", "discretized-logistic")
DECODERS = ("mlp", "conv", "bayesian-mlp")


def build_vae(
    data_dim: int,
    latent_dim: int,
    *,
    prior: str = "standard-normal",
    encoder: str = "diagonal",
    likelihood: str = "bernoulli",
    decoder: str = "mlp",
    hidden_dims: Sequence[int] = (400,),
    image_shape: Sequence[int] | None = None,
    num_components: int | None = None,
    flow_depth: int = 2,
    likelihood_scale: float | str = "learned",
    num_bins: int = 256,
    beta: float = 1.0,
    prior_scale: float = 1.0,
) -> VAE:
    """A :class:`~pyro_vae.model.VAE` from component names.

    :param prior: one of :data:`PRIORS`: ``standard-normal`` N(0, I); ``diagonal-normal``, a
        learnable diagonal Gaussian; ``mixture``, a learnable mixture of Gaussians; ``vamp``,
        the VampPrior; ``flow``, a normalizing-flow prior.
    :param encoder: one of :data:`ENCODERS`: ``diagonal`` or ``full-covariance`` Normal,
        ``iaf`` (inverse autoregressive flow posterior), ``delta`` (deterministic autoencoder).
    :param likelihood: one of :data:`LIKELIHOODS`.
    :param decoder: ``mlp``; ``conv``, a convolutional encoder network and decoder pair
        (needs ``image_shape``); or ``bayesian-mlp``, an MLP decoder whose weights have a
        Normal(0, ``prior_scale``) prior and a mean-field Normal posterior
        (:class:`~pyro_vae.bayesian.BayesianMLP`), with the MLP encoder.
    :param hidden_dims: MLP widths of the encoder; the MLP decoder mirrors them.
    :param image_shape: ``(height, width)`` or ``(channels, height, width)`` of the data, for
        ``decoder="conv"``.
    :param num_components: mixture components (default 10) or VampPrior pseudo-inputs
        (default 100).
    :param flow_depth: layers of the ``flow`` prior and of the ``iaf`` encoder.
    :param likelihood_scale: for ``normal`` and ``laplace``: a number (fixed), ``"learned"``
        (one learnt scale) or ``"learned-per-feature"``; for ``discretized-logistic``, learnt
        either way, shared or per feature.
    :param num_bins: pixel levels for ``discretized-logistic`` (256 for 8-bit images).
    :param beta: the KL weight (β-VAE).
    :param prior_scale: the weight prior's standard deviation, for ``bayesian-mlp``.
    :raises ValueError: on an unknown name or an incompatible combination, naming it.
    """
    for kind, name, names in (
        ("prior", prior, PRIORS),
        ("encoder", encoder, ENCODERS),
        ("likelihood", likelihood, LIKELIHOODS),
        ("decoder", decoder, DECODERS),
    ):
        if name not in names:
            raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(names)}")
    hidden_dims = tuple(hidden_dims)
    if decoder == "conv":
        if image_shape is None:
            raise ValueError("decoder 'conv' needs the data's image_shape")
        if math.prod(image_shape) != data_dim:
            raise ValueError(
                f"image_shape {tuple(image_shape)} has {math.prod(image_shape)} "
                f"values, but data_dim is {data_dim}"
            )
    if prior_scale != 1.0 and decoder != "bayesian-mlp":
        raise ValueError(
            f"prior_scale is the weight prior of decoder 'bayesian-mlp', not {decoder!r}"
        )
    conv_shape = tuple(image_shape) if decoder == "conv" else None

    encoder_module = _ENCODER_BUILDERS[encoder](
        data_dim, latent_dim, hidden_dims, conv_shape, flow_depth
    )
    prior_module = _build_prior(prior, data_dim, latent_dim, num_components, flow_depth)
    if decoder == "conv":
        decoder_module: nn.Module = DeconvNet(latent_dim, conv_shape)
    elif decoder == "bayesian-mlp":
        decoder_module = BayesianMLP(
            latent_dim, tuple(reversed(hidden_dims)), data_dim, prior_scale=prior_scale
        )
    else:
        decoder_module = MLP(latent_dim, tuple(reversed(hidden_dims)), data_dim)
    likelihood_module = _build_likelihood(likelihood, data_dim, likelihood_scale, num_bins)
    return VAE(
        data_dim,
        latent_dim,
        prior=prior_module,
        encoder=encoder_module,
        decoder=decoder_module,
        likelihood=likelihood_module,
        beta=beta,
        hidden_dims=hidden_dims,
    )


_ENCODER_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "diagonal": lambda d, k, h, shape, _: encoders.DiagonalNormalEncoder(
        d, k, h, image_shape=shape
    ),
    "full-covariance": lambda d, k, h, shape, _: encoders.FullCovarianceNormalEncoder(
        d, k, h, image_shape=shape
    ),
    "iaf": lambda d, k, h, shape, depth: encoders.IAFEncoder(
        d, k, h, image_shape=shape, flow_depth=depth
    ),
    "delta": lambda d, k, h, shape, _: encoders.DeltaEncoder(d, k, h, image_shape=shape),
}


def _build_prior(
    name: str, data_dim: int, latent_dim: int, num_components: int | None, flow_depth: int
) -> nn.Module:
    if num_components is not None and name not in ("mixture", "vamp"):
        raise ValueError(f"num_components is for the mixture and vamp priors, not {name!r}")
    if name == "standard-normal":
        return priors.StandardNormalPrior(latent_dim)
    if name == "diagonal-normal":
        return priors.DiagonalNormalPrior(latent_dim)
    if name == "mixture":
        return priors.MixtureOfGaussiansPrior(latent_dim, num_components or 10)
    if name == "vamp":
        return priors.VampPrior(data_dim, num_components or 100)  # the VAE binds its encoder
    return priors.FlowPrior(latent_dim, flow_depth)


def _build_likelihood(name: str, data_dim: int, scale: float | str, num_bins: int) -> nn.Module:
    learned = {"learned": None, "learned-per-feature": data_dim}
    if isinstance(scale, str) and scale not in learned:
        raise ValueError(
            f"likelihood_scale must be a positive number, 'learned' or 'learned-per-feature', "
            f"got {scale!r}"
        )
    if name == "bernoulli":
        return likelihoods.BernoulliLikelihood()
    if name == "continuous-bernoulli":
        return likelihoods.ContinuousBernoulliLikelihood()
    if name == "discretized-logistic":
        if not isinstance(scale, str):
            raise ValueError(
                "discretized-logistic learns its scale: use 'learned' or "
                f"'learned-per-feature', not {scale!r}"
            )
        return likelihoods.DiscretizedLogisticLikelihood(num_bins, data_dim=learned[scale])
    family = likelihoods.NormalLikelihood if name == "normal" else likelihoods.LaplaceLikelihood
    if isinstance(scale, str):
        return family(learn_scale=True, data_dim=learned[scale])
    return family(scale)


def describe(config: dict[str, Any]) -> str:
    """One line naming a build_vae configuration's components, for logs and tables."""
    keys = ("prior", "encoder", "likelihood", "decoder")
    defaults = ("standard-normal", "diagonal", "bernoulli", "mlp")
    return ", ".join(f"{k} {config.get(k, d)}" for k, d in zip(keys, defaults, strict=True))
