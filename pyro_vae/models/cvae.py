"""The conditional VAE (Sohn, Lee & Yan 2015) as a Pyro model and guide, trained by
:func:`~pyro_vae.infer.fit.fit` like any other, and its deterministic baseline, for the
quadrant-completion task of Pyro's ``examples/cvae`` (:mod:`pyro_vae.models.masks`): given some
quadrants of an image, generate the others. What is measured of them:
:mod:`pyro_vae.models.cvae_estimators`.

Names: ``x`` is what the model predicts (the *missing* pixels: the only observed site), ``c``
the condition it is given (the *given* pixels, an input, never a sample site). Data go to
``fit`` as the tuple ``(x, c)``: x first, because ``fit`` checks, and binarizes for a Bernoulli
likelihood, the first tensor only, and the condition stays the grayscale input it is.

``model(x, c)``:  z ~ p(z | c) = prior(c), x ~ p(x | z, c) = likelihood(decoder([z, c])), both
in the data plate.
``guide(x, c)``:  z ~ q(z | x, c) = encoder([x, c]) in the data plate.

The parts are the package's: the encoder is any of :mod:`pyro_vae.components.encoders` built
for ``data_dim + condition_dim`` inputs, the decoder an
:class:`~pyro_vae.components.networks.MLP` from ``latent_dim + condition_dim``, the likelihood
any of :mod:`pyro_vae.components.likelihoods`. Only the prior is new:
:class:`ConditionalNormalPrior`, a ``PyroModule`` that takes the condition, so a prior here is
``prior(c)`` where the VAE's is ``prior()``.

Pyro's example feeds the generation network z alone and a baseline network's prediction into
the prior network; here the decoder reads c itself, as in Sohn et al.'s p(x | z, c), and the
baseline is only the comparison (:class:`ConditionalBaseline`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import pyro_method
from torch import Tensor, nn

from pyro_vae._checks import check_positive_int
from pyro_vae.components.encoders import DiagonalNormalEncoder
from pyro_vae.components.likelihoods import BernoulliLikelihood
from pyro_vae.components.networks import DEFAULT_HIDDEN_DIMS, MLP
from pyro_vae.models import contract
from pyro_vae.models.base import BetaScaled, NamedPyroModule, PyroProgram, data_plate


def _joined(z: Tensor, c: Tensor) -> Tensor:
    """[z, c] for the decoder; c broadcast over z's leading dimensions (draws of z, or the
    particles of an ELBO with ``vectorize_particles=True``)."""
    return torch.cat([z, c.expand(*z.shape[:-1], c.shape[-1])], -1)


def _is_2d(x: object) -> bool:
    return isinstance(x, Tensor) and x.ndim == 2


def _distribution(
    name: str,
    part: nn.Module,
    argument: Tensor,
    *,
    batch_shape: tuple[int, ...],
    event_shape: tuple[int, ...],
    given: str,
) -> torch.distributions.Distribution:
    """``part(argument)``, which must be a distribution of these shapes (the contract's checks,
    each error naming the part)."""
    d = contract.call_part(name, part, argument)
    contract.check_shapes(name, d, batch_shape=batch_shape, event_shape=event_shape, given=given)
    return cast(torch.distributions.Distribution, d)  # check_shapes made sure


def _support(observation: torch.distributions.Distribution) -> constraints.Constraint:
    # The data are checked against it before training and evaluation.
    if observation.support is None:
        raise ValueError(f"likelihood: {type(observation).__name__} declares no support")
    return observation.support


def _parameters(name: str, part: nn.Module, argument: Tensor, what: str) -> Tensor:
    """``part(argument)``, which must be a tensor with the argument's batch size."""
    params = contract.call_part(name, part, argument)
    if not isinstance(params, Tensor) or params.ndim == 0 or params.shape[0] != len(argument):
        got = tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__
        raise ValueError(
            f"{name}: must return a tensor (B, ...) for {what} of shape "
            f"{tuple(argument.shape)}, got {got}"
        )
    return params


# ---------------------------------------------------------------------------- the parts


class ConditionalNormalPrior(NamedPyroModule):
    """The prior network of a conditional VAE, p(z | c) = N(μ(c), diag σ(c)²): the package's
    idea of a prior, a module that returns p(z), extended to one that takes the condition.
    ``forward(c)`` maps ``(B, condition_dim)`` to a distribution with ``batch_shape == (B,)``
    and ``event_shape == (latent_dim,)``.

    μ and σ are the two halves of an :class:`~pyro_vae.components.networks.MLP`'s output;
    σ(c) = softplus(raw) + ``min_scale``, as the encoders do.

    :param int condition_dim: the size of c.
    :param int latent_dim: the size of z.
    :param hidden_dims: the MLP's hidden widths; ``()`` for a linear map (a linear-Gaussian
        prior).
    :param float min_scale: the smallest σ.
    """

    pyro_kind = "conditional_prior"

    def __init__(
        self,
        condition_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        *,
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        self.condition_dim = check_positive_int("condition_dim", condition_dim)
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        for width in hidden_dims:
            check_positive_int("hidden_dims entries", width)
        self.min_scale = float(min_scale)
        self.net = MLP(condition_dim, tuple(hidden_dims), 2 * latent_dim)

    def forward(self, c: Tensor) -> dist.TorchDistribution:
        loc, raw_scale = self.net(c).chunk(2, dim=-1)
        scale = nn.functional.softplus(raw_scale) + self.min_scale
        return dist.Normal(loc, scale).to_event(1)


class _Conditioned(PyroProgram):
    """What the CVAE and its baseline add to every program: the checks of the condition c."""

    condition_dim: int

    def _data_plate(
        self, x: Tensor, c: Tensor | None, num_data: int | None
    ) -> tuple[pyro.plate, Tensor]:
        """The data plate of the batch, and the condition, checked."""
        # Shapes only, every call (a few integer comparisons): a condition of the wrong shape
        # is refused here, before fit's first step, rather than deep inside a network.
        if not _is_2d(x) or x.shape[1] != self.data_dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.data_dim}), got {got}")
        if c is None:
            raise ValueError(
                f"{type(self).__name__} needs the condition c: pass data as the tuple (x, c)"
            )
        if not _is_2d(c) or c.shape != (x.shape[0], self.condition_dim):
            got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(
                f"the condition c must have shape ({x.shape[0]}, {self.condition_dim}) for x of "
                f"shape {tuple(x.shape)}, got {got}"
            )
        return data_plate(x, num_data), c

    def validate_condition(self, c: object, num_rows: int, what: str = "condition") -> Tensor:
        """Raise a ``ValueError`` unless ``c`` is a finite floating tensor
        ``(num_rows, condition_dim)`` of the model's dtype and device."""
        c = contract.check_form(c, what, self.condition_dim)
        if c.shape[0] != num_rows:
            raise ValueError(f"{what} has {c.shape[0]} rows but x has {num_rows}")
        contract.check_finite(c, what)
        contract.check_dtype_and_device(c, what, self.dtype, self.device)
        return c


class ConditionalVAE(BetaScaled, _Conditioned):
    """A conditional VAE (Sohn et al. 2015): prior network p(z | c), likelihood p(x | z, c)
    with a decoder network, and the guide q(z | x, c). Trained by :func:`~pyro_vae.infer.fit.fit`
    on the tuple ``(x, c)``; its test log p(x | c) by
    :func:`~pyro_vae.models.cvae_estimators.conditional_log_likelihood`.

    Every part is an optional keyword; ``None`` gives the documented default:

    - ``prior(c)`` -> distribution, ``batch_shape == (B,)``, ``event_shape == (latent_dim,)``;
      default :class:`ConditionalNormalPrior` with an MLP of ``hidden_dims``.
    - ``encoder(torch.cat([x, c], -1))`` -> reparameterized distribution of the same shapes;
      default :class:`~pyro_vae.components.encoders.DiagonalNormalEncoder` for ``data_dim +
      condition_dim`` inputs (any encoder of the package fits).
    - ``decoder(torch.cat([z, c], -1))`` -> tensor ``(B, ...)``, the likelihood's parameters;
      default an :class:`~pyro_vae.components.networks.MLP` with ``hidden_dims`` reversed.
    - ``likelihood(params)`` -> distribution, ``batch_shape == (B,)``, ``event_shape ==
      (data_dim,)``; default :class:`~pyro_vae.components.likelihoods.BernoulliLikelihood`.

    :param int data_dim: the size of x, the part to predict.
    :param int condition_dim: the size of c, the given part.
    :param int latent_dim: the size of z.
    :param float beta: weight of the KL term; scales the ``z`` site in model and guide
        (docs/design.md, "β"), so that ``fit``'s KL warm-up works as for the VAE.
    :param hidden_dims: hidden widths of the default networks.
    """

    pyro_kind = "cvae"

    def __init__(
        self,
        data_dim: int,
        condition_dim: int,
        latent_dim: int,
        *,
        prior: nn.Module | None = None,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        likelihood: nn.Module | None = None,
        beta: float = 1.0,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
    ) -> None:
        super().__init__()
        self.data_dim = check_positive_int("data_dim", data_dim)
        self.condition_dim = check_positive_int("condition_dim", condition_dim)
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        for width in hidden_dims:
            check_positive_int("hidden_dims entries", width)
        self.beta = beta
        self.prior = (
            ConditionalNormalPrior(condition_dim, latent_dim, hidden_dims)
            if prior is None
            else prior
        )
        self.encoder = (
            DiagonalNormalEncoder(data_dim + condition_dim, latent_dim, hidden_dims)
            if encoder is None
            else encoder
        )
        self.decoder = (
            MLP(latent_dim + condition_dim, tuple(reversed(hidden_dims)), data_dim)
            if decoder is None
            else decoder
        )
        self.likelihood = BernoulliLikelihood() if likelihood is None else likelihood
        self.data_support = self._check_components()

    @torch.no_grad()
    def _check_components(self) -> constraints.Constraint:
        """Every part against the contract above, once; the likelihood's support."""
        batch = contract.CHECK_BATCH
        dtype, device = self.dtype, self.device
        x = torch.zeros(batch, self.data_dim, dtype=dtype, device=device)
        c = torch.zeros(batch, self.condition_dim, dtype=dtype, device=device)
        latent = (self.latent_dim,)
        # On a fork of the random state: building a model draws nothing from it.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _distribution(
                "prior", self.prior, c, batch_shape=(batch,), event_shape=latent, given="c"
            )
            xc = torch.cat([x, c], -1)
            posterior = _distribution(
                "encoder",
                self.encoder,
                xc,
                batch_shape=(batch,),
                event_shape=latent,
                given="[x, c]",
            )
            if not posterior.has_rsample:
                raise ValueError(
                    f"encoder: q(z|x,c) ({type(posterior).__name__}) must be reparameterized "
                    "(has_rsample=True) so that gradients reach the encoder through z"
                )
            params = _parameters("decoder", self.decoder, _joined(posterior.rsample(), c), "[z, c]")
            observation = _distribution(
                "likelihood",
                self.likelihood,
                params,
                batch_shape=(batch,),
                event_shape=(self.data_dim,),
                given="decoder output",
            )
        return _support(observation)

    @pyro_method
    def model(self, x: Tensor, c: Tensor | None = None, num_data: int | None = None) -> Tensor:
        """p(z | c) p(x | z, c). ``x`` ``(B, data_dim)`` is observed, ``c`` ``(B,
        condition_dim)`` an input; ``num_data`` the dataset size for a minibatch (``None``:
        the batch is all the data). Returns the decoder's output."""
        prior, decoder, likelihood = self.prior, self.decoder, self.likelihood
        data_plate, c = self._data_plate(x, c, num_data)
        with data_plate:
            with self.beta_scale():
                z = pyro.sample("z", prior(c))
            params = decoder(_joined(z, c))
            pyro.sample("x", likelihood(params), obs=x)
        return params

    @pyro_method
    def guide(self, x: Tensor, c: Tensor | None = None, num_data: int | None = None) -> Tensor:
        """q(z | x, c); arguments as :meth:`model`. Returns the sampled z."""
        encoder = self.encoder
        data_plate, c = self._data_plate(x, c, num_data)
        with data_plate, self.beta_scale():
            return pyro.sample("z", encoder(torch.cat([x, c], -1)))

    @torch.no_grad()
    def sample(self, c: Tensor, num_samples: int = 1) -> Tensor:
        """Completions of each condition: the likelihood's mean at ``num_samples`` draws
        z ~ p(z | c) per row of ``c``, ``(num_samples, B, data_dim)`` (the mean, pixel
        probabilities for Bernoulli, rather than a noisy draw: what a person looks at)."""
        check_positive_int("num_samples", num_samples)
        c = self.validate_condition(c, len(c) if isinstance(c, Tensor) else 0)
        z = self.prior(c).sample((num_samples,))
        params = self.decoder(_joined(z, c))
        return self.likelihood(params).mean


class ConditionalBaseline(_Conditioned):
    """The deterministic baseline of the CVAE: a plain network from the given part c to the
    likelihood's parameters of the missing part x, p(x | c) = likelihood(net(c)), with no
    latent. As a Pyro program (x observed in the data plate, an empty guide), ``fit`` trains
    it on the same ``(x, c)`` tuple as the CVAE, with the same budget, binarization and N/B
    scaling; ``Trace_ELBO`` then is exactly −log p(x | c), the masked binary cross-entropy
    of Pyro's ``baseline.py``.

    :param int data_dim: the size of x.
    :param int condition_dim: the size of c.
    :param hidden_dims: hidden widths of the MLP.
    :param likelihood: default :class:`~pyro_vae.components.likelihoods.BernoulliLikelihood`.
    :param net: a network ``(B, condition_dim) -> (B, ...)`` instead of the MLP.
    """

    pyro_kind = "cvae_baseline"

    def __init__(
        self,
        data_dim: int,
        condition_dim: int,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        *,
        likelihood: nn.Module | None = None,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.data_dim = check_positive_int("data_dim", data_dim)
        self.condition_dim = check_positive_int("condition_dim", condition_dim)
        for width in hidden_dims:
            check_positive_int("hidden_dims entries", width)
        self.net = MLP(condition_dim, tuple(hidden_dims), data_dim) if net is None else net
        self.likelihood = BernoulliLikelihood() if likelihood is None else likelihood
        with torch.no_grad():
            c = torch.zeros(contract.CHECK_BATCH, condition_dim, dtype=self.dtype)
            params = _parameters("net", self.net, c.to(self.device), "c")
            observation = _distribution(
                "likelihood",
                self.likelihood,
                params,
                batch_shape=(contract.CHECK_BATCH,),
                event_shape=(data_dim,),
                given="the network's output",
            )
        self.data_support = _support(observation)

    @pyro_method
    def model(self, x: Tensor, c: Tensor | None = None, num_data: int | None = None) -> Tensor:
        """p(x | c); arguments as :meth:`ConditionalVAE.model`."""
        net, likelihood = self.net, self.likelihood
        data_plate, c = self._data_plate(x, c, num_data)
        with data_plate:
            params = net(c)
            pyro.sample("x", likelihood(params), obs=x)
        return params

    @pyro_method
    def guide(self, x: Tensor, c: Tensor | None = None, num_data: int | None = None) -> None:
        """Nothing to infer: the model has no latent. Checks the arguments like the model."""
        self._data_plate(x, c, num_data)

    @torch.no_grad()
    def predict(self, c: Tensor) -> Tensor:
        """The likelihood's mean of x given c, ``(B, data_dim)``: the baseline's prediction."""
        c = self.validate_condition(c, len(c) if isinstance(c, Tensor) else 0)
        return self.likelihood(self.net(c)).mean


def build_cvae(
    data_dim: int,
    condition_dim: int,
    latent_dim: int,
    *,
    beta: float = 1.0,
    hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
) -> ConditionalVAE:
    """A :class:`ConditionalVAE` with its default parts, from plain values only: what a
    checkpoint's config (``"model": "cvae"``) holds and
    :func:`~pyro_vae.checkpoint.load_checkpoint` rebuilds. Arguments as the class's."""
    return ConditionalVAE(data_dim, condition_dim, latent_dim, beta=beta, hidden_dims=hidden_dims)


def build_cvae_baseline(
    data_dim: int, condition_dim: int, *, hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS
) -> ConditionalBaseline:
    """A :class:`ConditionalBaseline` with its default MLP and likelihood, from plain values
    only (a checkpoint's ``"model": "cvae-baseline"``). Arguments as the class's."""
    return ConditionalBaseline(data_dim, condition_dim, hidden_dims)
