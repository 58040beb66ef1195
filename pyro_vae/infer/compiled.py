"""A compiled training step: Pyro's ELBO traced once into an ATen graph and compiled.

``fit(..., compile=True)`` routes every step through :class:`CompiledStep`. On the first step
of each batch shape it traces ``Trace_ELBO().differentiable_loss(model, guide, *batch)`` (or
``TraceMeanField_ELBO``'s, whose closed-form KLs are plain tensor operations too) together
with ``torch.autograd.grad`` through ``torch.fx.experimental.proxy_tensor.make_fx``:
Pyro's Python (traces, messengers, site dictionaries) runs once, at trace time, and what is
left is a plain graph of tensor operations, which goes to ``torch.compile`` (Inductor). While
tracing, Pyro's ``torch_item`` returns the tensor instead of a Python float and its NaN warning
is off (both would read a value out of the graph); ``fit`` still refuses a non-finite loss or
gradient, from the compiled step's outputs. The optimizer stays outside the graph: PyTorch's
fused ``Adam``, so the learning rate is read from its parameter group at every step.

On a CUDA device with the ``"inductor"`` backend the graph is compiled with
``mode="reduce-overhead"``: the step is captured in a CUDA graph and replayed, since launch
overhead dominates such small steps. A replay overwrites the previous replay's outputs, so the
loss and the first gradient are cloned before they are handed out. This CUDA path has NOT been
run on a GPU in this project yet (no device was available): its speed is unmeasured and its
correctness untested. On the CPU no mode is passed (``torch.compile``'s default).

What is an input of the graph, and what makes a new trace
---------------------------------------------------------
- **Inputs**, read afresh at every step: the trained parameters, the model's buffers, the
  batch, the random draws (below) and, for a model with a ``beta`` and a ``beta_scale()`` hook
  (the context manager that scales its z sites by β: the VAE's and the CVAE's), β (the KL
  weight, which a KL warm-up changes at every step): while tracing, the hook is replaced by a
  ``poutine.scale`` by a tensor.
- **A new trace** (and compilation) for each new key: the shapes, dtypes and devices of the
  batch's tensors, the dataset size N (the data plate's N/B scale is a Python number inside
  Pyro), and, for a model with a ``beta`` but no such hook, the value of β. The last, smaller
  batch of an epoch therefore costs one more trace, once per run; each graph is kept.

The random draws
----------------
The graph draws no random numbers. While tracing, every draw of the step (``Tensor.normal_``,
the reparameterized ε of ``rsample``; ``Tensor.uniform_``; ``torch.randn``; ``torch.rand``) is
replaced by an input. Before each compiled step the same draws are made eagerly, with the very
calls eager Pyro would make, in the same order, from torch's global random state. So:

"Exact" under compilation means: a compiled run consumes torch's random state (and fit's
``generator``, which binarizes the batch outside the graph) exactly as the eager run does, so
it sees bit-for-bit the same ε and the same batches. Its losses and gradients equal the eager
run's up to floating-point rounding (Inductor fuses and reorders operations), not bit for bit.
A compiled run resumed from a checkpoint continues with the same random stream and the same
compiled arithmetic as the uninterrupted compiled run, so it ends exactly (bit for bit) where
that run ends, on the same machine and torch version.

Where tracing cannot work, :class:`CompiledStep` runs Pyro's eager step instead, after one
``UserWarning`` that names the reason: an estimator other than those two (enumeration in
``TraceEnum_ELBO``, the log-sum-exp over particles of ``RenyiELBO``, ...), a value read out of
the graph (dynamic control flow on tensors), a random draw that cannot be passed in, or a
failure of the compiler. It never gives numbers of a graph it could not trace faithfully.

When compiling pays
-------------------
Compiling costs seconds up front (about 12 s cold for a 784-400-50 VAE at B = 128 on an idle
CPU, 1.0-1.6 s with Inductor's on-disk cache warm; over 100 s on a busy machine) and saves
about 30% of each eager step afterwards (benchmarks/README.md, "The compiled step").
:func:`compile_pays` weighs the two for the steps a run has left, and compiles only when the
saving is more than :data:`COMPILE_MARGIN` times the compile (both are estimates, and err by a
third and more), from the eager step's time measured on the run's own first steps and a
compile time from :func:`compile_estimate`: a
compile of the same shapes this user made before (:func:`record_compile_times` notes each
compile's seconds under a key, in ``~/.cache/pyro_vae/compile_seconds.json``), else the known
cold figure scaled by the machine's load. Inductor's cache is kept in the user's cache
directory (:func:`use_inductor_cache_dir`; ``TORCHINDUCTOR_CACHE_DIR`` wins where set), so
that a second run of the same shapes finds its kernels compiled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.infer.trace_elbo as pyro_trace_elbo
import pyro.infer.trace_mean_field_elbo as pyro_trace_mean_field_elbo
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

from pyro_vae.infer.objective import Objective, device_and_dtype

# The draws that become inputs: torch functions (or Tensor methods) that fill a tensor of a
# given shape from torch's global random state. The first two are methods of a fresh tensor.
_IN_PLACE_DRAWS = (Tensor.normal_, Tensor.uniform_)
_NEW_DRAWS = (torch.randn, torch.rand)


COMPILED_STEP_RATIO = 0.7
"""A compiled step's time over the eager step's, measured on the CPU (benchmarks/README.md,
"The compiled step": 4.42 against 5.96 ms at B = 128, 3.4-3.8 against 5.1-5.5 s per
Fashion-MNIST epoch)."""
COLD_COMPILE_SECONDS = 12.0
"""One compile with an empty Inductor cache, idle CPU, 784-400-50 at B = 128 (measured)."""
WARM_COMPILE_SECONDS = 1.5
"""One compile whose kernels Inductor's on-disk cache holds (1.0-1.6 s measured)."""
COMPILE_MARGIN = 1.3
"""Compile only when the estimated saving is more than this many times the compile's
estimated time. The estimates err by a third and more: on 20 Fashion-MNIST epochs, idle, two
threads, a saving estimated at 14.5 s came to about 8 s and a cold compile estimated at 12 s
took about 14 s, so a compile chosen on 14.5 against 12 (1.21 times) ended 10% slower than
eager; beside busy neighbours, 17 against 12 (1.42 times) ended 7% faster
(benchmarks/README.md, "On an idle machine"). 1.3 lies between the two; a run it keeps eager
near the line forgoes a few percent at most."""
_RECORDS = "compile_seconds.json"


def user_cache_dir() -> Path:
    """pyro_vae's directory in the user's cache: ``$XDG_CACHE_HOME/pyro_vae``, by default
    ``~/.cache/pyro_vae``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro_vae"


# The user's TORCHINDUCTOR_CACHE_DIR, read when pyro_vae is imported: importing torch._inductor
# later sets the variable to torch's own default (under /tmp), which is not the user's choice.
_GIVEN_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or None


def use_inductor_cache_dir() -> Path:
    """Inductor's on-disk cache in the user's cache directory (``~/.cache/pyro_vae/inductor``)
    rather than torch's default under /tmp, which a reboot empties; a
    ``TORCHINDUCTOR_CACHE_DIR`` the user set is kept. Returns the directory in use."""
    wanted = _GIVEN_CACHE_DIR or str(user_cache_dir() / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = wanted
    return Path(wanted)


class _NoCudaRuntimeFilter(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." warning: it comes from
    ``torch.utils.cpp_extension``'s import (which Inductor makes while compiling for the CPU)
    on a machine with a CUDA toolkit and no GPU, and says nothing about a CPU run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_cuda_home_warning() -> None:
    """Silence :class:`_NoCudaRuntimeFilter`'s warning at its source, the logger of
    ``torch.utils.cpp_extension``, where CUDA is not available (a CPU run); once."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not torch.cuda.is_available() and not any(
        isinstance(f, _NoCudaRuntimeFilter) for f in logger.filters
    ):
        logger.addFilter(_NoCudaRuntimeFilter())


def load_factor() -> float:
    """How much busier than one runnable task per core the machine is: the 1-minute load
    average over the cores this process may use, at least 1."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1.0, load / (cores or 1))


def _read_records() -> dict[str, Any]:
    try:
        records = json.loads((user_cache_dir() / _RECORDS).read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _hit(key: str | None) -> dict[str, Any] | None:
    """``key``'s record where its compile went into the Inductor cache directory in use,
    which still exists (its kernels are there to be found); else ``None``."""
    record = _read_records().get(key) if key is not None else None
    cache = use_inductor_cache_dir()
    if isinstance(record, dict) and record.get("cache_dir") == str(cache) and cache.is_dir():
        return record
    return None


def compile_estimate(key: str | None, *, load: float | None = None) -> tuple[float, str]:
    """The seconds a compile of ``key``'s shapes should take, and where that figure comes
    from: a cache hit (a compile of the same key, into the Inductor cache directory in use,
    which still exists) takes the recorded time of a warm compile, or after a cold one the
    known warm figure; otherwise the known cold figure. The figures are times the machine's
    :func:`load_factor` (or ``load``)."""
    factor = load_factor() if load is None else load
    record = _hit(key)
    if record is not None:
        # A warm compile's own time, measured; after a cold one, the known warm figure.
        seconds = float(record["seconds"]) if record.get("warm") else WARM_COMPILE_SECONDS * factor
        return seconds, f"cache hit, about {seconds:.0f}s to compile"
    seconds = COLD_COMPILE_SECONDS * factor
    return seconds, f"cold cache, about {seconds:.0f}s to compile at load {factor:.1f}/core"


def compile_pays(
    eager_step_seconds: float,
    remaining_steps: int,
    compile_seconds: float,
    ratio: float = COMPILED_STEP_RATIO,
    margin: float = COMPILE_MARGIN,
) -> tuple[bool, str]:
    """Whether compiling pays back its ``compile_seconds`` over ``remaining_steps`` steps
    that take ``eager_step_seconds`` eager and ``ratio`` of that compiled, with ``margin`` to
    spare (:data:`COMPILE_MARGIN`); and why, in words."""
    if margin < 1:
        raise ValueError(f"compile_pays: margin must be at least 1, got {margin}")
    saving = remaining_steps * eager_step_seconds * (1 - ratio)
    pays = saving > margin * compile_seconds
    cost = _seconds(compile_seconds)
    if pays:
        than = f"more than {margin:g} × the {cost} to compile"
    elif saving <= compile_seconds:
        than = f"less than the {cost} to compile"
    else:  # more than the compile's estimate, but within the estimates' errors
        than = f"more than the {cost} to compile, but not {margin:g} times as much"
    return pays, (
        f"{remaining_steps} steps at {1e3 * eager_step_seconds:.1f} ms would save about "
        f"{_seconds(saving)}, {than}"
    )


def _seconds(value: float) -> str:
    """Seconds as the first line says them: whole from 10 s up, else to a tenth (a warm
    compile's 1.5 s is not shown as 2)."""
    return f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"


_record: dict[str, Any] = {"key": None, "seconds": 0.0, "warm": False}


def record_compile_times(key: str | None) -> None:
    """Note the seconds this process spends compiling from now on (every graph, summed) under
    ``key`` (the shapes of a run: :func:`compile_estimate` reads them back), or stop noting
    (``None``). A compile is warm when the key's earlier kernels are in the cache."""
    _record.update(key=key, seconds=0.0, warm=_hit(key) is not None)


def _note_compile(seconds: float) -> None:
    if _record["key"] is None:
        return
    _record["seconds"] += seconds
    path = user_cache_dir() / _RECORDS
    records = _read_records()
    records[_record["key"]] = {
        "seconds": _record["seconds"],
        "warm": _record["warm"],
        "cache_dir": str(use_inductor_cache_dir()),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(records, indent=1, sort_keys=True))
        temporary.replace(path)
    except OSError:  # a read-only cache costs the next run its estimate, nothing more
        pass


def _compile_mode(device: torch.device, backend: str) -> str | None:
    """``torch.compile``'s mode for a step on ``device``: CUDA graphs (``"reduce-overhead"``)
    for Inductor on CUDA, where launch overhead dominates; otherwise the default (``None``)."""
    if device.type == "cuda" and backend == "inductor":
        return "reduce-overhead"
    return None


class UntraceableError(Exception):
    """The step cannot be traced into a faithful graph; the message says why."""


@dataclass(frozen=True)
class _Draw:
    """One random draw of the step, as eager Pyro makes it, so that it can be made again."""

    function: Callable[..., Tensor]
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]

    def draw(self) -> Tensor:
        kwargs = dict(self.kwargs)
        if self.function in _IN_PLACE_DRAWS:
            fresh = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            return self.function(fresh, *self.args, **kwargs)
        return self.function(*self.args, **kwargs)


def _describe(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", getattr(function, "__name__", repr(function)))


def _plain(values: Any) -> bool:
    """Whether a draw's arguments are plain values (no tensor, no generator of their own)."""
    return not any(isinstance(v, (Tensor, torch.Generator)) for v in values)


class _RecordDraws(TorchFunctionMode):
    """Lets the draws happen and records each, to make it again before every compiled step."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[_Draw] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _IN_PLACE_DRAWS or func in _NEW_DRAWS:
            rest = args[1:] if func in _IN_PLACE_DRAWS else args
            if not (_plain(rest) and _plain(kwargs.values())):
                raise UntraceableError(
                    f"the step draws with {_describe(func)} from tensor arguments or a "
                    "generator of its own, which cannot be passed in as an input"
                )
            self.draws.append(
                _Draw(
                    func,
                    result.shape,
                    result.dtype,
                    result.device,
                    tuple(rest),
                    tuple(sorted(kwargs.items())),
                )
            )
        return result


class _ReplayDraws(TorchFunctionMode):
    """While tracing: each draw returns the next input instead of drawing."""

    def __init__(self, noise: list[Tensor]) -> None:
        super().__init__()
        self.noise = list(noise)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _IN_PLACE_DRAWS or func in _NEW_DRAWS:
            if not self.noise:
                raise UntraceableError("the step draws more random numbers than on its first run")
            noise = self.noise.pop(0)
            if func in _IN_PLACE_DRAWS:
                return args[0].copy_(noise)
            return noise
        return func(*args, **kwargs)


# The modules of the traced estimators, each with its own imported torch_item and warn_if_nan
# (TraceMeanField_ELBO's particle loss reads torch_item from its module; the differentiable
# loss it inherits, from Trace_ELBO's).
_TRACED_MODULES = (pyro_trace_elbo, pyro_trace_mean_field_elbo)


@contextlib.contextmanager
def _pyro_traceable() -> Iterator[None]:
    """Pyro's Trace_ELBO and TraceMeanField_ELBO without the two reads of a value out of the
    graph: ``torch_item`` returns its tensor, detached (as a Python float would be: Pyro adds
    it to the loss as a value that carries no gradient, and the gradient comes from the
    surrogate, score-function terms included), and ``warn_if_nan`` does nothing (fit checks
    the loss itself)."""
    replacements = {
        "torch_item": lambda x: x.detach(),
        "warn_if_nan": lambda x, *args, **kwargs: x,
    }
    saved = [(m, name, getattr(m, name)) for m in _TRACED_MODULES for name in replacements]
    for module, name, _ in saved:
        setattr(module, name, replacements[name])
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _takes_beta_input(module: Any) -> bool:
    """Whether ``module``'s β is an input of the graph: it has a ``beta`` and a ``beta_scale()``
    hook, the context manager that scales its β-weighted sites, which tracing replaces."""
    return hasattr(module, "beta") and callable(getattr(module, "beta_scale", None))


@contextlib.contextmanager
def _beta_input(module: Any, beta: Tensor | None) -> Iterator[None]:
    """The module's β as the tensor ``beta`` (an input of the graph) instead of a Python
    number: its ``beta_scale()`` hook, overridden on the instance while tracing."""
    if beta is None:
        yield
        return
    module.beta_scale = lambda: poutine.scale(scale=beta)
    try:
        yield
    finally:
        del module.beta_scale


def eager_reason(objective: Objective) -> str | None:
    """Why the step of ``objective`` cannot be compiled, known before any trace; ``None``
    when it can be tried."""
    return loss_eager_reason(objective.loss)


def loss_eager_reason(loss: Any) -> str | None:
    """Why a step with the ELBO ``loss`` cannot be compiled; ``None`` when it can be tried."""
    if type(loss) in (Trace_ELBO, TraceMeanField_ELBO):
        return None
    name = type(loss).__name__
    if name == "TraceEnum_ELBO":
        return (
            "TraceEnum_ELBO enumerates discrete latents with tensor shapes and contractions "
            "that Pyro chooses in Python at every step"
        )
    if name == "RenyiELBO":
        return "RenyiELBO (IWAE) is traced only as Trace_ELBO is; it has no traced route yet"
    return f"only Trace_ELBO and TraceMeanField_ELBO are traced, not {name}"


@dataclass
class _Graph:
    draws: list[_Draw]
    has_grad: list[bool]
    compiled: Callable[..., Any]


class CompiledStep:
    """The step of :meth:`Objective.loss_and_grads <pyro_vae.infer.objective.Objective.
    loss_and_grads>`, traced and compiled (module docstring). It has the same call and the
    same effect: the loss, with the gradients put into the parameters' ``.grad``.

    :param objective: the model, guide and ELBO; :meth:`Objective.parameters` already called.
    :param backend: ``torch.compile``'s backend (``"inductor"``; ``"eager"`` runs the traced
        graph as it is).
    """

    def __init__(self, objective: Objective, *, backend: str = "inductor") -> None:
        if not objective.trained:
            raise ValueError("CompiledStep needs objective.parameters(...) to have been called")
        self.objective = objective
        self.trained = objective.trained
        self.backend = backend
        self.traces = 0
        """Traces made so far (one per key, module docstring)."""
        self.eager_reason = eager_reason(objective)
        if self.eager_reason is not None:
            self._warn()
        use_inductor_cache_dir()
        quiet_cuda_home_warning()
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        module = objective.module
        self._buffers = list(module.buffers()) if isinstance(module, nn.Module) else []

    def _warn(self) -> None:
        warnings.warn(
            f"compile=True: the step runs eager, because {self.eager_reason}", stacklevel=4
        )

    def loss_and_grads(self, *batch: Tensor, num_data: int) -> Tensor | float:
        """The loss for the whole dataset estimated from ``batch``, gradients into ``.grad``."""
        graph = self._graph(batch, num_data, gradients=True)
        if graph is None:
            return self.objective.loss_and_grads(*batch, num_data=num_data)
        noise = [draw.draw() for draw in graph.draws]
        outputs = graph.compiled(*self._inputs(batch, noise))
        for parameter, gradient, has_grad in zip(
            self.trained, outputs[1:], graph.has_grad, strict=True
        ):
            if has_grad:
                if parameter.grad is None:
                    parameter.grad = gradient.detach().clone()
                else:
                    parameter.grad.add_(gradient)
        # Cloned: under CUDA graphs the next replay overwrites the graph's outputs.
        return outputs[0].detach().clone()

    def differentiable_loss(self, *batch: Tensor, num_data: int) -> Tensor:
        """The loss alone, compiled, as a tensor whose backward gives the gradients (the
        objective's :meth:`~pyro_vae.infer.objective.Objective.differentiable_loss`, compiled): what
        the module that DistributedDataParallel wraps returns, so that DDP averages the
        gradients of a compiled step (:mod:`pyro_vae.infer.distributed`)."""
        graph = self._graph(batch, num_data, gradients=False)
        if graph is None:
            return self.objective.differentiable_loss(*batch, num_data=num_data)
        noise = [draw.draw() for draw in graph.draws]
        (loss,) = graph.compiled(*self._inputs(batch, noise))
        return loss

    def _graph(self, batch: tuple[Tensor, ...], num_data: int, *, gradients: bool) -> _Graph | None:
        """The compiled graph for this batch's key (traced now if new), or ``None`` when the
        step runs eager (after one warning naming why)."""
        if self.eager_reason is None:
            key = (*self._key(batch, num_data), gradients)
            graph = self._graphs.get(key)
            if graph is None:
                try:
                    graph = self._trace(batch, num_data, gradients=gradients)
                except (UntraceableError, RuntimeError, NotImplementedError, TypeError) as error:
                    self.eager_reason = f"tracing failed: {type(error).__name__}: {error}"
                    self._warn()
                else:
                    self._graphs[key] = graph
            return graph
        return None

    def _key(self, batch: tuple[Tensor, ...], num_data: int) -> tuple[Any, ...]:
        module = self.objective.module
        beta = None if _takes_beta_input(module) else getattr(module, "beta", None)
        shapes = tuple((t.shape, t.dtype, t.device) for t in batch)
        return (shapes, num_data, beta)

    def _beta(self) -> list[Tensor]:
        module = self.objective.module
        if not _takes_beta_input(module):
            return []
        device, dtype = device_and_dtype(module)
        return [torch.tensor(module.beta, dtype=dtype, device=device)]

    def _inputs(self, batch: tuple[Tensor, ...], noise: list[Tensor]) -> list[Tensor]:
        return [*self.trained, *self._buffers, *batch, *noise, *self._beta()]

    def _loss(self, batch: tuple[Tensor, ...], num_data: int) -> Tensor:
        objective = self.objective
        # Trace_ELBO's or TraceMeanField_ELBO's (those traced, eager_reason); ELBO declares
        # none.
        loss: Tensor = objective.loss.differentiable_loss(  # type: ignore[attr-defined]
            objective.model, objective.guide, *batch, num_data=num_data
        )
        return loss

    def _trace(self, batch: tuple[Tensor, ...], num_data: int, *, gradients: bool) -> _Graph:
        # The draws of one eager run, on a fork of the random state: training draws the same
        # numbers as if this had not run.
        started = time.perf_counter()
        device = batch[0].device
        recorder = _RecordDraws()
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            pyro.validation_enabled(False),
            recorder,
        ):
            self._loss(batch, num_data)
        draws = recorder.draws
        num_params, num_buffers, num_batch = len(self.trained), len(self._buffers), len(batch)
        has_grad: list[bool] = []
        module = self.objective.module

        def step(*flat: Tensor) -> list[Tensor]:
            at = num_params + num_buffers
            traced_batch = tuple(flat[at : at + num_batch])
            at += num_batch
            noise = list(flat[at : at + len(draws)])
            beta = flat[at + len(draws)] if _takes_beta_input(module) else None
            with (
                _ReplayDraws(noise) as replay,
                _pyro_traceable(),
                _beta_input(module, beta),
                pyro.validation_enabled(False),
            ):
                loss = self._loss(traced_batch, num_data)
                if replay.noise:
                    raise UntraceableError("the step draws fewer random numbers than at first")
            if not gradients:  # the loss alone: autograd differentiates the compiled graph
                return [loss]
            grads = torch.autograd.grad(loss, self.trained, allow_unused=True)
            has_grad[:] = [g is not None for g in grads]
            pairs = zip(self.trained, grads, strict=True)
            return [loss.detach(), *(torch.zeros_like(p) if g is None else g for p, g in pairs)]

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            example = self._inputs(batch, [d.draw() for d in draws])
            graph = make_fx(step)(*example)
        seeded = [
            str(node.target)
            for node in graph.graph.nodes
            if node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in node.target.tags
        ]
        if seeded:
            raise UntraceableError(
                f"the step draws random numbers with {', '.join(seeded)}, which cannot be "
                "passed in as inputs"
            )
        compiled = torch.compile(
            graph,
            backend=self.backend,
            mode=_compile_mode(device, self.backend),
            dynamic=False,
            fullgraph=True,
        )
        # Compile now, on the example, so that a failure of the compiler falls back here.
        with warnings.catch_warnings():
            # Dynamo reads .grad of the graph's intermediate tensors while it compiles a graph
            # whose inputs have gradients; torch warns of that, needlessly here.
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that")
            compiled(*example)
        self.traces += 1
        _note_compile(time.perf_counter() - started)
        return _Graph(draws, has_grad, compiled)
