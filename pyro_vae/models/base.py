"""What every Pyro program of the package shares: a Pyro name of its own, the data plate, the
device and dtype of its parameters, and the checks of the data it is given.

**Pyro names** (docs/design.md, "Pyro names"). A ``PyroModule``'s Pyro name prefixes each of
its entries in Pyro's global param store, so two modules with one name would share entries, and
SVI on one would silently optimize the other's tensors. Every :class:`NamedPyroModule` takes a
name of its own when it is built (``vae_0``, ``m2_1``, ``cvae_2``, ...: its kind and one
process-wide count), and a fresh one when it is copied: ``copy.deepcopy`` and unpickling go
through ``__setstate__``, so a copy trains on its own. The name is never part of a sample
site's name nor of a ``state_dict`` key, so a checkpoint loads into any instance.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, ClassVar

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import Tensor

from pyro_vae._checks import check_positive_float
from pyro_vae.models import contract

_instance_ids = itertools.count()


def new_pyro_name(kind: str) -> str:
    """A Pyro name no other module of this process has: ``kind``, ``_`` and a count."""
    return f"{kind}_{next(_instance_ids)}"


class NamedPyroModule(PyroModule):
    """A ``PyroModule`` with a Pyro name of its own per instance (from its class's
    :attr:`pyro_kind`), and a fresh one for each copy."""

    pyro_kind: ClassVar[str]
    """The first part of the instances' Pyro names."""

    def __init__(self) -> None:
        super().__init__(name=new_pyro_name(self.pyro_kind))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copy.deepcopy and unpickling come through here: the copy gets a name of its own, so
        # that training it leaves the original's param-store entries alone. Every PyroModule
        # below it is renamed from its path, the way PyroModule names children
        # ("parent.child"): the children's own __setstate__ runs first, so the outermost
        # module, whose __setstate__ runs last, names them all.
        super().__setstate__(state)
        new = new_pyro_name(self.pyro_kind)
        for path, module in self.named_modules():
            if isinstance(module, PyroModule):
                module._pyro_name = f"{new}.{path}" if path else new


def check_num_data(batch_size: int, num_data: int | None) -> int:
    """The dataset size a batch of ``batch_size`` stands for: ``num_data``, or the batch itself
    when ``None``. A ``num_data`` below the batch size is refused."""
    if num_data is None:
        return batch_size
    if num_data < batch_size:
        raise ValueError(f"num_data={num_data} is smaller than the batch of {batch_size} examples")
    return num_data


def data_plate(x: Tensor, num_data: int | None) -> pyro.plate:
    """The plate ``"data"`` of the batch ``x`` in a dataset of ``num_data`` rows (``None``:
    the batch is all the data)."""
    # subsample=x: the batch *is* the subsample, so Pyro scales log-densities by
    # num_data / batch_size without drawing random indices of its own.
    return pyro.plate("data", size=check_num_data(x.shape[0], num_data), subsample=x)


class PyroProgram(NamedPyroModule, contract.DataChecks):
    """The base of the package's models (the VAE, M2, the CVAE and its baseline): a Pyro name of
    its own (:class:`NamedPyroModule`), the data plate, the ``device`` and ``dtype`` of its
    parameters, and :class:`~pyro_vae.models.contract.DataChecks`.

    A subclass sets :attr:`pyro_kind`, and ``data_dim``, ``likelihood`` and ``data_support``
    when it has checked its parts."""

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (the CPU for a model without any)."""
        return self._reference_tensor().device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters (torch's default without any)."""
        reference = self._reference_tensor()
        return reference.dtype if reference.numel() else torch.get_default_dtype()

    def _reference_tensor(self) -> Tensor:
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor
        return torch.empty(0)


class BetaScaled:
    """β, the weight of the KL term, for the models that have one (the VAE, the CVAE): it
    scales the ``z`` site in the model *and* in the guide (docs/design.md, "β"). A property,
    so that a KL warm-up schedule can change it and still be checked."""

    _beta: float

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = check_positive_float("beta", value)

    def beta_scale(self) -> contextlib.AbstractContextManager:
        """The scale of the β-weighted sites (z, in model and guide): ``poutine.scale`` by
        β, or nothing at β = 1. A public hook: a compiled step (:mod:`pyro_vae.infer.compiled`)
        replaces it on the instance to take β as an input of its graph."""
        # At β = 1 the scale handler would multiply by one; leaving it out saves a handler on
        # every site of every step.
        return contextlib.nullcontext() if self.beta == 1.0 else poutine.scale(scale=self.beta)
