"""The conditional VAE (Sohn, Lee & Yan 2015) as a Pyro model and guide, trained by
:func:`~pyro_vae.infer.fit.fit` like any other, and the quadrant-completion task of Pyro's
``examples/cvae``: given some quadrants of an image, generate the others.

Names: ``x`` is what the model predicts (the *missing* pixels: the only observed site), ``c``
the condition it is given (the *given* pixels, an input, never a sample site). Data go to
``fit`` as the tuple ``(x, c)``: x first, because ``fit`` checks, and binarizes for a Bernoulli
likelihood, the first tensor only, and the condition stays the grayscale input it is.

``model(x, c)``:  z ~ p(z | c) = prior(c), x ~ p(x | z, c) = likelihood(decoder([z, c])), both
in the data plate.
``guide(x, c)``:  z ~ q(z | x, c) = encoder([x, c]) in the data plate.

The parts are the package's: the encoder is any of :mod:`pyro_vae.components.encoders` built for
``data_dim + condition_dim`` inputs, the decoder an :class:`~pyro_vae.components.networks.MLP` from
``latent_dim + condition_dim``, the likelihood any of :mod:`pyro_vae.components.likelihoods`. Only
the
prior is new: :class:`ConditionalNormalPrior`, a ``PyroModule`` that takes the condition, so a
prior here is ``prior(c)`` where the VAE's is ``prior()``.

Pyro's example feeds the generation network z alone and a baseline network's prediction into
the prior network; here the decoder reads c itself, as in Sohn et al.'s p(x | z, c), and the
baseline is only the comparison (:class:`ConditionalBaseline`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule, pyro_method
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_vae._checks import check_positive_float, check_positive_int
from pyro_vae.components.encoders import DiagonalNormalEncoder
from pyro_vae.components.likelihoods import BernoulliLikelihood
from pyro_vae.components.networks import MLP, _image_shape
from pyro_vae.models import contract
from pyro_vae.plots import _figure, _save

# Each instance gets a Pyro name of its own, which prefixes its entries in Pyro's global param
# store (docs/design.md, "Pyro names"): two models with one name would share parameters.
_instance_ids = itertools.count()


def _new_name(kind: str) -> str:
    return f"{kind}{next(_instance_ids)}"


def _fresh_names(module: PyroModule, kind: str) -> None:
    # copy.deepcopy and unpickling come through __setstate__: the copy gets a name of its own
    # so that training it leaves the original's param-store entries alone. Every PyroModule
    # below it is renamed from its path, the way PyroModule names children ("parent.child"),
    # so that the outermost module, whose __setstate__ runs last, names them all.
    new = _new_name(kind)
    for path, child in module.named_modules():
        if isinstance(child, PyroModule):
            child._pyro_name = f"{new}.{path}" if path else new


# ---------------------------------------------------------------------------- the quadrant task

QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
# Pyro's examples/cvae/util.py (MaskImages): 1 given quadrant is the bottom-left, 2 the left
# half, 3 all but the bottom-right.
_GIVEN = {1: ("bottom-left",), 2: ("top-left", "bottom-left"), 3: QUADRANTS[:3]}


def quadrant_mask(image_shape: Sequence[int], given_quadrants: int) -> Tensor:
    """Which pixels of a flattened image are given (``True``) and which are to be predicted
    (``False``), for Pyro's quadrant task: 1 given quadrant is the bottom-left, 2 the left half,
    3 all but the bottom-right. The halves split at ``height // 2`` and ``width // 2`` as in
    Pyro's example; every channel gets the same mask.

    :param image_shape: ``(height, width)`` or ``(channels, height, width)``, each side at
        least 2 (so that no quadrant is empty).
    :param int given_quadrants: 1, 2 or 3.
    :returns: a bool tensor of ``channels * height * width`` elements.
    """
    # type(...) is int: True and 2.0 compare equal to 1 and 2 but are not a count of quadrants.
    if type(given_quadrants) is not int or given_quadrants not in _GIVEN:
        raise ValueError(
            f"given_quadrants must be 1, 2 or 3 (0 leaves nothing to condition on, 4 nothing "
            f"to predict), got {given_quadrants!r}"
        )
    channels, height, width = _image_shape(image_shape)
    if height < 2 or width < 2:
        raise ValueError(
            f"image_shape {tuple(image_shape)}: height and width must be at least 2, so that "
            "every quadrant has pixels"
        )
    rows, cols = height // 2, width // 2
    spans = {
        "top-left": (slice(None, rows), slice(None, cols)),
        "top-right": (slice(None, rows), slice(cols, None)),
        "bottom-left": (slice(rows, None), slice(None, cols)),
        "bottom-right": (slice(rows, None), slice(cols, None)),
    }
    mask = torch.zeros(height, width, dtype=torch.bool)
    for quadrant in _GIVEN[given_quadrants]:
        mask[spans[quadrant]] = True
    return mask.expand(channels, height, width).reshape(-1)


def check_mask(mask: object, data_dim: int | None = None) -> Tensor:
    """``mask`` must be a 1-d bool tensor (``True``: given) with at least one given pixel and
    at least one to predict, of ``data_dim`` elements when that is given; returned unchanged."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 1:
        got = (
            f"{mask.dtype} of shape {tuple(mask.shape)}"
            if isinstance(mask, Tensor)
            else type(mask).__name__
        )
        raise ValueError(f"mask must be a 1-d bool tensor (True where given), got {got}")
    if data_dim is not None and mask.numel() != data_dim:
        raise ValueError(
            f"mask has {mask.numel()} elements but the images have {data_dim} values each"
        )
    num_given = int(mask.sum())
    if num_given == mask.numel():
        raise ValueError("mask gives every pixel: it leaves nothing to predict")
    if num_given == 0:
        raise ValueError(
            "mask gives no pixel: there is no condition (for that, use an unconditional "
            "pyro_vae.VAE)"
        )
    return mask


def split_by_mask(images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, c)``: the pixels to predict and the given pixels of ``images`` ``(N, D)``, each
    ``(N, ·)`` in the images' pixel order; the tuple that :func:`~pyro_vae.infer.fit.fit` takes."""
    mask = check_mask(mask)
    images = contract.check_form(images, "images", mask.numel())
    mask = mask.to(images.device)
    return images[:, ~mask], images[:, mask]


def merge_by_mask(x: Tensor, c: Tensor, mask: Tensor) -> Tensor:
    """The images ``(..., D)`` whose missing pixels are ``x`` and given pixels ``c`` (the
    inverse of :func:`split_by_mask`); leading dimensions broadcast."""
    mask = check_mask(mask)
    num_missing, num_given = int((~mask).sum()), int(mask.sum())
    if x.shape[-1] != num_missing or c.shape[-1] != num_given:
        raise ValueError(
            f"the mask has {num_missing} missing and {num_given} given pixels; got x with "
            f"{x.shape[-1]} and c with {c.shape[-1]} values per image"
        )
    shape = torch.broadcast_shapes(x.shape[:-1], c.shape[:-1])
    images = x.new_empty(*shape, mask.numel())
    images[..., ~mask.to(x.device)] = x.expand(*shape, num_missing)
    images[..., mask.to(x.device)] = c.expand(*shape, num_given)
    return images


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
    d = contract._call_part(name, part, argument)
    contract._check_shapes(name, d, batch_shape=batch_shape, event_shape=event_shape, given=given)
    return cast(torch.distributions.Distribution, d)  # _check_shapes made sure


def _support(observation: torch.distributions.Distribution) -> constraints.Constraint:
    # The data are checked against it before training and evaluation.
    if observation.support is None:
        raise ValueError(f"likelihood: {type(observation).__name__} declares no support")
    return observation.support


def _parameters(name: str, part: nn.Module, argument: Tensor, what: str) -> Tensor:
    """``part(argument)``, which must be a tensor with the argument's batch size."""
    params = contract._call_part(name, part, argument)
    if not isinstance(params, Tensor) or params.ndim == 0 or params.shape[0] != len(argument):
        got = tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__
        raise ValueError(
            f"{name}: must return a tensor (B, ...) for {what} of shape "
            f"{tuple(argument.shape)}, got {got}"
        )
    return params


# ---------------------------------------------------------------------------- the parts


class ConditionalNormalPrior(PyroModule):
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

    def __init__(
        self,
        condition_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (400,),
        *,
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__(name=_new_name("conditional_prior"))
        self.condition_dim = check_positive_int("condition_dim", condition_dim)
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        for width in hidden_dims:
            check_positive_int("hidden_dims entries", width)
        self.min_scale = float(min_scale)
        self.net = MLP(condition_dim, tuple(hidden_dims), 2 * latent_dim)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _fresh_names(self, "conditional_prior")

    def forward(self, c: Tensor) -> dist.TorchDistribution:
        loc, raw_scale = self.net(c).chunk(2, dim=-1)
        scale = nn.functional.softplus(raw_scale) + self.min_scale
        return dist.Normal(loc, scale).to_event(1)


class _PyroProgram(PyroModule, contract.DataChecks):
    """What the CVAE and its baseline share: the data plate, the checks of (x, c), and the
    device and dtype of the parameters."""

    data_dim: int
    condition_dim: int
    likelihood: nn.Module
    data_support: constraints.Constraint
    _kind: str

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _fresh_names(self, self._kind)

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
        batch_size = x.shape[0]
        if num_data is None:
            num_data = batch_size
        elif num_data < batch_size:
            raise ValueError(
                f"num_data={num_data} is smaller than the batch of {batch_size} examples"
            )
        # subsample=x: the batch is the subsample, so Pyro scales by num_data / batch_size.
        return pyro.plate("data", size=num_data, subsample=x), c

    def validate_condition(self, c: object, num_rows: int, what: str = "condition") -> Tensor:
        """Raise a ``ValueError`` unless ``c`` is a finite floating tensor
        ``(num_rows, condition_dim)`` of the model's dtype and device."""
        c = contract.check_form(c, what, self.condition_dim)
        if c.shape[0] != num_rows:
            raise ValueError(f"{what} has {c.shape[0]} rows but x has {num_rows}")
        contract.check_finite(c, what)
        contract.check_dtype_and_device(c, what, self.dtype, self.device)
        return c


class ConditionalVAE(_PyroProgram):
    """A conditional VAE (Sohn et al. 2015): prior network p(z | c), likelihood p(x | z, c)
    with a decoder network, and the guide q(z | x, c). Trained by :func:`~pyro_vae.infer.fit.fit`
    on the tuple ``(x, c)``; its test log p(x | c) by :func:`conditional_log_likelihood`.

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

    _kind = "cvae"

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
        hidden_dims: Sequence[int] = (400,),
    ) -> None:
        super().__init__(name=_new_name(self._kind))
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

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = check_positive_float("beta", value)

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

    def _beta_scale(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.beta == 1.0 else poutine.scale(scale=self.beta)

    @pyro_method
    def model(self, x: Tensor, c: Tensor | None = None, num_data: int | None = None) -> Tensor:
        """p(z | c) p(x | z, c). ``x`` ``(B, data_dim)`` is observed, ``c`` ``(B,
        condition_dim)`` an input; ``num_data`` the dataset size for a minibatch (``None``:
        the batch is all the data). Returns the decoder's output."""
        prior, decoder, likelihood = self.prior, self.decoder, self.likelihood
        data_plate, c = self._data_plate(x, c, num_data)
        with data_plate:
            with self._beta_scale():
                z = pyro.sample("z", prior(c))
            params = decoder(_joined(z, c))
            pyro.sample("x", likelihood(params), obs=x)
        return params

    @pyro_method
    def guide(self, x: Tensor, c: Tensor | None = None, num_data: int | None = None) -> Tensor:
        """q(z | x, c); arguments as :meth:`model`. Returns the sampled z."""
        encoder = self.encoder
        data_plate, c = self._data_plate(x, c, num_data)
        with data_plate, self._beta_scale():
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


class ConditionalBaseline(_PyroProgram):
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

    _kind = "cvae_baseline"

    def __init__(
        self,
        data_dim: int,
        condition_dim: int,
        hidden_dims: Sequence[int] = (400,),
        *,
        likelihood: nn.Module | None = None,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__(name=_new_name(self._kind))
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
    hidden_dims: Sequence[int] = (400,),
) -> ConditionalVAE:
    """A :class:`ConditionalVAE` with its default parts, from plain values only: what a
    checkpoint's config (``"model": "cvae"``) holds and
    :func:`~pyro_vae.checkpoint.load_checkpoint` rebuilds. Arguments as the class's."""
    return ConditionalVAE(data_dim, condition_dim, latent_dim, beta=beta, hidden_dims=hidden_dims)


def build_cvae_baseline(
    data_dim: int, condition_dim: int, *, hidden_dims: Sequence[int] = (400,)
) -> ConditionalBaseline:
    """A :class:`ConditionalBaseline` with its default MLP and likelihood, from plain values
    only (a checkpoint's ``"model": "cvae-baseline"``). Arguments as the class's."""
    return ConditionalBaseline(data_dim, condition_dim, hidden_dims)


# ---------------------------------------------------------------------------- evaluation


def _log_weights(module: _PyroProgram, x: Tensor, c: Tensor) -> Tensor:
    """log p(x, z | c) − log q(z | x, c) per row, one z ~ q per row, read off a trace of the
    guide replayed into the model: the importance weights of RenyiELBO / IWAE, from the
    unscaled log-densities (neither β nor a minibatch scale belongs in log p(x | c))."""
    guide_trace = poutine.trace(module.guide).get_trace(x, c)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(x, c)
    log_weight = x.new_zeros(x.shape[0])
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace = prune_subsample_sites(trace)
        trace.compute_log_prob()
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if not site["cond_indep_stack"]:
                raise ValueError(
                    f"site {name!r} is outside the data plate (a global latent): "
                    "conditional_log_likelihood integrates over per-example latents only"
                )
            log_weight = log_weight + sign * site["unscaled_log_prob"]
    return log_weight


@torch.no_grad()
def conditional_log_likelihood(
    module: ConditionalVAE | ConditionalBaseline,
    x: Tensor,
    c: Tensor,
    num_particles: int = 1000,
    chunk_size: int = 4096,
    progress: bool | None = None,
) -> Tensor:
    """Per-example importance-weighted estimate of log p(x | c) in nats, ``(N,)``:

        log (1/K) Σ_k p(x | z_k, c) p(z_k | c) / q(z_k | x, c),   z_k ~ q(z | x, c),

    ``K = num_particles`` (Burda et al.'s bound, conditioned on c: the one Pyro's
    ``RenyiELBO(alpha=0, num_particles=K)`` trains). Its exponential is an unbiased estimate
    of p(x | c); the log is a lower bound in expectation that tends to log p(x | c) as K
    grows. For :class:`ConditionalBaseline`, which has no latent, every weight is
    log p(x | c) itself, exact for any K (pass ``num_particles=1``).

    Work is done in chunks of at most ``chunk_size`` (example, particle) rows per forward
    pass, combined with a running log-sum-exp, so memory stays bounded for any K and the
    chunk size does not change the value.

    :param x: the part to predict ``(N, data_dim)``, in the likelihood's support (binarized,
        for a Bernoulli likelihood).
    :param c: the condition ``(N, condition_dim)``.
    :param progress: show a progress bar over the chunks; ``None``: only on a terminal.
    """
    if not isinstance(module, _PyroProgram):
        raise ValueError(
            f"module must be a ConditionalVAE or ConditionalBaseline, got {type(module).__name__}"
        )
    x = module.validate_data(x, "x")
    c = module.validate_condition(c, x.shape[0])
    check_positive_int("num_particles", num_particles)
    check_positive_int("chunk_size", chunk_size)
    examples_per_chunk = max(1, min(len(x), chunk_size))
    particles_per_chunk = max(1, chunk_size // examples_per_chunk)
    chunks = [
        (start_row, min(particles_per_chunk, num_particles - start))
        for start_row in range(0, len(x), examples_per_chunk)
        for start in range(0, num_particles, particles_per_chunk)
    ]
    results: list[Tensor] = []
    running: Tensor | None = None
    done = 0
    for start_row, count in tqdm(
        chunks, desc="log p(x|c)", disable=None if progress is None else not progress
    ):
        rows = slice(start_row, start_row + examples_per_chunk)
        xb, cb = x[rows], c[rows]
        # One pass over `count` copies of the batch: row k * n + i is particle k of example i.
        log_weights = _log_weights(module, xb.repeat(count, 1), cb.repeat(count, 1))
        chunk_lse = torch.logsumexp(log_weights.reshape(count, len(xb)), dim=0)
        # A new batch of examples starts at its first chunk of particles.
        running = chunk_lse if running is None or done == 0 else torch.logaddexp(running, chunk_lse)
        done += count
        if done == num_particles:
            results.append(running - math.log(num_particles))
            done = 0
    return torch.cat(results)


class ConditionalELBOTerms(NamedTuple):
    """Per-example terms of the conditional ELBO, in nats, ``(N,)`` each, from one draw
    z ~ q(z | x, c) per example: ``reconstruction`` log p(x | z, c), ``kl`` the Monte-Carlo
    estimate log q(z | x, c) − log p(z | c) of KL(q(z | x, c) ‖ p(z | c)) (0 for the baseline,
    which has no latent). ``elbo`` is their difference, the K=1 case of
    :func:`conditional_log_likelihood`: a lower bound on log p(x | c) in expectation."""

    reconstruction: Tensor
    kl: Tensor

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl


@torch.no_grad()
def conditional_elbo_terms(
    module: ConditionalVAE | ConditionalBaseline, x: Tensor, c: Tensor, chunk_size: int = 4096
) -> ConditionalELBOTerms:
    """The :class:`ConditionalELBOTerms` of ``x`` given ``c``, read off the log-densities of a
    guide trace replayed into the model (unscaled: neither β nor a minibatch scale), in chunks
    of ``chunk_size`` examples: cheap enough to watch each epoch, where
    :func:`conditional_log_likelihood` with many particles is the final score."""
    if not isinstance(module, _PyroProgram):
        raise ValueError(
            f"module must be a ConditionalVAE or ConditionalBaseline, got {type(module).__name__}"
        )
    x = module.validate_data(x, "x")
    c = module.validate_condition(c, x.shape[0])
    check_positive_int("chunk_size", chunk_size)
    reconstruction, kl = [], []
    for xb, cb in zip(x.split(chunk_size), c.split(chunk_size), strict=True):
        guide_trace = prune_subsample_sites(poutine.trace(module.guide).get_trace(xb, cb))
        model_trace = prune_subsample_sites(
            poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(xb, cb)
        )
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        observed = xb.new_zeros(len(xb))
        divergence = xb.new_zeros(len(xb))
        for site in model_trace.nodes.values():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                observed = observed + site["unscaled_log_prob"]
            else:
                divergence = divergence - site["unscaled_log_prob"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                divergence = divergence + site["unscaled_log_prob"]
        reconstruction.append(observed)
        kl.append(divergence)
    return ConditionalELBOTerms(torch.cat(reconstruction), torch.cat(kl))


@torch.no_grad()
def sample_spread(cvae: ConditionalVAE, c: Tensor, num_particles: int = 100) -> Tensor:
    """How much the CVAE's completions vary for one condition: the standard deviation over
    ``num_particles`` draws z ~ p(z | c) of the likelihood's mean, averaged over the predicted
    features, ``(B,)``. 0 would mean a deterministic map, like the baseline's."""
    if check_positive_int("num_particles", num_particles) < 2:
        raise ValueError("sample_spread needs num_particles >= 2 for a standard deviation")
    return cvae.sample(c, num_particles).std(0).mean(-1)


# ---------------------------------------------------------------------------- the figure


class Completions(NamedTuple):
    """The rows of the completion figure, each a batch of flattened images ``(B, D)``
    (``samples``: ``(num_completions, B, D)``). The predicted rows keep the given pixels and fill
    in the missing ones, as Pyro's example does; ``inputs`` has NaN where pixels are missing."""

    inputs: Tensor
    truth: Tensor
    baseline: Tensor
    samples: Tensor
    mask: Tensor
    image_shape: tuple[int, int, int]


@torch.no_grad()
def completions(
    cvae: ConditionalVAE,
    baseline: ConditionalBaseline,
    images: Tensor,
    mask: Tensor,
    image_shape: Sequence[int],
    num_completions: int = 5,
) -> Completions:
    """The figure's data for ``images`` ``(B, D)``: inputs (given pixels only), ground truth,
    the baseline's prediction and ``num_completions`` CVAE completions of each, one draw
    z ~ p(z | c) apiece."""
    shape = _image_shape(image_shape)
    images = contract.check_form(images, "images", math.prod(shape))
    mask = check_mask(mask, images.shape[1]).to(images.device)
    x, c = split_by_mask(images, mask)
    if cvae.data_dim != x.shape[1] or cvae.condition_dim != c.shape[1]:
        raise ValueError(
            f"the mask splits images into {x.shape[1]} missing and {c.shape[1]} given pixels; "
            f"the CVAE predicts {cvae.data_dim} from {cvae.condition_dim}"
        )
    if baseline.data_dim != x.shape[1] or baseline.condition_dim != c.shape[1]:
        raise ValueError(
            f"the mask splits images into {x.shape[1]} missing and {c.shape[1]} given pixels; "
            f"the baseline predicts {baseline.data_dim} from {baseline.condition_dim}"
        )
    inputs = merge_by_mask(torch.full_like(x, math.nan), c, mask)
    return Completions(
        inputs=inputs,
        truth=images,
        baseline=merge_by_mask(baseline.predict(c), c, mask),
        samples=merge_by_mask(cvae.sample(c, num_completions), c, mask),
        mask=mask,
        image_shape=shape,
    )


def plot_completions(figure_data: Completions, path: str | os.PathLike | None = None) -> Any:
    """Draw :func:`completions` as a grid, one column per image: inputs (missing pixels in
    red), truth, baseline, then one row per CVAE sample. Saved to ``path`` (PNG unless its
    suffix names another format) when given; returns the matplotlib ``Figure``.

    A bare ``Figure``, never pyplot, and matplotlib imported here, not with the module, for the
    reasons in :mod:`pyro_vae.plots`."""
    from matplotlib import colormaps

    channels, height, width = figure_data.image_shape
    rows = [
        ("inputs", figure_data.inputs),
        ("truth", figure_data.truth),
        ("baseline", figure_data.baseline),
        *((f"CVAE {k + 1}", s) for k, s in enumerate(figure_data.samples)),
    ]
    num_images = figure_data.truth.shape[0]
    fig = _figure(figsize=(0.9 * num_images + 0.8, 0.9 * len(rows)))
    axes = fig.subplots(len(rows), num_images, squeeze=False)
    cmap = colormaps["gray"].with_extremes(bad="tab:red")
    for r, (label, batch) in enumerate(rows):
        for i in range(num_images):
            image = batch[i].detach().cpu().reshape(channels, height, width)
            ax = axes[r][i]
            if channels == 1:
                ax.imshow(image[0].numpy(), cmap=cmap, vmin=0.0, vmax=1.0)
            else:
                ax.imshow(image.permute(1, 2, 0).nan_to_num(0.0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if path is not None:
        _save(fig, path)
    return fig
