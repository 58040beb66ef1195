"""The component contract of :class:`~pyro_vae.models.vae.VAE`, checked: the shapes every part
must return, and the form of the data it is given.

These checks live apart from the Pyro programs (vae.py, m2.py, cvae.py) so that each program
reads on its own. Each raises a ``ValueError`` that names the part or the data at fault.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pyro.distributions import constraints
from torch import Tensor, nn

from pyro_vae.components.likelihoods import BernoulliLikelihood

# Two examples, not one, so that a part which mixes up the batch dimension with another one
# cannot pass the shape check by accident.
CHECK_BATCH = 2


@torch.no_grad()
def check_components(
    prior: nn.Module,
    encoder: nn.Module,
    decoder: nn.Module,
    likelihood: nn.Module,
    *,
    data_dim: int,
    latent_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> constraints.Constraint:
    """Check every part against the contract once; return the likelihood's support (the
    data's)."""
    x = torch.zeros(CHECK_BATCH, data_dim, dtype=dtype, device=device)
    latent = (latent_dim,)

    prior_distribution = call_part("prior", prior)
    check_shapes("prior", prior_distribution, batch_shape=(), event_shape=latent, given="()")

    posterior = call_part("encoder", encoder, x)
    check_shapes(
        "encoder",
        posterior,
        batch_shape=(CHECK_BATCH,),
        event_shape=latent,
        given=f"x of shape {tuple(x.shape)}",
    )
    if not posterior.has_rsample:
        raise ValueError(
            f"encoder: q(z|x) ({type(posterior).__name__}) must be reparameterized "
            "(has_rsample=True) so that gradients reach the encoder through z"
        )

    z = posterior.rsample()
    params = call_part("decoder", decoder, z)
    if not isinstance(params, Tensor) or params.ndim == 0 or params.shape[0] != CHECK_BATCH:
        got = (
            f"shape {tuple(params.shape)}" if isinstance(params, Tensor) else type(params).__name__
        )
        raise ValueError(
            f"decoder: must return a tensor (B, ...) for z of shape {tuple(z.shape)}, got {got}"
        )

    observation = call_part("likelihood", likelihood, params)
    check_shapes(
        "likelihood",
        observation,
        batch_shape=(CHECK_BATCH,),
        event_shape=(data_dim,),
        given=f"decoder output of shape {tuple(params.shape)}",
    )
    return observation.support


def check_form(x: object, what: str, data_dim: int) -> Tensor:
    """``x`` must be a floating tensor ``(N, data_dim)``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must have a floating dtype, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != data_dim:
        raise ValueError(
            f"{what} must have shape (N, {data_dim}) (N examples of data_dim="
            f"{data_dim} features; flatten images first), got {tuple(x.shape)}"
        )
    return x


def check_finite(x: Tensor, what: str, first_row: int = 0) -> None:
    """Every value of ``x`` must be finite; the error names the first example that is not,
    counting ``x``'s rows from ``first_row``."""
    # One sum is finite only if every value is (NaN and inf propagate), so the elementwise
    # check runs only when the cheap one fails.
    if not bool(torch.isfinite(x.sum())):
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            row = int((~finite).any(dim=1).nonzero()[0])
            raise ValueError(
                f"{what} has NaN or infinite values (first in example {first_row + row})"
            )


def check_dtype_and_device(x: Tensor, what: str, dtype: torch.dtype, device: torch.device) -> None:
    if (x.dtype, x.device) != (dtype, device):
        raise ValueError(
            f"{what} is {x.dtype} on {x.device} but the model is {dtype} on "
            f"{device}; convert one of them (x.to(...) or vae.to(...))"
        )


def check_support(
    x: Tensor,
    what: str,
    support: constraints.Constraint,
    expected: str,
    hint: str = "",
    first_row: int = 0,
) -> None:
    """Every example of ``x`` must lie in ``support``; the error names the first that does not
    (counting ``x``'s rows from ``first_row``) and its first offending feature."""
    inside = support.check(x)
    if not bool(inside.all()):
        row = int((~inside).nonzero()[0])
        raise ValueError(
            f"{what} has values outside {expected}, first in example {first_row + row}: "
            f"{_offending_value(x[row], support)}{hint}"
        )


def call_part(name: str, part: nn.Module, *args: Tensor) -> Any:
    # Any, as nn.Module.__call__ returns: what a part returns is for its caller to check
    # (check_shapes for a distribution, the decoder's tensor check in check_components).
    if not callable(part):
        raise ValueError(f"{name}: must be a callable nn.Module, got {type(part).__name__}")
    try:
        return part(*args)
    except ValueError as error:  # a part's own complaint: already says what is wrong
        raise ValueError(f"{name}: {error}") from error
    except Exception as error:  # re-raised with the part's name, the cause kept
        shapes = ", ".join(str(tuple(a.shape)) for a in args) or "no arguments"
        raise ValueError(f"{name}: failed when called with {shapes}: {error}") from error


def check_shapes(
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


def _offending_value(row: Tensor, support: constraints.Constraint) -> str:
    # The support's check on a single feature finds the first bad value in the row.
    base = getattr(support, "base_constraint", support)
    bad = (~base.check(row)).nonzero()
    if len(bad) == 0:
        return "the row as a whole"
    index = int(bad[0])
    return f"feature {index} = {row[index].item():.6g}"


class DataChecks:
    """What the models (VAE, M2, the CVAE) check of the data they are given, in one place.

    A model that mixes this in (through :class:`~pyro_vae.models.base.PyroProgram`, which gives
    it ``device`` and ``dtype``) has ``data_dim``, ``data_support`` (the likelihood's support,
    set when it checked its parts) and ``likelihood``; it gets ``validate_data`` (which
    :func:`~pyro_vae.infer.fit.fit` calls before any step) and ``_check_batch`` (for the inputs
    of its networks).
    """

    data_dim: int
    data_support: constraints.Constraint
    likelihood: nn.Module

    if TYPE_CHECKING:  # PyroProgram provides them to the models this is mixed into

        @property
        def device(self) -> torch.device: ...
        @property
        def dtype(self) -> torch.dtype: ...

    def _check_batch(self, x: object) -> Tensor:
        """The checks of :meth:`validate_data` that any input of the networks needs (type,
        shape, finite values, the model's dtype and device), without the likelihood's support:
        encoders take grayscale images even for a Bernoulli model."""
        x = check_form(x, "x", self.data_dim)
        check_finite(x, "x")
        check_dtype_and_device(x, "x", self.dtype, self.device)
        return x

    def validate_data(
        self, x: object, what: str = "data", *, probabilities: bool = False, first_row: int = 0
    ) -> Tensor:
        """Raise a ``ValueError`` naming the problem unless ``x`` is a finite floating tensor
        ``(N, data_dim)`` inside the likelihood's support, of the model's dtype and device;
        return it unchanged otherwise.

        :param what: how the error message names ``x``.
        :param probabilities: check for values in [0, 1] instead of the likelihood's support:
            data that will be binarized dynamically.
        :param first_row: the place of ``x``'s first row in a larger set that is checked a
            chunk at a time: the error names a row by its place in the whole set.
        """
        x = check_form(x, what, self.data_dim)
        if x.shape[0] == 0:
            raise ValueError(f"{what} is empty: it has no examples")
        check_finite(x, what, first_row)
        support: constraints.Constraint
        if probabilities:
            support = constraints.independent(constraints.unit_interval, 1)
            expected = "the probabilities in [0, 1] that dynamic binarization needs"
        else:
            support = self.data_support
            expected = f"the support of {type(self.likelihood).__name__} ({support})"
        hint = (
            "; binarize grayscale data (pyro_vae.binarize) or choose a likelihood for "
            "continuous values"
            if isinstance(self.likelihood, BernoulliLikelihood) and not probabilities
            else ""
        )
        check_support(x, what, support, expected, hint, first_row)
        check_dtype_and_device(x, what, self.dtype, self.device)
        return x
