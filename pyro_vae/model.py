"""The VAE as a Pyro ``model`` / ``guide`` pair.

``model(x)``:  z ~ p(z) in the data plate, params = decoder(z), x ~ p(x | z) in the same plate.
``guide(x)``:  z ~ q(z | x) = encoder(x) in the data plate.

Everything else in pyro_vae plugs into these two functions.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule, pyro_method
from torch import Tensor, nn

from pyro_vae._checks import check_positive_float, check_positive_int
from pyro_vae.encoders import DiagonalNormalEncoder
from pyro_vae.likelihoods import BernoulliLikelihood
from pyro_vae.networks import MLP
from pyro_vae.priors import StandardNormalPrior

# Each VAE gets its own Pyro name, so its parameters have names of their own in Pyro's global
# param store. Without this, two VAEs built in one process share names such as
# "encoder$$$net.0.weight", and SVI on the second silently optimizes the first one's tensors
# (DESIGN.md §4, trap 2).
_instance_ids = itertools.count()

# Two examples, not one, so that a part which mixes up the batch dimension with another one
# cannot pass the shape check by accident.
_CHECK_BATCH = 2

# Draws per example for the moments of a posterior that has no closed form (VAE.encode).
ENCODE_SAMPLES = 128


class VAE(PyroModule):
    """A variational autoencoder: prior p(z), likelihood p(x | z) with a decoder network, and an
    amortized guide q(z | x) (the encoder).

    Every part is an optional keyword; ``None`` gives the documented default. Any ``nn.Module``
    that keeps the component contract works (README, "Components"):

    - ``prior()`` -> distribution, ``batch_shape == ()``, ``event_shape == (latent_dim,)``;
      default :class:`~pyro_vae.priors.StandardNormalPrior`.
    - ``encoder(x)`` -> reparameterized distribution, ``batch_shape == (B,)``,
      ``event_shape == (latent_dim,)``; default :class:`~pyro_vae.encoders.DiagonalNormalEncoder`
      with an MLP of ``hidden_dims``.
    - ``decoder(z)`` -> tensor ``(B, ...)``, the likelihood's parameters; default an
      :class:`~pyro_vae.networks.MLP` with ``hidden_dims`` reversed, giving ``data_dim`` logits.
    - ``likelihood(params)`` -> distribution, ``batch_shape == (B,)``,
      ``event_shape == (data_dim,)``; default :class:`~pyro_vae.likelihoods.BernoulliLikelihood`.

    Parts are checked once, here, and a part that breaks the contract raises a ``ValueError``
    naming it.

    :param int data_dim: features per example (784 for flattened 28x28 images).
    :param int latent_dim: the size of z.
    :param float beta: weight of the KL term (β-VAE); scales the ``z`` site in both model and
        guide, so ``TraceMeanField_ELBO`` sees it too. Must be > 0.
    :param hidden_dims: hidden widths of the default encoder and decoder MLPs.
    """

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
        hidden_dims: Sequence[int] = (400,),
    ) -> None:
        super().__init__(name=f"vae{next(_instance_ids)}")
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
        self.data_support = self._check_components()

    # β is a property so that a KL warm-up schedule can change it and still be checked.
    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = check_positive_float("beta", value)

    # ------------------------------------------------------------------ the Pyro program

    def _data_plate(self, x: Tensor, num_data: int | None) -> pyro.plate:
        batch_size = x.shape[0]
        if num_data is None:
            num_data = batch_size
        elif num_data < batch_size:
            raise ValueError(
                f"num_data={num_data} is smaller than the batch of {batch_size} examples"
            )
        # subsample=x: the batch *is* the subsample, so Pyro scales log-densities by
        # num_data / batch_size without drawing random indices of its own.
        return pyro.plate("data", size=num_data, subsample=x)

    def _beta_scale(self) -> contextlib.AbstractContextManager:
        # At β = 1 the scale handler would multiply by one; leaving it out saves a handler on
        # every site of every step.
        return contextlib.nullcontext() if self.beta == 1.0 else poutine.scale(scale=self.beta)

    @pyro_method
    def model(self, x: Tensor, num_data: int | None = None) -> Tensor:
        """The generative model p(z) p(x | z).

        :param x: a batch ``(B, data_dim)``.
        :param num_data: the dataset size when ``x`` is a minibatch, so that the ELBO is scaled
            to the whole dataset; ``None`` means ``x`` is all the data (no scaling).
        :returns: the decoder's output (the likelihood's parameters).
        """
        # Reading a plain nn.Module child inside a pyro_method registers its parameters with
        # Pyro (pyro.module); PyroSample weights of a Bayesian decoder are sampled here, once,
        # outside the data plate, as global latents must be (DESIGN.md §4, trap 3).
        prior, decoder, likelihood = self.prior, self.decoder, self.likelihood
        data_plate = self._data_plate(x, num_data)
        with data_plate, self._beta_scale():
            z = pyro.sample("z", prior())
        params = decoder(z)
        with data_plate:
            pyro.sample("x", likelihood(params), obs=x)
        return params

    @pyro_method
    def guide(self, x: Tensor, num_data: int | None = None) -> Tensor:
        """The amortized variational posterior q(z | x).

        Takes the same arguments as :meth:`model`. β scales the ``z`` site here as well as in
        the model (DESIGN.md §4, trap 4).

        :returns: the sampled z, ``(B, latent_dim)``.
        """
        encoder = self.encoder
        with self._data_plate(x, num_data), self._beta_scale():
            return pyro.sample("z", encoder(x))

    # ------------------------------------------------------------------ conveniences

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """μ(x) and σ(x): the mean and standard deviation of q(z | x), ``(B, latent_dim)`` each.

        They are outputs of the encoder network for each example, not parameters: a different
        pair for every x. A posterior without closed-form moments (a flow) gets Monte-Carlo
        estimates from :data:`ENCODE_SAMPLES` draws.
        """
        posterior = self.encoder(self._check_batch(x))
        try:
            return posterior.mean, posterior.stddev
        except NotImplementedError:
            draws = posterior.rsample((ENCODE_SAMPLES,))
            return draws.mean(0), draws.std(0)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The likelihood's mean at z = μ(x): a tensor shaped like ``x``."""
        return self.likelihood(self.decoder(self.encode(x)[0])).mean

    @torch.no_grad()
    def sample(self, num_samples: int) -> Tensor:
        """Decode z ~ p(z): the likelihood's mean, ``(num_samples, data_dim)``.

        The mean (pixel probabilities, for Bernoulli) rather than a noisy draw: what a person
        wants to look at.
        """
        check_positive_int("num_samples", num_samples)
        z = self.prior().sample((num_samples,))
        return self.likelihood(self.decoder(z)).mean

    # ------------------------------------------------------------------ checks

    def _reference_tensor(self) -> Tensor:
        """Some parameter or buffer, for the device and floating dtype of the model."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor
        return torch.empty(0)

    def _check_batch(self, x: object) -> Tensor:
        """The checks of :meth:`validate_data` that any input of the networks needs (type,
        shape, finite values, the model's dtype and device), without the likelihood's support:
        :meth:`encode` takes grayscale images even for a Bernoulli model."""
        x = self._check_form(x, "x")
        _check_finite(x, "x")
        self._check_dtype_and_device(x, "x")
        return x

    def _check_form(self, x: object, what: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{what} must have a floating dtype, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(
                f"{what} must have shape (N, {self.data_dim}) (N examples of data_dim="
                f"{self.data_dim} features; flatten images first), got {tuple(x.shape)}"
            )
        return x

    def _check_dtype_and_device(self, x: Tensor, what: str) -> None:
        reference = self._reference_tensor()
        if reference.numel() and (x.dtype, x.device) != (reference.dtype, reference.device):
            raise ValueError(
                f"{what} is {x.dtype} on {x.device} but the model is {reference.dtype} on "
                f"{reference.device}; convert one of them (x.to(...) or vae.to(...))"
            )

    def validate_data(
        self, x: object, what: str = "data", *, probabilities: bool = False
    ) -> Tensor:
        """Raise a ``ValueError`` naming the problem unless ``x`` is a finite floating tensor
        ``(N, data_dim)`` inside the likelihood's support; return it unchanged otherwise.

        :param what: how the error message names ``x``.
        :param probabilities: check for values in [0, 1] instead of the likelihood's support:
            data that will be binarized dynamically.
        """
        x = self._check_form(x, what)
        if x.shape[0] == 0:
            raise ValueError(f"{what} is empty: it has no examples")
        _check_finite(x, what)
        if probabilities:
            support = constraints.independent(constraints.unit_interval, 1)
            expected = "the probabilities in [0, 1] that dynamic binarization needs"
        else:
            support = self.data_support
            expected = f"the support of {type(self.likelihood).__name__} ({support})"
        inside = support.check(x)
        if not bool(inside.all()):
            row = int((~inside).nonzero()[0])
            hint = (
                "; binarize grayscale data (pyro_vae.binarize) or choose a likelihood for "
                "continuous values"
                if isinstance(self.likelihood, BernoulliLikelihood) and not probabilities
                else ""
            )
            raise ValueError(
                f"{what} has values outside {expected}, first in example {row}: "
                f"{_offending_value(x[row], support)}{hint}"
            )
        self._check_dtype_and_device(x, what)
        return x

    @torch.no_grad()
    def _check_components(self) -> dist.constraints.Constraint:
        """Check every part against the contract once; return the data support."""
        ref = self._reference_tensor()
        x = torch.zeros(_CHECK_BATCH, self.data_dim, dtype=ref.dtype, device=ref.device)
        latent = (self.latent_dim,)

        prior = _call_part("prior", self.prior)
        _check_shapes("prior", prior, batch_shape=(), event_shape=latent, given="()")

        posterior = _call_part("encoder", self.encoder, x)
        _check_shapes(
            "encoder",
            posterior,
            batch_shape=(_CHECK_BATCH,),
            event_shape=latent,
            given=f"x of shape {tuple(x.shape)}",
        )
        if not posterior.has_rsample:
            raise ValueError(
                f"encoder: q(z|x) ({type(posterior).__name__}) must be reparameterized "
                "(has_rsample=True) so that gradients reach the encoder through z"
            )

        z = posterior.rsample()
        params = _call_part("decoder", self.decoder, z)
        if not isinstance(params, Tensor) or params.ndim == 0 or params.shape[0] != _CHECK_BATCH:
            raise ValueError(
                f"decoder: must return a tensor (B, ...) for z of shape {tuple(z.shape)}, got "
                + (
                    f"shape {tuple(params.shape)}"
                    if isinstance(params, Tensor)
                    else type(params).__name__
                )
            )

        observation = _call_part("likelihood", self.likelihood, params)
        _check_shapes(
            "likelihood",
            observation,
            batch_shape=(_CHECK_BATCH,),
            event_shape=(self.data_dim,),
            given=f"decoder output of shape {tuple(params.shape)}",
        )
        return observation.support


def _check_finite(x: Tensor, what: str) -> None:
    # One sum is finite only if every value is (NaN and inf propagate), so the elementwise
    # check runs only when the cheap one fails.
    if not bool(torch.isfinite(x.sum())):
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            row = int((~finite).any(dim=1).nonzero()[0])
            raise ValueError(f"{what} has NaN or infinite values (first in example {row})")


def _call_part(name: str, part: nn.Module, *args: Tensor) -> object:
    if not callable(part):
        raise ValueError(f"{name}: must be a callable nn.Module, got {type(part).__name__}")
    try:
        return part(*args)
    except ValueError as error:  # a part's own complaint: already says what is wrong
        raise ValueError(f"{name}: {error}") from error
    except Exception as error:  # re-raised with the part's name, the cause kept
        shapes = ", ".join(str(tuple(a.shape)) for a in args) or "no arguments"
        raise ValueError(f"{name}: failed when called with {shapes}: {error}") from error


def _check_shapes(
    name: str, d: object, *, batch_shape: tuple, event_shape: tuple, given: str
) -> None:
    if not isinstance(d, torch.distributions.Distribution):
        raise ValueError(f"{name}: must return a Distribution, got {type(d).__name__}")
    if tuple(d.batch_shape) != batch_shape or tuple(d.event_shape) != event_shape:
        raise ValueError(
            f"{name}: for {given} expected batch_shape {batch_shape} and event_shape "
            f"{event_shape}, got batch_shape {tuple(d.batch_shape)} and event_shape "
            f"{tuple(d.event_shape)} (declare the data dimensions with .to_event(1))"
        )


def _offending_value(row: Tensor, support: dist.constraints.Constraint) -> str:
    # The support's check on a single feature finds the first bad value in the row.
    base = getattr(support, "base_constraint", support)
    bad = (~base.check(row)).nonzero()
    if len(bad) == 0:
        return "the row as a whole"
    index = int(bad[0])
    return f"feature {index} = {row[index].item():.6g}"
