"""The VAE as a Pyro ``model`` / ``guide`` pair.

``model(x)``:  z ~ p(z) in the data plate, params = decoder(z), x ~ p(x | z) in the same plate.
``guide(x)``:  z ~ q(z | x) = encoder(x) in the data plate (and, for a decoder with global
latents, their guide, outside the plate).

Everything else in pyro_vae plugs into these two functions. The checks of the component
contract live in :mod:`pyro_vae.models.contract`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.nn import pyro_method
from torch import Tensor, nn
from torch.distributions import kl_divergence

import pyro_vae.components.kl  # noqa: F401  (registers the closed-form KLs torch lacks)
from pyro_vae._checks import check_positive_int
from pyro_vae._sites import site_distribution
from pyro_vae.components.encoders import DiagonalNormalEncoder
from pyro_vae.components.likelihoods import BernoulliLikelihood
from pyro_vae.components.networks import DEFAULT_HIDDEN_DIMS, MLP
from pyro_vae.components.priors import StandardNormalPrior
from pyro_vae.models import contract
from pyro_vae.models.base import BetaScaled, PyroProgram, data_plate

# Draws per example for the moments of a posterior that has no closed form (VAE.encode).
ENCODE_PARTICLES = 128
# Samples per pass of VAE.sample: bounds the memory of the draws of z (a mixture prior draws
# from every component for each), of the decoder's activations and of the likelihood.
SAMPLE_CHUNK = 4096


class VAE(BetaScaled, PyroProgram):
    """A variational autoencoder: prior p(z), likelihood p(x | z) with a decoder network, and an
    amortized guide q(z | x) (the encoder).

    Every part is an optional keyword; ``None`` gives the documented default. Any ``nn.Module``
    that keeps the component contract works (README, "Components"):

    - ``prior()`` -> distribution, ``batch_shape == ()``, ``event_shape == (latent_dim,)``;
      default :class:`~pyro_vae.components.priors.StandardNormalPrior`.
    - ``encoder(x)`` -> reparameterized distribution, ``batch_shape == (B,)``,
      ``event_shape == (latent_dim,)``; default
      :class:`~pyro_vae.components.encoders.DiagonalNormalEncoder`
      with an MLP of ``hidden_dims``.
    - ``decoder(z)`` -> tensor ``(B, ...)``, the likelihood's parameters; default an
      :class:`~pyro_vae.components.networks.MLP` with ``hidden_dims`` reversed, giving
      ``data_dim`` logits.
    - ``likelihood(params)`` -> distribution, ``batch_shape == (B,)``,
      ``event_shape == (data_dim,)``; default
      :class:`~pyro_vae.components.likelihoods.BernoulliLikelihood`.

    Parts are checked once, here, and a part that breaks the contract raises a ``ValueError``
    naming it.

    :param int data_dim: features per example (784 for flattened 28x28 images).
    :param int latent_dim: the size of z.
    :param float beta: weight of the KL term (β-VAE); scales the ``z`` site in both model and
        guide, so ``TraceMeanField_ELBO`` sees it too. Must be > 0.
    :param hidden_dims: hidden widths of the default encoder and decoder MLPs.
    """

    pyro_kind = "vae"

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        *,
        prior: nn.Module | None = None,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        likelihood: nn.Module | None = None,
        beta: float = 1.0,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
    ) -> None:
        """Assemble the VAE from its parts (``None``: the default part) and check each one
        against the component contract, raising a ``ValueError`` that names a part that
        breaks it. A VampPrior is bound to this encoder. The VAE takes a Pyro name of its own
        (:class:`~pyro_vae.models.base.NamedPyroModule`), so that two VAEs never share
        param-store entries. The arguments are described in the class docstring.
        """
        super().__init__()
        check_positive_int("data_dim", data_dim)
        check_positive_int("latent_dim", latent_dim)
        for width in hidden_dims:
            check_positive_int("hidden_dims entries", width)
        self.data_dim = int(data_dim)
        self.latent_dim = int(latent_dim)
        self.beta = beta  # checked by the setter below
        self.prior = StandardNormalPrior(latent_dim) if prior is None else prior
        self.encoder = (
            DiagonalNormalEncoder(data_dim, latent_dim, hidden_dims) if encoder is None else encoder
        )
        self.decoder = (
            MLP(latent_dim, tuple(reversed(hidden_dims)), data_dim) if decoder is None else decoder
        )
        self.likelihood = BernoulliLikelihood() if likelihood is None else likelihood
        # A prior built from the encoder's posteriors (the VampPrior) is bound to this one.
        bind_encoder = getattr(self.prior, "bind_encoder", None)
        if callable(bind_encoder):
            bind_encoder(self.encoder)
        self.data_support = contract.check_components(
            self.prior,
            self.encoder,
            self.decoder,
            self.likelihood,
            data_dim=self.data_dim,
            latent_dim=self.latent_dim,
            dtype=self.dtype,
            device=self.device,
        )

    # ------------------------------------------------------------------ the Pyro program

    @pyro_method
    def model(self, x: Tensor, num_data: int | None = None) -> Tensor:
        """The generative model p(z) p(x | z).

        :param x: a batch ``(B, data_dim)``.
        :param num_data: the dataset size when ``x`` is a minibatch, so that the ELBO is scaled
            to the whole dataset; ``None`` means ``x`` is all the data (no scaling).
        :returns: the decoder's output (the likelihood's parameters).
        """
        # Reading a plain nn.Module child inside a pyro_method registers its parameters with
        # Pyro (pyro.module). The weights of a Bayesian decoder are sampled in decoder(z), once
        # per step, outside the data plate, as global latents must be: they are not scaled by
        # N/B, and all examples share one draw (docs/design.md, "Global latents").
        prior, decoder, likelihood = self.prior, self.decoder, self.likelihood
        plate = data_plate(x, num_data)
        with plate, self.beta_scale():
            z = pyro.sample("z", prior())
        params = decoder(z)
        with plate:
            pyro.sample("x", likelihood(params), obs=x)
        return params

    @pyro_method
    def guide(self, x: Tensor, num_data: int | None = None) -> Tensor:
        """The amortized variational posterior q(z | x).

        Takes the same arguments as :meth:`model`. β scales the ``z`` site here as well as in
        the model (docs/design.md, "β"). A decoder with global latents brings their guide
        (:attr:`weight_guide`), run here outside the data plate.

        :returns: the sampled z, ``(B, latent_dim)``.
        """
        encoder, weight_guide = self.encoder, self.weight_guide
        with data_plate(x, num_data), self.beta_scale():
            z = pyro.sample("z", encoder(x))
        # After z, as in the model: TraceMeanField_ELBO checks that the sites come in one order.
        if weight_guide is not None:
            weight_guide()
        return z

    # ------------------------------------------------------------------ conveniences

    @property
    def weight_guide(self) -> Callable[[], object] | None:
        """The guide of the decoder's global latents (its ``guide()`` method, as
        :class:`~pyro_vae.components.bayesian.BayesianMLP` has), or ``None`` for a
        deterministic decoder."""
        guide = getattr(self.decoder, "guide", None)
        return guide if callable(guide) else None

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """μ(x) and σ(x): the mean and standard deviation of q(z | x), ``(B, latent_dim)`` each.

        They are outputs of the encoder network for each example, not parameters: a different
        pair for every x. A posterior without closed-form moments (a flow) gets Monte-Carlo
        estimates from :data:`ENCODE_PARTICLES` draws.
        """
        posterior = self.encoder(self._check_batch(x))
        try:
            return posterior.mean, posterior.stddev
        except NotImplementedError:
            draws = posterior.rsample((ENCODE_PARTICLES,))
            return draws.mean(0), draws.std(0)

    def decode(self, z: Tensor, weights: str = "sample") -> Tensor:
        """The decoder's output (the likelihood's parameters) at ``z``.

        :param weights: for a decoder with global latents (a Bayesian decoder): ``"sample"``
            draws one set of weights from their guide, shared by the whole batch (the posterior
            predictive); ``"mean"`` uses the guide's mean weights. A deterministic decoder
            ignores it.
        """
        return self._decoder(weights)(z)

    def _decoder(self, weights: str) -> Callable[[Tensor], Tensor]:
        """The decoder with its global latents fixed as ``weights`` says: one draw (or the
        mean) for every batch it is then called on."""
        if weights not in ("sample", "mean"):
            raise ValueError(f"weights must be 'sample' or 'mean', got {weights!r}")
        guide = self.weight_guide
        if guide is None:
            return self.decoder
        if weights == "mean":
            return poutine.condition(self.decoder, data=self.weight_means())
        return poutine.replay(self.decoder, trace=poutine.trace(guide).get_trace())

    def weight_means(self) -> dict[str, Tensor]:
        """The posterior mean of every global latent site, read off :attr:`weight_guide`
        (empty for a deterministic decoder)."""
        guide = self.weight_guide
        if guide is None:
            return {}
        # The trace draws weights only to reach the guide's distributions: on a fork of the
        # random state, so that asking for the means changes no later draw.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            trace = poutine.trace(guide).get_trace()
        return {
            name: site_distribution(site).mean
            for name, site in trace.nodes.items()
            if site["type"] == "sample"
        }

    @torch.no_grad()
    def reconstruct(self, x: Tensor, weights: str = "sample") -> Tensor:
        """The likelihood's mean at z = μ(x): a tensor shaped like ``x``. ``weights`` as in
        :meth:`decode`."""
        return self.likelihood(self.decode(self.encode(x)[0], weights)).mean

    @torch.no_grad()
    def sample(self, num_samples: int, weights: str = "sample") -> Tensor:
        """Decode z ~ p(z): the likelihood's mean, ``(num_samples, data_dim)``.

        The mean (pixel probabilities, for Bernoulli) rather than a noisy draw: what a person
        wants to look at. ``weights`` as in :meth:`decode`: a Bayesian decoder's weights are
        drawn once for all the samples. The work is done :data:`SAMPLE_CHUNK` samples at a
        time, so that memory beyond the result stays bounded for any ``num_samples``; a result
        too large to allocate raises a ``ValueError`` giving its size, before any work.
        """
        check_positive_int("num_samples", num_samples)
        decoder = self._decoder(weights)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        try:
            samples = torch.empty(
                (num_samples, self.data_dim), dtype=self.dtype, device=self.device
            )
        except (RuntimeError, TypeError, OverflowError) as error:
            # torch's out-of-memory errors are RuntimeErrors; a size beyond 64 bits, a TypeError.
            raise ValueError(
                f"num_samples={num_samples} asks for {num_samples * self.data_dim * itemsize:.3g} "
                f"bytes of samples ({num_samples} x {self.data_dim} features of {self.dtype}), "
                f"more than can be allocated on {self.device}"
            ) from error
        prior = self.prior()
        for chunk in samples.split(SAMPLE_CHUNK):
            z = prior.sample((len(chunk),))
            chunk.copy_(self.likelihood(decoder(z)).mean)
        return samples


@torch.no_grad()
def has_closed_form_kl(vae: VAE) -> bool:
    """Whether ``kl_divergence(q(z | x), p(z))`` is available for this VAE's encoder and prior,
    that is, whether ``TraceMeanField_ELBO`` computes the KL exactly rather than falling back
    to a Monte-Carlo estimate."""
    x = torch.zeros(2, vae.data_dim, dtype=vae.dtype, device=vae.device)
    posterior = vae.encoder(x)
    prior = vae.prior().expand(posterior.batch_shape)
    try:
        kl_divergence(posterior, prior)
    except NotImplementedError:
        return False
    return True
