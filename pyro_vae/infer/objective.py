"""The unit that :func:`~pyro_vae.infer.fit.fit` trains: a model, its guide and a Pyro ELBO, as one
object.

It knows nothing of VAEs. Whatever Pyro finds in the model and the guide is what it trains: the
``nn.Parameter``s of every module they read (``pyro.module`` / ``PyroModule``), ``PyroParam``s,
bare ``pyro.param`` statements, and parameters created lazily on the first call (autoguides).
That is the set ``pyro.infer.SVI`` trains, found the way SVI finds it: from the param sites of a
trace of the model and guide.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, RenyiELBO, TraceMeanField_ELBO
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor, nn
from torch.distributions import kl_divergence
from torch.overrides import TorchFunctionMode
from torch.utils.data import TensorDataset

from pyro_vae._distributions import describe
from pyro_vae._sites import site_distribution


class Objective:
    """``loss`` applied to ``module.model`` and ``module.guide``.

    :param module: any object with ``model`` and ``guide`` callables that take a batch's
        tensors and ``num_data=`` (the dataset size, for the data plate's N/B scaling); a
        :class:`~pyro_vae.VAE`, or a model of one's own.
    :param loss: a Pyro ELBO estimator.
    """

    def __init__(self, module: Any, loss: ELBO) -> None:
        model, guide = getattr(module, "model", None), getattr(module, "guide", None)
        if not (callable(model) and callable(guide)):
            raise ValueError(_NO_MODEL_AND_GUIDE.format(kind=type(module).__name__))
        for role, function in (("model", model), ("guide", guide)):
            if not _takes_num_data(function):
                raise ValueError(
                    _NUM_DATA_CONTRACT.format(role=role, name=_name(function), idiom=_PLATE_IDIOM)
                )
        if not isinstance(loss, ELBO):
            raise ValueError(f"loss must be a pyro.infer.ELBO, got {type(loss).__name__}")
        self.module, self.model, self.guide, self.loss = module, model, guide, loss
        # RenyiELBO's log-sum-exp over particles must see each example's unscaled
        # log-weights, so it runs on the minibatch alone and the N / B scale is applied to its
        # result afterwards (docs/design.md, "IWAE and N/B").
        self.scale_outside = isinstance(loss, RenyiELBO)
        self.global_sites: list[str] = []
        self.trained: list[Tensor] = []

    def parameters(self, *batch: Tensor, num_data: int) -> list[Tensor]:
        """Run the guide and the model once on ``batch`` and return every parameter Pyro finds
        in them, in a fixed order (the module's own ``parameters()`` order first, then the rest
        in the order of the trace); parameters created lazily are created here.

        It draws from torch's random state on a fork, so the training that follows draws the
        same numbers as if this had not run.

        :raises ValueError: when a latent site of the model has no site in the guide, or a
            parameter of the module takes no part in either (training would leave it as it is).
        """
        device = batch[0].device
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            pyro.validation_enabled(False),
            poutine.trace(param_only=True) as param_capture,
        ):
            guide_trace = poutine.trace(self.guide).get_trace(*batch, num_data=num_data)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(
                *batch, num_data=num_data
            )
        self._check_traces(model_trace, guide_trace)
        # A module that composes its own batches (epoch_order: M2's labelled rows in every
        # batch) weighs its parts itself, and the first rows traced here are none of them.
        if len(batch[0]) < num_data and not callable(getattr(self.module, "epoch_order", None)):
            _check_scaled(model_trace, len(batch[0]), num_data)
        found: dict[int, Tensor] = {}
        for site in param_capture.trace.nodes.values():
            # A param site's value is the constrained tensor, on which Pyro's param store hangs
            # the leaf that is trained (Any: Pyro types it as an optional anything).
            value: Any = site["value"]
            unconstrained = value.unconstrained()
            found.setdefault(id(unconstrained), unconstrained)
        own = list(self.module.parameters()) if isinstance(self.module, nn.Module) else []
        unused = [
            name
            for name, parameter in _named_parameters(self.module)
            if parameter.requires_grad and id(parameter) not in found
        ]
        if unused:
            raise ValueError(
                f"parameters {', '.join(unused)} of {type(self.module).__name__} take no part "
                "in its model or guide, so training would leave them as they are; read the "
                "modules that hold them inside a pyro_method (or register them with pyro.module)"
            )
        own_ids = {id(p) for p in own}
        self.trained = [p for p in own if id(p) in found] + [
            p for key, p in found.items() if key not in own_ids
        ]
        return self.trained

    def _check_traces(self, model_trace: poutine.Trace, guide_trace: poutine.Trace) -> None:
        model_trace, guide_trace = (
            prune_subsample_sites(model_trace),
            prune_subsample_sites(guide_trace),
        )
        latent = [
            name
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            # TraceEnum_ELBO sums enumerated sites out in the model: they need no guide.
            and not (site["infer"] or {}).get("enumerate")
        ]
        guided = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
        missing = [name for name in latent if name not in guided]
        if missing:
            raise ValueError(
                f"the model's latent site(s) {', '.join(repr(n) for n in missing)} have no "
                "site of the same name in the guide, so their values would be drawn from the "
                "prior at every step and never learned. Give them a guide: a decoder with random "
                "weights provides a guide() method that samples them (pyro_vae.BayesianMLP "
                "does), or the guide samples each of those sites itself (for example through "
                "pyro.infer.autoguide.AutoNormal over them)"
            )
        if isinstance(self.loss, TraceMeanField_ELBO):
            for name in latent:
                q = site_distribution(guide_trace.nodes[name])
                p = site_distribution(model_trace.nodes[name])
                try:
                    kl_divergence(q, p)
                except NotImplementedError:
                    warnings.warn(
                        f"TraceMeanField_ELBO: no closed-form KL is registered between the "
                        f"guide's {describe(q)} and the model's {describe(p)} at site "
                        f"{name!r}, so Pyro estimates this KL by Monte Carlo, as Trace_ELBO does",
                        stacklevel=4,
                    )
        # Latents outside every plate (a Bayesian decoder's weights) count once per step.
        self.global_sites = [n for n in latent if not model_trace.nodes[n]["cond_indep_stack"]]
        if self.scale_outside and self.global_sites:
            raise ValueError(
                "RenyiELBO (IWAE) cannot train a model with global latents "
                f"({', '.join(self.global_sites)}): "
                "fit scales the minibatch's bound by N/B outside the log-sum-exp, which would "
                "count their KL N/B times per step; use Trace_ELBO or TraceMeanField_ELBO"
            )

    def loss_and_grads(self, *batch: Tensor, num_data: int) -> float:
        """Pyro's loss for the whole dataset estimated from ``batch`` (N / B times the
        minibatch's), with its gradients accumulated into the parameters' ``.grad``. Call
        :meth:`parameters` first."""
        # Pyro's ELBO base class declares no loss_and_grads, but every estimator Pyro ships
        # defines it (SVI calls it the same way).
        loss_and_grads: Callable[..., float] = self.loss.loss_and_grads  # type: ignore[attr-defined]
        if not self.scale_outside:
            return loss_and_grads(self.model, self.guide, *batch, num_data=num_data)
        loss = loss_and_grads(self.model, self.guide, *batch)
        factor = num_data / len(batch[0])
        for parameter in self.trained:
            if parameter.grad is not None:
                parameter.grad.mul_(factor)
        return loss * factor

    def differentiable_loss(self, *batch: Tensor, num_data: int) -> Tensor:
        """The loss of :meth:`loss_and_grads` as a tensor whose backward gives its gradients,
        without back-propagating: what a ``torch.nn.Module``'s forward returns (for
        ``DistributedDataParallel``, :mod:`pyro_vae.infer.distributed`). Call :meth:`parameters`
        first.

        Pyro's ``differentiable_loss`` where the estimator has one. ``RenyiELBO`` has none: its
        ``loss_and_grads`` builds the surrogate loss and calls its ``backward()``; that call is
        caught here, so the surrogate is Pyro's own, returned with the value of Pyro's loss and
        scaled by N / B outside the log-sum-exp, as in :meth:`loss_and_grads`."""
        if not self.scale_outside:
            differentiable: Callable[..., Tensor] = self.loss.differentiable_loss  # type: ignore[attr-defined]
            return differentiable(self.model, self.guide, *batch, num_data=num_data)
        loss_and_grads: Callable[..., float] = self.loss.loss_and_grads  # type: ignore[attr-defined]
        with _CatchBackward() as caught:
            value = loss_and_grads(self.model, self.guide, *batch)
        factor = num_data / len(batch[0])
        if caught.tensor is None:  # nothing to train in this batch's traces
            return torch.tensor(value * factor)
        surrogate = caught.tensor
        # The surrogate's gradient with the loss's value (they differ: the surrogate weighs
        # each particle by its detached normalized importance weight).
        return (surrogate + (value - surrogate.detach())) * factor


class _CatchBackward(TorchFunctionMode):
    """Keeps the tensor whose ``backward()`` is called, instead of back-propagating."""

    def __init__(self) -> None:
        super().__init__()
        self.tensor: Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is Tensor.backward:
            self.tensor = args[0]
            return None
        return func(*args, **(kwargs or {}))


_PLATE_IDIOM = 'with pyro.plate("data", size=num_data, subsample=x): pyro.sample("obs", ..., obs=y)'

_NO_MODEL_AND_GUIDE = (
    "fit needs a model and its guide: pass the two functions as a pair, "
    "fit((model, guide), data, ...), for example guide = "
    "pyro.infer.autoguide.AutoNormal(model), or an object with model and guide methods; "
    "got {kind}"
)

_NUM_DATA_CONTRACT = (
    "the {role} {name!r} takes no num_data argument. fit calls model(*batch, num_data=N) and "
    "guide(*batch, num_data=N), with batch a minibatch of B rows of the data's tensors and N "
    "the number of rows in all the data; the model weighs each minibatch by N/B through its "
    "data plate: def model(x, y, num_data=None): ... {idiom} "
    '(pyro.plate("data", num_data, subsample_size=len(x)) scales alike; a guide with no use '
    "for N may take **kwargs, as autoguides do)"
)


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__name__", None) or type(function).__name__


def _takes_num_data(function: Callable[..., Any]) -> bool:
    """Whether ``function`` can be called with ``num_data=``: a parameter of that name (not
    positional-only) or ``**kwargs``. A signature Python cannot read is given the benefit of
    the doubt."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == "num_data" and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in parameters
    )


def _check_scaled(model_trace: poutine.Trace, batch_size: int, num_data: int) -> None:
    """A minibatch of ``batch_size`` of ``num_data`` rows must be weighed by N/B in the model:
    if no observed site carries any scale (a plate over the batch alone, ``pyro.plate("data",
    len(x))``), the likelihood counts B rows against a prior meant for N, silently wrong."""
    observed = {
        name: site["scale"]
        for name, site in prune_subsample_sites(model_trace).nodes.items()
        if site["type"] == "sample" and site["is_observed"]
    }
    if not observed or any(
        isinstance(scale, Tensor) or scale != 1.0 for scale in observed.values()
    ):
        return
    raise ValueError(
        f"the model's observed site(s) {', '.join(repr(n) for n in observed)} are not scaled "
        f"by N/B: fit gave it a batch of B={batch_size} of the N={num_data} rows "
        f"(num_data={num_data}), and it weighed them as if they were all the data, against a "
        f"prior meant for N. Put the observations in a plate of the whole data's size: "
        f'{_PLATE_IDIOM} (a plate over the batch alone, pyro.plate("data", len(x)), scales '
        "nothing)"
    )


@dataclass
class ModelAndGuide:
    """A model and its guide given to :func:`~pyro_vae.fit` as two functions,
    ``fit((model, guide), data, ...)``: the object with ``model`` and ``guide`` that fit
    trains. Functions have no device of their own: they compute on the device, and in the
    dtype, of the first parameter of the model or guide where either is an ``nn.Module`` (a
    ``PyroModule``, an autoguide that has already run), else of the data's first floating
    tensor."""

    model: Callable[..., Any]
    guide: Callable[..., Any]
    device: torch.device
    dtype: torch.dtype


def as_model_and_guide(module: Any, data: Any) -> Any:
    """``module`` as fit trains it: a ``(model, guide)`` pair becomes a
    :class:`ModelAndGuide`; anything else is returned as it is (and checked by
    :class:`Objective`)."""
    if not (isinstance(module, tuple) and len(module) == 2 and all(map(callable, module))):
        if callable(module) and not callable(getattr(module, "guide", None)):
            raise ValueError(
                f"fit got one function, {_name(module)}, where it needs a model and its guide: "
                "pass both as a pair, fit((model, guide), data, ...), for example with "
                "guide = pyro.infer.autoguide.AutoNormal(model)"
            )
        return module
    model, guide = module
    for part in (model, guide):
        if isinstance(part, nn.Module):
            for parameter in part.parameters():
                if parameter.is_floating_point():
                    return ModelAndGuide(model, guide, parameter.device, parameter.dtype)
    tensors = data.tensors if isinstance(data, TensorDataset) else data
    for tensor in tensors if isinstance(tensors, tuple) else (tensors,):
        if isinstance(tensor, Tensor) and tensor.is_floating_point():
            return ModelAndGuide(model, guide, tensor.device, tensor.dtype)
    return ModelAndGuide(model, guide, torch.device("cpu"), torch.get_default_dtype())


def _named_parameters(module: Any) -> list[tuple[str, Tensor]]:
    return list(module.named_parameters()) if isinstance(module, nn.Module) else []


def device_and_dtype(module: Any) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype ``module`` computes: its own ``device`` and ``dtype`` where it
    has them (the package's models), else those of its first floating parameter, else the CPU
    and torch's default dtype."""
    device, dtype = getattr(module, "device", None), getattr(module, "dtype", None)
    if isinstance(device, torch.device) and isinstance(dtype, torch.dtype):
        return device, dtype
    if isinstance(module, nn.Module):
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.get_default_dtype()
