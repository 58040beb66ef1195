"""Build a VAE from component *names*: what the command line and checkpoints use, so that a
run is described by plain values and rebuilt exactly from them.

In Python, pass component objects to :class:`~pyro_vae.models.vae.VAE` directly (``prior=``,
``encoder=``, ...); :func:`build_vae` is the same with names, one keyword per swap::

    build_vae(784, 50, prior="flow", encoder="iaf", likelihood="discretized-logistic")

:func:`least_weights` bounds the size of ``build_vae(**config)`` from the config alone, beside
the builder it mirrors: the checkpoint loader refuses with it a config that describes more
weights than its file holds, before building anything.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from pyro_vae.components import encoders, likelihoods, priors
from pyro_vae.components.bayesian import BayesianMLP
from pyro_vae.components.networks import DEFAULT_HIDDEN_DIMS, MLP, DeconvNet
from pyro_vae.models.vae import VAE

# The names build_vae takes for each part (tuples of strings, for argparse's choices).
PRIOR_NAMES = ("standard-normal", "diagonal-normal", "mixture", "vamp", "flow")
ENCODER_NAMES = ("diagonal", "full-covariance", "iaf", "delta")
LIKELIHOOD_NAMES = (
    "bernoulli",
    "continuous-bernoulli",
    "normal",
    "laplace",
    "discretized-logistic",
)
NETWORK_NAMES = ("mlp", "conv")
DECODER_NAMES = ("deterministic", "bayesian")

# The size of the IAF encoder's context h(x); build_vae leaves it at its default.
_IAF_CONTEXT = inspect.signature(encoders.IAFEncoder).parameters["context_dim"].default

# Version 0.1 named the network through the decoder ("conv" swapped the encoder's too). The
# message tells a caller of the old names what to write now.
_OLD_DECODERS = {
    "mlp": "decoder='deterministic'",
    "conv": "network='conv'",
    "bayesian-mlp": "decoder='bayesian'",
}


def build_vae(
    data_dim: int,
    latent_dim: int,
    *,
    prior: str = "standard-normal",
    encoder: str = "diagonal",
    likelihood: str = "bernoulli",
    network: str = "mlp",
    decoder: str = "deterministic",
    hidden_dims: Sequence[int] | None = None,
    image_shape: Sequence[int] | None = None,
    num_components: int | None = None,
    flow_depth: int = 2,
    likelihood_scale: float | str = "learned",
    num_levels: int = 256,
    beta: float = 1.0,
    prior_scale: float = 1.0,
) -> VAE:
    """A :class:`~pyro_vae.models.vae.VAE` from component names.

    :param prior: one of :data:`PRIOR_NAMES`: ``standard-normal`` N(0, I);
        ``diagonal-normal``, a learnable diagonal Gaussian; ``mixture``, a learnable mixture of
        Gaussians; ``vamp``, the VampPrior; ``flow``, a normalizing-flow prior.
    :param encoder: one of :data:`ENCODER_NAMES`: ``diagonal`` or ``full-covariance`` Normal,
        ``iaf`` (inverse autoregressive flow posterior), ``delta`` (deterministic autoencoder).
    :param likelihood: one of :data:`LIKELIHOOD_NAMES`.
    :param network: one of :data:`NETWORK_NAMES`, the architecture of both the encoder's
        network and the decoder: ``mlp``, MLPs of ``hidden_dims`` (the decoder mirrors the
        encoder); ``conv``, a convolutional encoder network and a transposed-convolution
        decoder of fixed layers (needs ``image_shape``; refuses ``hidden_dims``).
    :param decoder: one of :data:`DECODER_NAMES`: ``deterministic`` weights, fitted as point
        estimates; or ``bayesian``, decoder weights with a Normal(0, ``prior_scale``) prior and
        a mean-field Normal posterior (:class:`~pyro_vae.components.bayesian.BayesianMLP`; needs
        ``network="mlp"``).
    :param hidden_dims: MLP widths of the encoder; the MLP decoder mirrors them. ``None``:
        ``DEFAULT_HIDDEN_DIMS`` (one layer of 400) for ``network="mlp"``.
    :param image_shape: ``(height, width)`` or ``(channels, height, width)`` of the data, for
        ``network="conv"``.
    :param num_components: mixture components (default 10) or VampPrior pseudo-inputs
        (default 100).
    :param flow_depth: layers of the ``flow`` prior and of the ``iaf`` encoder.
    :param likelihood_scale: for ``normal`` and ``laplace``: a number (fixed), ``"learned"``
        (one learned scale) or ``"learned-per-feature"``; for ``discretized-logistic``, learned
        either way, shared or per feature.
    :param num_levels: pixel levels for ``discretized-logistic`` (256 for 8-bit images).
    :param beta: the KL weight (β-VAE).
    :param prior_scale: the weight prior's standard deviation, for ``decoder="bayesian"``.
    :raises ValueError: on an unknown name or an incompatible combination, naming it.
    """
    if decoder in _OLD_DECODERS:
        raise ValueError(
            f"decoder {decoder!r} is a name of pyro_vae 0.1; write {_OLD_DECODERS[decoder]} "
            "(README, Changelog)"
        )
    for kind, name, names in (
        ("prior", prior, PRIOR_NAMES),
        ("encoder", encoder, ENCODER_NAMES),
        ("likelihood", likelihood, LIKELIHOOD_NAMES),
        ("network", network, NETWORK_NAMES),
        ("decoder", decoder, DECODER_NAMES),
    ):
        if name not in names:
            raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(names)}")
    conv_shape: tuple[int, ...] | None = None
    if network == "conv":
        if image_shape is None:
            raise ValueError("network 'conv' needs the data's image_shape")
        if math.prod(image_shape) != data_dim:
            raise ValueError(
                f"image_shape {tuple(image_shape)} has {math.prod(image_shape)} "
                f"values, but data_dim is {data_dim}"
            )
        # The conv layers are fixed: silently ignoring the widths asked for would be a lie.
        if hidden_dims is not None:
            raise ValueError(
                "hidden_dims sets the widths of network 'mlp'; network 'conv' has fixed "
                "layers, so leave hidden_dims out"
            )
        if decoder == "bayesian":
            raise ValueError("decoder 'bayesian' is an MLP: it needs network 'mlp', not 'conv'")
        conv_shape = tuple(image_shape)
    hidden_dims = DEFAULT_HIDDEN_DIMS if hidden_dims is None else tuple(hidden_dims)
    if prior_scale != 1.0 and decoder != "bayesian":
        raise ValueError(f"prior_scale is the weight prior of decoder 'bayesian', not {decoder!r}")

    encoder_module = _ENCODER_BUILDERS[encoder](
        data_dim, latent_dim, hidden_dims, conv_shape, flow_depth
    )
    prior_module = _build_prior(prior, data_dim, latent_dim, num_components, flow_depth)
    if conv_shape is not None:
        decoder_module: nn.Module = DeconvNet(latent_dim, conv_shape)
    elif decoder == "bayesian":
        decoder_module = BayesianMLP(
            latent_dim, tuple(reversed(hidden_dims)), data_dim, prior_scale=prior_scale
        )
    else:
        decoder_module = MLP(latent_dim, tuple(reversed(hidden_dims)), data_dim)
    likelihood_module = _build_likelihood(likelihood, data_dim, likelihood_scale, num_levels)
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


def _build_likelihood(name: str, data_dim: int, scale: float | str, num_levels: int) -> nn.Module:
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
        return likelihoods.DiscretizedLogisticLikelihood(num_levels, data_dim=learned[scale])
    family = likelihoods.NormalLikelihood if name == "normal" else likelihoods.LaplaceLikelihood
    if isinstance(scale, str):
        return family(learn_scale=True, data_dim=learned[scale])
    return family(scale)


def describe(config: dict[str, Any]) -> str:
    """One line naming a build_vae configuration's components, for logs and tables."""
    keys = ("prior", "encoder", "likelihood", "network", "decoder")
    defaults = ("standard-normal", "diagonal", "bernoulli", "mlp", "deterministic")
    return ", ".join(f"{k} {config.get(k, d)}" for k, d in zip(keys, defaults, strict=True))


def least_weights(config: dict[str, Any]) -> int:
    """A lower bound on the number of weights of ``build_vae(**config)``, from the structure
    of its parts, without building it. A model holding more weights than its checkpoint
    cannot be the one the checkpoint came from; and since the bound is within a small factor
    of the true count (tested), building costs a small multiple of the weights stored.

    The terms are weight matrices of: the encoder network and its read-out of the
    posterior's parameters (loc; loc and scale; plus the off-diagonal entries for the full
    covariance); the decoder (an MLP mirroring ``hidden_dims``, or for network ``conv`` a
    linear map from z to a 64-channel feature map of a sixteenth of the pixels, as two
    stride-2 layers leave, and the encoder's read-out from the same map); each
    autoregressive flow layer (latent_dim inputs, and the IAF's context, to 4 * latent_dim
    hidden units, to two outputs per latent); the mixture's means and scales and the
    VampPrior's pseudo-inputs; a learned scale per feature.
    """
    data_dim, latent_dim = config["data_dim"], config["latent_dim"]
    hidden = list(
        DEFAULT_HIDDEN_DIMS if config.get("hidden_dims") is None else config["hidden_dims"]
    )
    flow_depth = config.get("flow_depth", 2)
    encoder = config.get("encoder", "diagonal")
    outputs = {
        "delta": latent_dim,
        "full-covariance": 2 * latent_dim + latent_dim * (latent_dim - 1) // 2,
        "iaf": 2 * latent_dim + _IAF_CONTEXT,
    }.get(encoder, 2 * latent_dim)
    if config.get("network", "mlp") == "conv":
        *channels, height, width = config["image_shape"]  # network conv needs one
        features = 64 * math.ceil(height / 4) * math.ceil(width / 4)
        least = features * latent_dim + features * outputs
        least += 32 * 9 * (channels or [1])[0]  # the first layer: 32 filters of 3x3 per channel
    else:  # network mlp: latent -> reversed(hidden) -> data, deterministic or Bayesian
        widths = [data_dim, *hidden]
        least = 2 * sum(a * b for a, b in itertools.pairwise(widths))
        least += widths[-1] * latent_dim + widths[-1] * outputs
    if config.get("likelihood_scale") == "learned-per-feature" and config.get("likelihood") in (
        "normal",
        "laplace",
        "discretized-logistic",
    ):
        least += data_dim
    if encoder == "iaf":  # each layer also reads the context h(x)
        least += flow_depth * (12 * latent_dim**2 + 4 * latent_dim * _IAF_CONTEXT)
    prior = config.get("prior", "standard-normal")
    if prior == "flow":
        least += flow_depth * 12 * latent_dim**2
    elif prior == "mixture":
        least += 2 * (config.get("num_components") or 10) * latent_dim
    elif prior == "vamp":
        least += (config.get("num_components") or 100) * data_dim
    return least
