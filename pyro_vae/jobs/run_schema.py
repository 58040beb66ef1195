"""The schema of a run's ``checkpoint.pt``: every entry scripts/train.py stores beside the
weights and the config, checked whole, with :func:`check_run_payload`, before any of it is used.

:func:`~pyro_vae.checkpoint.load_checkpoint` has already checked the file's bytes, its format
tag, the config and the weights. What is left, and what each must be:

- ``args``: the script's arguments, a dict of names to plain values (``None``, a bool, a
  number, a name) or flat lists of them (hidden widths); those every run reads back
  (``dataset``, ``data_dir``, ``seed``, ``num_epochs``, ``batch_size``, ``device``, ``model``)
  of their type;
- ``training``: a :class:`~pyro_vae.infer.state.TrainingState`'s ``to_dict()``: its
  position (the payload's ``epoch`` and ``step``) and the shuffle under way (a permutation),
  an optimizer state (``state`` and ``param_groups``, each parameter once), torch's random
  states of their real sizes (the CPU's, a CUDA generator's 16 bytes), its history (lists of
  numbers), each rank's states;
- ``metrics``: a row per epoch, each a flat dict of names to numbers or names, the epochs
  rising: no nesting, and no more rows or keys than :data:`MAX_ROWS` and
  :data:`MAX_ROW_KEYS`, so that a crafted entry is refused at its first wrong value (a list
  nested a thousand times, shared, is refused as fast as a small one, instead of being
  written out as ``metrics.json``);
- ``evaluation_digest``: a SHA-256, 64 hexadecimal digits;
- the extras (:data:`EXTRAS`): M2's ``labelled_indices`` (required for M2) and every run's
  ``validation_indices``, 1-D tensors of distinct integer row indices.

An entry that no run of scripts/train.py writes is refused too: a new one needs its line in
:data:`EXTRAS`. Each refusal is one ``ValueError`` naming the file and the entry.

The checkpoints beside it (``best.pt``, the CVAE's ``baseline.pt``) are checked against the
run with :func:`check_companion_payload`: each records the run's arguments, which must be the
run's (but for what a resume may change), so that a copy from another run is refused naming
the argument that differs; ``best.pt``'s selection must name an epoch of the run with the
metric its rows hold, ``baseline.pt`` must have trained for the run's epochs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyro_vae.infer.state import History, TrainingState

MAX_ROWS = 1_000_000
"""Metric rows (one per epoch) a checkpoint may hold."""
MAX_ROW_KEYS = 1_000
"""Metrics a row may hold."""
MAX_ARGS = 1_000
"""Arguments a run may record."""
MAX_LIST = 10_000
"""Entries of a list among the arguments (hidden widths) or in an optimizer's settings."""
MAX_STEPS = 10**8
"""Values in a history's lists (a loss per step), and row indices in an extra."""
MAX_RANKS = 2**16
"""Processes (and GPUs) whose random states a checkpoint may hold."""

CPU_RNG_BYTES = torch.get_rng_state().numel()
"""The size of torch's CPU random state (the Mersenne Twister's)."""
CUDA_RNG_BYTES = 16
"""The size of a CUDA generator's state (Philox: its seed and offset)."""

# Entries load_checkpoint has checked already.
_LOADED = ("format", "config", "state_dict")
# Entries every run of scripts/train.py writes.
_REQUIRED = ("args", "training", "metrics", "evaluation_digest", "epoch", "step")
_WHY_MISSING = (
    "it was not written by scripts/train.py of this version (runs from before 0.2 recorded no "
    "test set: train them again)"
)
_SCALARS = (type(None), bool, int, float, str)
_NUMBERS = (int, float)
_DIGEST = re.compile(r"[0-9a-f]{64}")
_INDEX_DTYPES = (torch.int64, torch.int32)


def check_run_payload(payload: dict, path: Path) -> None:
    """Refuse, with one ``ValueError`` naming ``path`` and the entry, a checkpoint of
    scripts/train.py (``payload``, as :func:`~pyro_vae.checkpoint.load_checkpoint` returns
    it) whose entries beside the weights and config are not what the module docstring says.
    Fast whatever the payload holds: no entry is walked past its first wrong value."""
    try:
        _check_payload(payload)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _check_payload(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise ValueError(f"not a run's checkpoint: it holds a {_kind(payload)}, not a dict")
    for key in _REQUIRED:
        if key not in payload:
            raise ValueError(f"holds no {key!r}; {_WHY_MISSING}")
    config = payload.get("config")
    model = config.get("model", "vae") if isinstance(config, dict) else None
    if model == "m2" and "labelled_indices" not in payload:
        raise ValueError("holds no 'labelled_indices'; it was not written by train.py")
    for key in payload:
        if key not in _LOADED and key not in _REQUIRED and key not in EXTRAS:
            raise ValueError(f"holds {_shown(key)}, an entry no run of scripts/train.py writes")
    epoch, step = payload["epoch"], payload["step"]
    for key, value in (("epoch", epoch), ("step", step)):
        if type(value) is not int or value < 0:
            raise ValueError(f"its {key!r} is {_shown(value)}, not a count (an int >= 0)")
    _entry("args", _check_args, payload["args"], model)
    _entry("training", _check_training, payload["training"], epoch, step)
    _entry("metrics", _check_metrics, payload["metrics"])
    _entry("evaluation_digest", _check_digest, payload["evaluation_digest"])
    for key, check in EXTRAS.items():
        if key in payload:
            _entry(key, check, payload[key])


def _entry(name: str, check: Callable[..., None], value: Any, *context: Any) -> None:
    """``check(value, *context)``, its refusal naming the entry."""
    try:
        check(value, *context)
    except ValueError as error:
        raise ValueError(f"its {name!r} entry {error}") from None


# ------------------------------------------------------------------------------ values


def _kind(value: Any) -> str:
    """What ``value`` is, in a few words (a tensor's dtype and shape)."""
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _shown(value: Any) -> str:
    """``value`` for a message: its repr, cut short."""
    text = repr(value) if isinstance(value, (*_SCALARS,)) else f"a {_kind(value)}"
    return text if len(text) <= 60 else text[:57] + "..."


def _check_dict(value: Any, what: str, largest: int) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"is a {_kind(value)}, not {what}")
    if len(value) > largest:
        raise ValueError(f"holds {len(value)} entries, more than {what} has ({largest} at most)")
    return value


def _check_list(value: Any, what: str, largest: int) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"is a {_kind(value)}, not {what}")
    if len(value) > largest:
        raise ValueError(f"holds {len(value)} entries, more than {what} has ({largest} at most)")
    return value


def _first_not(kinds: tuple[type, ...], values: Any) -> tuple[int, Any] | None:
    """The first of ``values`` whose exact type is not one of ``kinds`` (a bool is no int
    here unless ``bool`` is named), with its position; ``None`` when all are."""
    for i, value in enumerate(values):
        if type(value) not in kinds:
            return i, value
    return None


def _is_count(value: Any, least: int = 0) -> bool:
    return type(value) is int and value >= least


# ------------------------------------------------------------------------------- args

# The arguments every run reads back, and what each must be.
_ARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dataset": (lambda v: type(v) is str, "a dataset's name"),
    "data_dir": (lambda v: v is None or type(v) is str, "a directory (or None)"),
    "seed": (lambda v: _is_count(v) and v < 2**32, "a seed (an int from 0 to 2**32 - 1)"),
    "num_epochs": (lambda v: _is_count(v, 1), "a count of epochs (an int >= 1)"),
    "batch_size": (lambda v: _is_count(v, 1), "a batch size (an int >= 1)"),
    "device": (lambda v: type(v) is str and _is_device(v), "a device's name (cpu, cuda, ...)"),
}


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
        return True
    except RuntimeError:
        return False


def _check_args(args: Any, model: str | None) -> None:
    _check_dict(args, "the script's arguments (a dict)", MAX_ARGS)
    for key, value in args.items():
        if type(key) is not str:
            raise ValueError(f"has the key {_shown(key)}, not an argument's name")
        if isinstance(value, (list, tuple)):
            try:
                _check_list(value, "a list of plain values", MAX_LIST)
            except ValueError as error:
                raise ValueError(f"{key!r} {error}") from None
            wrong = _first_not(_SCALARS, value)
            if wrong is not None:
                raise ValueError(
                    f"{key!r} holds {_shown(wrong[1])} at {wrong[0]}, not a plain value (a "
                    "number, a name or None)"
                )
        elif type(value) not in _SCALARS:
            raise ValueError(f"{key!r} is {_shown(value)}, not a plain value or a list of them")
    for key, (valid, what) in _ARGS.items():
        if key not in args:
            raise ValueError(f"has no {key!r}")
        if not valid(args[key]):
            raise ValueError(f"{key!r} is {_shown(args[key])}, not {what}")
    if "model" in args and args["model"] != model:
        raise ValueError(f"'model' is {_shown(args['model'])}, and the config's model is {model!r}")


# --------------------------------------------------------------------------- training

_STATE_FIELDS = tuple(field.name for field in dataclasses.fields(TrainingState))
_HISTORY_FIELDS = tuple(field.name for field in dataclasses.fields(History))
_RANK_FIELDS = ("torch_rng", "cuda_rng", "noise_rng")


def _check_training(training: Any, epoch: int, step: int) -> None:
    _check_dict(training, "a training state (a dict)", MAX_LIST)
    # rank_states came later: a state of one process saved before it lacks it.
    missing = [key for key in _STATE_FIELDS if key not in training and key != "rank_states"]
    unknown = [key for key in training if key not in _STATE_FIELDS]
    if missing or unknown:
        what = f"has no {missing[0]!r}" if missing else f"holds {_shown(unknown[0])}"
        raise ValueError(f"{what}: not a training state")
    for key, value in (("epoch", epoch), ("step", step)):
        if type(training[key]) is not int or training[key] != value:
            raise ValueError(
                f"says {key} {_shown(training[key])}, and the checkpoint's {key!r} is {value}"
            )
    _check_order(training["order"], step)
    _field("optimizer", _check_optimizer, training["optimizer"])
    _field("torch_rng", _check_rng, training["torch_rng"], (CPU_RNG_BYTES,))
    _field("cuda_rng", _check_cuda_rngs, training["cuda_rng"])
    _field("generator_rng", _check_generator_rng, training["generator_rng"])
    _field("history", _check_history, training["history"])
    _field("rank_states", _check_rank_states, training.get("rank_states"))


def _field(name: str, check: Callable[..., None], value: Any, *context: Any) -> None:
    try:
        check(value, *context)
    except ValueError as error:
        raise ValueError(f"{name!r} {error}") from None


def _check_order(order: Any, step: int) -> None:
    """The shuffle of the epoch under way: ``None`` between epochs, else a permutation."""
    if step == 0:
        if order is not None:
            raise ValueError("'order' is a shuffle, but the state is between two epochs (step 0)")
        return
    if not isinstance(order, Tensor) or order.dtype != torch.int64 or order.dim() != 1:
        raise ValueError(f"'order' is {_shown(order)}, not a shuffle (a 1-D torch.int64 tensor)")
    if len(order) > MAX_STEPS or not torch.equal(
        order.cpu().sort().values, torch.arange(len(order), dtype=torch.int64)
    ):
        raise ValueError(f"'order' is no permutation of 0..{len(order) - 1}")


def _check_optimizer(optimizer: Any) -> None:
    _check_dict(optimizer, "an optimizer's state (a dict)", MAX_LIST)
    for key in ("state", "param_groups"):
        if key not in optimizer:
            raise ValueError(f"has no {key!r}: not an optimizer's state")
    groups = _check_list(optimizer["param_groups"], "a list of parameter groups", MAX_LIST)
    if not groups:
        raise ValueError("has no parameter group")
    indices: set[int] = set()
    for number, group in enumerate(groups):
        _check_dict(group, "a parameter group (a dict)", MAX_LIST)
        params = group.get("params")
        if not isinstance(params, list) or len(params) > MAX_STEPS:
            raise ValueError(f"group {number} has no list of parameters ('params')")
        if _first_not((int,), params) is not None or any(p < 0 for p in params):
            raise ValueError(f"group {number}'s 'params' are not parameter indices (ints >= 0)")
        if indices.intersection(params) or len(set(params)) != len(params):
            raise ValueError(f"group {number} names a parameter twice")
        indices.update(params)
        for key, value in group.items():
            if key == "params":
                continue
            values = value if isinstance(value, (list, tuple)) else (value,)
            if type(key) is not str or len(values) > MAX_LIST or _first_not(_SCALARS, values):
                raise ValueError(f"group {number}'s setting {_shown(key)} is not a plain value")
    state = _check_dict(optimizer["state"], "the parameters' states (a dict)", MAX_STEPS)
    for index, values in state.items():
        if index not in indices or type(index) is not int:
            raise ValueError(f"'state' holds {_shown(index)}, a parameter of no group")
        _check_dict(values, "a parameter's state (a dict)", MAX_LIST)
        for key, value in values.items():
            if type(key) is not str or not (isinstance(value, Tensor) or type(value) in _NUMBERS):
                raise ValueError(
                    f"'state' of parameter {index}: {_shown(key)} is {_shown(value)}, not a "
                    "tensor or a number"
                )


def _check_rng(state: Any, sizes: tuple[int, ...]) -> None:
    if (
        not isinstance(state, Tensor)
        or state.dtype != torch.uint8
        or state.dim() != 1
        or state.numel() not in sizes
    ):
        got = (
            f"a {state.numel()}-byte tensor"
            if isinstance(state, Tensor) and state.dtype == torch.uint8 and state.dim() == 1
            else _shown(state)
        )
        wanted = " or ".join(str(size) for size in sizes)
        raise ValueError(f"is {got}, not a random state (a 1-D torch.uint8 of {wanted} bytes)")


def _check_cuda_rngs(states: Any) -> None:
    if states is None:
        return
    _check_list(states, "a list of CUDA random states", MAX_RANKS)
    for state in states:
        _check_rng(state, (CUDA_RNG_BYTES,))


def _check_generator_rng(state: Any) -> None:
    """A ``torch.Generator``'s state, of the CPU or of a GPU; ``None`` without one."""
    if state is not None:
        _check_rng(state, (CPU_RNG_BYTES, CUDA_RNG_BYTES))


def _check_history(history: Any) -> None:
    _check_dict(history, "a training history (a dict)", MAX_LIST)
    for key in _HISTORY_FIELDS:
        if key not in history:
            raise ValueError(f"has no {key!r}")
    for key in history:
        if key not in _HISTORY_FIELDS:
            raise ValueError(f"holds {_shown(key)}, which a history has not")
    for key in ("loss", "step_loss", "epoch_seconds"):
        values = history[key]
        if not isinstance(values, list) or len(values) > MAX_STEPS:
            raise ValueError(f"{key!r} is {_shown(values)}, not a list of numbers")
        wrong = _first_not(_NUMBERS, values)
        if wrong is not None:
            raise ValueError(f"{key!r} holds {_shown(wrong[1])} at {wrong[0]}, not a number")
    if type(history["binarized"]) is not bool:
        raise ValueError(f"'binarized' is {_shown(history['binarized'])}, not a bool")


def _check_rank_states(states: Any) -> None:
    """Every rank's random states on many processes; ``None`` on one."""
    if states is None:
        return
    _check_list(states, "a list of the ranks' random states", MAX_RANKS)
    if len(states) < 2:
        raise ValueError(f"holds {len(states)} rank(s): one process saves None")
    for rank, state in enumerate(states):
        if not isinstance(state, dict) or set(state) != set(_RANK_FIELDS):
            raise ValueError(f"of rank {rank} is not a rank's random states")
        _check_rng(state["torch_rng"], (CPU_RNG_BYTES,))
        _check_cuda_rngs(state["cuda_rng"])
        _check_generator_rng(state["noise_rng"])


# ------------------------------------------------------------------ metrics and extras


def _check_metrics(rows: Any) -> None:
    _check_list(rows, "a list of rows (one per epoch)", MAX_ROWS)
    previous = 0
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"row {number} is {_shown(row)}, not a flat dict of metrics")
        if len(row) > MAX_ROW_KEYS:
            raise ValueError(f"row {number} holds {len(row)} metrics, more than {MAX_ROW_KEYS}")
        for key, value in row.items():
            if type(key) is not str:
                raise ValueError(f"row {number} has the key {_shown(key)}, not a metric's name")
            if type(value) not in _SCALARS:
                raise ValueError(
                    f"row {number}'s {key!r} is {_shown(value)}, not a number or a name "
                    "(rows are flat)"
                )
        epoch: Any = row.get("epoch")
        if not _is_count(epoch, previous + 1):
            raise ValueError(
                f"row {number}'s 'epoch' is {_shown(epoch)}, not an epoch after the row "
                f"before's ({previous})"
            )
        previous = epoch


def _check_digest(digest: Any) -> None:
    if type(digest) is not str or not _DIGEST.fullmatch(digest):
        raise ValueError(f"is {_shown(digest)}, not a SHA-256 (64 hexadecimal digits)")


def _check_indices(indices: Any) -> None:
    """1-D distinct integer row indices (a float tensor would fail as an index later)."""
    if not isinstance(indices, Tensor) or indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"is {_shown(indices)}, not row indices (a 1-D torch.int64 tensor)")
    if indices.dim() != 1 or len(indices) > MAX_STEPS:
        raise ValueError(f"is {_shown(indices)}, not row indices (a 1-D torch.int64 tensor)")
    if len(indices) and int(indices.min()) < 0:
        raise ValueError(f"holds the negative row {int(indices.min())}")
    if len(torch.unique(indices)) != len(indices):
        raise ValueError("names a row twice")


# ------------------------------------------------------------------------ companions

COMPANION_ENTRIES = ("selection", "args", "train_loss")
"""What the run's other checkpoints hold beside the weights and the config: ``best.pt`` the
``selection`` (the epoch it is of, the validation metric and its value) and the run's
``args``; the CVAE's ``baseline.pt`` the run's ``args`` and its ``train_loss`` (one per
epoch)."""


def check_companion_payload(
    payload: dict,
    path: Path,
    run: dict,
    run_args: dict[str, Any],
    *,
    ignored: Iterable[str],
    defaults: dict[str, Any],
    selected: bool = False,
) -> None:
    """Refuse, with one ``ValueError`` naming ``path`` and the mismatch, a checkpoint written
    beside a run's ``checkpoint.pt`` (``best.pt``, the CVAE's ``baseline.pt``: ``payload``,
    as :func:`~pyro_vae.checkpoint.load_checkpoint` returns it) that does not belong to that
    run (``run``, its checkpoint, checked by :func:`check_run_payload`; ``run_args``, its
    arguments with ``defaults`` for the flags it predates): an entry that no such file holds,
    arguments other than the run's but for the ``ignored`` ones (what a resume may change,
    and the directory), a ``baseline.pt`` trained for another number of epochs, a
    ``best.pt`` of another config or of an epoch whose metric the run's rows do not hold.

    A ``best.pt`` written before it recorded the run's arguments is checked by its selection
    alone. ``selected``: the file must hold a selection (``best.pt``, whose weights are taken
    for the kept epoch's: another checkpoint of the run copied over it would pass the rest).
    """
    if selected and "selection" not in payload:
        raise ValueError(
            f"{path}: holds no selection (which epoch it is, chosen how): not a {path.name} "
            "that scripts/train.py wrote"
        )
    try:
        _check_companion(payload, run, run_args, set(ignored), defaults)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _check_companion(
    payload: dict, run: dict, run_args: dict[str, Any], ignored: set[str], defaults: dict
) -> None:
    for key in payload:
        if key not in _LOADED and key not in COMPANION_ENTRIES:
            raise ValueError(f"holds {_shown(key)}, an entry no run of scripts/train.py writes")
    model = run["config"].get("model", "vae")
    if "args" in payload:
        _entry("args", _check_args, payload["args"], model)
        args = {**defaults, **payload["args"]}
        for key in sorted(set(args) | set(run_args)):
            if key in ignored or key == "num_epochs":
                continue
            mine, theirs = args.get(key, "(none)"), run_args.get(key, "(none)")
            if mine != theirs:
                raise ValueError(
                    f"belongs to another run: its --{key.replace('_', '-')} is {_shown(mine)}, "
                    f"this run's {_shown(theirs)}"
                )
    # After the arguments, which name what differs.
    if "selection" in payload:
        if payload["config"] != run["config"]:
            raise ValueError(
                "its config is not the run's (checkpoint.pt's): not this run's weights"
            )
        _entry("selection", _check_selection, payload["selection"], run)
    if "train_loss" in payload:
        # Trained after the run, for its --num-epochs (or, when the last resume asked for no
        # more, the epochs done).
        losses = payload["train_loss"]
        if not isinstance(losses, list) or len(losses) > MAX_STEPS or _first_not(_NUMBERS, losses):
            raise ValueError(f"its 'train_loss' is {_shown(losses)}, not a list of numbers")
        budgets = {run_args["num_epochs"], run["epoch"]}
        if len(losses) not in budgets:
            raise ValueError(
                f"belongs to another run: it trained for {len(losses)} epoch(s), and this run's "
                f"budget is {run_args['num_epochs']} (--num-epochs)"
            )


def _check_selection(selection: Any, run: dict) -> None:
    _check_dict(selection, "a selection (a dict)", 4)
    metric = selection.get("metric")
    wanted = {"epoch", "metric", "how"} | ({"value"} if metric is not None else set())
    if set(selection) != wanted:
        raise ValueError(f"has the keys {sorted(map(str, selection))}, not {sorted(wanted)}")
    epoch, how, value = selection["epoch"], selection["how"], selection.get("value")
    # best.pt is written before the checkpoint of its epoch: one epoch ahead at most.
    if not _is_count(epoch, 1) or epoch > run["epoch"] + 1:
        raise ValueError(
            f"names epoch {_shown(epoch)}, not an epoch of this run (it has finished "
            f"{run['epoch']})"
        )
    if type(how) is not str or not (metric is None or type(metric) is str):
        raise ValueError("does not say how its epoch was chosen")
    if metric is None:
        return
    if type(value) not in _NUMBERS:
        raise ValueError(f"'value' is {_shown(value)}, not a number")
    row = next((row for row in run["metrics"] if row.get("epoch") == epoch), None)
    if row is not None and row.get(metric) != value:
        raise ValueError(
            f"says epoch {epoch}'s {metric} was {value!r}, and this run's metrics say "
            f"{_shown(row.get(metric))}: not this run's weights"
        )


EXTRAS: dict[str, Callable[[Any], None]] = {
    "labelled_indices": _check_indices,
    "validation_indices": _check_indices,
}
"""The entries a model kind or a run adds to its checkpoint (``Setup.checkpoint_extra``, the
runner's own), and the check of each: M2's labelled rows, the rows held out for validation."""
