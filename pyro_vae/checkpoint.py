"""Checkpoints: a model's ``state_dict`` plus the plain arguments that rebuild it.

The config's ``"model"`` key names the function that rebuilds it, in :data:`MODEL_BUILDERS`:
absent or ``"vae"``, :func:`~pyro_vae.models.build.build_vae`, so that every checkpoint written
before the key existed loads as it did; ``"m2"``, :func:`~pyro_vae.models.m2.build_m2`;
``"cvae"`` and ``"cvae-baseline"``, :func:`~pyro_vae.models.cvae.build_cvae` and
:func:`~pyro_vae.models.cvae.build_cvae_baseline`. The config's other keys are its arguments.

A checkpoint is what ``torch.save`` writes (a zip archive of uncompressed members), read back
with ``torch.load(weights_only=True)``: no pickled user objects go in, so loading cannot run
code. Files are written to a temporary name and renamed, so a crash mid-write leaves the
previous checkpoint intact; :func:`save_checkpoint` refuses, before writing, anything that
:func:`load_checkpoint` would refuse.

:func:`load_checkpoint` checks, in this order and before building anything:

1. the file's bytes (:mod:`pyro_vae._checkpoint_files`): a regular file, a whole archive of
   uncompressed members whose CRC-32s match, a pickle of tensors and plain values only;
2. its structure: the format tag, the config's model name, its other keys (the builder's
   arguments, every one without a default present) and types (sizes plain positive ints;
   a VAE config of version 0.1 is first mapped to today's names, see
   :func:`upgrade_config`), names mapped to tensors;
3. sizes: every tensor is backed by bytes of its own in the file, and the config's model
   holds no more weights than the checkpoint, so that a small crafted file cannot make the
   model's construction allocate gigabytes. For a VAE, a lower bound on its weights is
   computed from the config (:func:`~pyro_vae.models.build.least_weights`). The other models
   are built on the ``meta`` device, which allocates nothing (their hidden layers first
   counted against the tensors held, since even there each layer takes time), and their
   weights must be the checkpoint's, name for name and shape for shape; a config whose meta
   build fails is refused;
4. the weights are finite.

Then the model is built, and its weights must fit it exactly. Each refusal is a
``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import inspect
import io
import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn

from pyro_vae import _checkpoint_files as files
from pyro_vae._files import atomic_write
from pyro_vae.data import check_device
from pyro_vae.models.build import build_vae, describe, least_weights
from pyro_vae.models.cvae import build_cvae, build_cvae_baseline
from pyro_vae.models.m2 import build_m2

FORMAT = "pyro_vae.checkpoint/1"

MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vae": build_vae,
    "m2": build_m2,
    "cvae": build_cvae,
    "cvae-baseline": build_cvae_baseline,
}
"""The model kinds a checkpoint holds: each value of a config's ``"model"`` key and the
function that rebuilds the model from the config's other keys, which take plain values only.
No key means ``"vae"``, so that every checkpoint written before the key existed loads as it
did. Looked up at each build, so that a test can watch a builder."""

MODEL_NAMES = tuple(MODEL_BUILDERS)
"""The values of a config's ``"model"`` key (the registry's keys)."""

# The config key that names the builder; every other key is one of the builder's arguments.
_MODEL_KEY = "model"
_BUILD_KEYS = frozenset(inspect.signature(build_vae).parameters) | {_MODEL_KEY}

# The largest pixel depth: 16-bit images. num_levels sets no weight, only work per pixel.
_MAX_NUM_LEVELS = 2**16

# Version 0.1's decoder names, as (network, decoder) today: "conv" swapped both networks.
_OLD_DECODERS = {
    "mlp": ("mlp", "deterministic"),
    "conv": ("conv", "deterministic"),
    "bayesian-mlp": ("mlp", "bayesian"),
}


def upgrade_config(config: Any) -> Any:
    """A build_vae config saved by pyro_vae 0.1, in today's names (a copy); any other config
    (or a value that is not a dict, for the checks to refuse) unchanged.

    0.1 wrote ``num_bins`` for ``num_levels``, and ``decoder`` named the network: ``"conv"``
    (a convolutional encoder network and decoder, which ignored ``hidden_dims``), ``"mlp"`` or
    ``"bayesian-mlp"``. Today ``network`` names the architecture of both sides and ``decoder``
    whether its weights are ``"deterministic"`` or ``"bayesian"``. A 0.1 config never has a
    ``network`` key, so the mapping is unambiguous; a config that mixes the two vocabularies
    is left for build_vae to refuse.
    """
    # Only build_vae's configs had another vocabulary; the other models' came later.
    if not isinstance(config, dict) or config.get(_MODEL_KEY, "vae") != "vae":
        return config
    old_decoder = config.get("decoder") in _OLD_DECODERS and "network" not in config
    old_levels = "num_bins" in config and "num_levels" not in config
    if not (old_decoder or old_levels):
        return config
    config = dict(config)
    if old_levels:
        config["num_levels"] = config.pop("num_bins")
    if old_decoder:
        config["network"], config["decoder"] = _OLD_DECODERS[config["decoder"]]
        if config["network"] == "conv":
            # 0.1 took hidden_dims with conv and ignored it; today build_vae refuses it.
            config.pop("hidden_dims", None)
    return config


def save_checkpoint(
    path: str | os.PathLike, module: nn.Module, config: dict[str, Any], **extra: Any
) -> None:
    """Write ``module``'s weights with ``config``, the keyword arguments that rebuild it, and
    any plain ``extra`` entries (epoch, metrics, script arguments, a
    :class:`~pyro_vae.infer.fit.TrainingState`'s ``to_dict()``).

    ``config["model"]`` names the builder in :data:`MODEL_BUILDERS`: absent or ``"vae"``,
    :func:`~pyro_vae.models.build.build_vae` (component names, sizes); ``"m2"``,
    :func:`~pyro_vae.models.m2.build_m2`; ``"cvae"`` and ``"cvae-baseline"``,
    :func:`~pyro_vae.models.cvae.build_cvae` and
    :func:`~pyro_vae.models.cvae.build_cvae_baseline`. The other keys are its arguments.

    Everything must be tensors or plain Python values (no modules, classes or numpy scalars),
    and the config's sizes plain ints.

    :raises ValueError: before anything is written, for what :func:`load_checkpoint` would
        refuse: a config value of the wrong type, a config whose model is not ``module`` (of
        another class, or its weights differ in name or shape: the first that differs is
        named; for the models other than the VAE, or a plain setting such as M2's ``alpha``
        differs), an object ``weights_only`` loading refuses, non-finite weights.
    """
    path = Path(path)
    try:
        # A config in 0.1's names would load (mapped), but new files are written in today's.
        if upgrade_config(config) is not config:
            raise ValueError(
                "config uses pyro_vae 0.1 names (num_bins, or decoder 'mlp', 'conv' or "
                "'bayesian-mlp'); write num_levels, network and decoder as build_vae takes them"
            )
        _check_config(config)  # first of the checks, to name the key of a numpy int, say
        _check_describes(config, module)
        payload = {"format": FORMAT, "config": dict(config), "state_dict": module.state_dict()}
        payload.update(extra)
        buffer = io.BytesIO()
        try:
            torch.save(payload, buffer)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            raise ValueError(f"it holds something that cannot be saved ({error})") from error
        data = buffer.getvalue()
        # Read back as load_checkpoint reads it: what it would refuse is refused now, while the
        # previous checkpoint is still there.
        _check_payload(files.unpickle(data, torch.device("cpu")), len(data))
    except ValueError as error:
        raise ValueError(f"{path}: checkpoint not written: {error}") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as file:
        file.write(data)


def load_checkpoint(
    path: str | os.PathLike, map_location: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path`` (a :class:`~pyro_vae.models.vae.VAE`, or the model its
    config's ``"model"`` names, see :func:`save_checkpoint`) with its weights; return it with
    the whole checkpoint dictionary.

    The checks, in order, are in this module's docstring. Tensors saved on a GPU load onto
    ``map_location`` (the CPU by default), so a checkpoint from a GPU machine loads on one
    without.

    :raises FileNotFoundError: when there is no file at ``path``.
    :raises ValueError: when the file is not a whole pyro_vae checkpoint, holds something
        it should not, or does not fit the model its config describes; the message names
        the file and says which.
    """
    check_device(map_location)  # a device this machine lacks is refused before any read
    return checkpoint_from_bytes(files.read_regular_file(path), path, map_location)


def checkpoint_from_bytes(
    data: bytes, path: str | os.PathLike, map_location: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_checkpoint` of the bytes ``data`` already read from ``path`` (which the
    errors name): a caller that also hashes them knows its digest is of what it loaded."""
    device = check_device(map_location)
    try:
        files.check_archive(data)
        payload = files.unpickle(data, device)
        _check_payload(payload, len(data))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    config = payload["config"]
    try:
        module = build_model(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: its config does not describe a model: {error}") from error
    try:
        module.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        # torch lists every mismatched tensor on its own line; one line says it all here.
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        details = problems[0] if problems else str(error)
        if len(problems) > 1:
            details += f" (and {len(problems) - 1} more)"
        raise ValueError(
            f"{path}: weights do not fit the saved config ({_summary(config)}): {details}"
        ) from error
    return module.to(device), payload


def _kind(config: dict[str, Any]) -> str:
    """The config's model name, checked by :func:`_check_config` to be one of
    :data:`MODEL_BUILDERS`."""
    return str(config.get(_MODEL_KEY, "vae"))


def _builder(config: dict[str, Any]) -> Callable[..., nn.Module]:
    """The function that builds the config's model from its other keys."""
    return MODEL_BUILDERS[_kind(config)]


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model a checkpoint config describes, built by the builder its ``"model"`` names
    (:func:`~pyro_vae.models.build.build_vae` when it names none)."""
    return _builder(config)(**_arguments(config))


def _arguments(config: dict[str, Any]) -> dict[str, Any]:
    """The builder's keyword arguments: the config without its model name."""
    return {key: value for key, value in config.items() if key != _MODEL_KEY}


def _summary(config: dict[str, Any]) -> str:
    """The config in a few words, for messages."""
    if _kind(config) == "vae":
        return f"latent_dim {config.get('latent_dim')}, {describe(config)}"
    sizes = ", ".join(f"{key} {value}" for key, value in _arguments(config).items())
    return f"model {_kind(config)}, {sizes}"


def _check_describes(config: dict[str, Any], module: nn.Module) -> None:
    """The config's builder makes a model like ``module``: of its class, with the same
    weights' names and shapes (and, for the models other than the VAE, the same plain
    settings it keeps, such as M2's ``alpha``).

    Otherwise the checkpoint would be written and refused only when loaded, when the model it
    came from may be gone. The config's model is built with its tensors on the ``meta``
    device, which records shapes and allocates nothing; Pyro's autoregressive networks (the
    VAE's ``flow`` prior, ``iaf`` encoder) cannot be built there, and those VAEs are built
    on the CPU instead. The build draws no random numbers from the caller's stream.
    """
    try:
        built = _built(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"its config does not describe a model: {error}") from error
    if not isinstance(module, type(built)):
        raise ValueError(
            f"the config ({_summary(config)}) describes a {type(built).__name__}, and the "
            f"model saved is a {type(module).__name__}"
        )
    problem = _first_difference(_shapes(built), _shapes(module), "the config's model", "model")
    if problem is None and _kind(config) != "vae":
        problem = _setting_difference(config, built, module)
    if problem is not None:
        raise ValueError(
            f"the config ({_summary(config)}) does not describe the model saved: {problem}"
        )


def _shapes(module: nn.Module | dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    state_dict = module if isinstance(module, dict) else module.state_dict()
    return {name: tuple(value.shape) for name, value in state_dict.items()}


def _first_difference(
    expected: dict[str, tuple[int, ...]],
    actual: dict[str, tuple[int, ...]],
    expected_name: str,
    actual_name: str,
) -> str | None:
    """The first weight that ``actual`` has and ``expected`` has not, or of another shape, or
    that ``expected`` has and ``actual`` has not; ``None`` when they agree."""
    for name, shape in actual.items():
        if name not in expected:
            return f"the {actual_name} has {name!r} {shape}, which {expected_name} has not"
        if expected[name] != shape:
            return f"{name!r} is {shape} in the {actual_name} but {expected[name]} for the config"
    missing = [name for name in expected if name not in actual]
    if missing:
        name = missing[0]
        return f"{expected_name} has {name!r} {expected[name]}, which the {actual_name} has not"
    return None


def _setting_difference(config: dict[str, Any], built: nn.Module, module: nn.Module) -> str | None:
    """The first of the config's keys that both models keep as an attribute, with other
    values (M2's ``alpha``, say, which no weight's shape shows).

    β is left out: fit's KL warm-up lowers ``module.beta`` while it trains, and a checkpoint
    taken then holds the β to return to, which the config has."""
    for key in _arguments(config):
        if key == "beta" or not (hasattr(built, key) and hasattr(module, key)):
            continue
        if getattr(built, key) != getattr(module, key):
            return (
                f"its {key} is {getattr(module, key)!r}, and the config's model's "
                f"{getattr(built, key)!r}"
            )
    return None


def _built(config: dict[str, Any]) -> nn.Module:
    """The config's model, built on the meta device when it can be (see
    :func:`_check_describes`), on a fork of the random state."""
    with torch.random.fork_rng(devices=[]):
        try:
            return built_on_meta(config)
        except Exception as error:
            if _kind(config) != "vae":
                # Its models build on meta: a failure there is the config's.
                raise ValueError(f"its build on the meta device fails ({error})") from error
            # Some operation did not run on meta (Pyro's autoregressive networks read a value
            # while they are built). The CPU build decides, also whether the config is at fault.
            return build_model(config)


def built_on_meta(config: dict[str, Any]) -> nn.Module:
    """The config's model with every tensor on the meta device: shapes, no values, no memory.
    Its models' own checks of their parts run there too (shapes only)."""
    with torch.random.fork_rng(devices=[]):
        # Validation reads values (a meta tensor has none); the shapes are checked anyway.
        with torch.device("meta"), pyro.validation_enabled(False):
            return build_model(config)


def _check_payload(payload: Any, file_size: int) -> None:
    """Everything about an unpickled checkpoint that can be checked without building it."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not a pyro_vae checkpoint (no format {FORMAT!r})")
    for key, kind in (("config", dict), ("state_dict", dict)):
        if not isinstance(payload.get(key), kind):
            found = type(payload[key]).__name__ if key in payload else "nothing"
            raise ValueError(f"not a whole checkpoint: its {key!r} should be a dict, got {found}")
    payload["config"] = upgrade_config(payload["config"])
    _check_config(payload["config"])
    state_dict = payload["state_dict"]
    files.check_state_dict(state_dict)
    files.check_tensor_sizes(payload, file_size)
    if _kind(payload["config"]) == "vae":
        least = least_weights(payload["config"])
        held = sum(value.numel() for value in state_dict.values())
        if least > held:
            raise ValueError(
                f"refused before building its model: the config ({_sizes(payload['config'])}) "
                f"describes a model of at least {least} weights, and the checkpoint holds {held}"
            )
    else:
        _check_fits_on_meta(payload["config"], state_dict)
    files.check_finite(state_dict)


def _check_fits_on_meta(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """The size bound of the models other than the VAE, before their construction allocates
    anything: the config's model, built on the meta device (which allocates nothing), holds
    exactly the weights the checkpoint holds, name for name and shape for shape.

    Building it on meta is cheap in memory whatever the sizes, and in time except for the
    number of layers, which the first test bounds: every hidden width is a layer with a weight
    tensor of its own, in the file."""
    layers = len(config.get("hidden_dims") or ())
    if layers > len(state_dict):
        raise ValueError(
            f"refused before building its model: the config's hidden_dims has {layers} "
            f"layers, and the checkpoint holds {len(state_dict)} tensors"
        )
    try:
        built = built_on_meta(config)
    except Exception as error:
        raise ValueError(
            f"refused before building its model: its config does not describe a model: its "
            f"build on the meta device fails ({error})"
        ) from error
    expected = _shapes(built)
    needed = sum(math.prod(shape) for shape in expected.values())
    held = sum(value.numel() for value in state_dict.values())
    if needed > held:
        raise ValueError(
            f"refused before building its model: the config ({_summary(config)}) describes "
            f"a model of {needed} weights, and the checkpoint holds {held}"
        )
    problem = _first_difference(expected, _shapes(state_dict), "the config's model", "file")
    if problem is not None:
        raise ValueError(
            f"refused before building its model: weights do not fit the saved config "
            f"({_summary(config)}): {problem}"
        )


def _check_config(config: Any) -> None:
    """The config names a model of :data:`MODEL_BUILDERS`, its other keys are that builder's
    arguments, and its values plain Python of the right kind."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    kind = config.get(_MODEL_KEY, "vae")
    if not isinstance(kind, str) or kind not in MODEL_BUILDERS:
        shown = repr(kind) if isinstance(kind, str) else type(kind).__name__
        raise ValueError(
            f"config[{_MODEL_KEY!r}] is {shown}: not a model a checkpoint holds (one of "
            f"{', '.join(MODEL_BUILDERS)})"
        )
    if kind != "vae":
        _check_other_config(config)
        return
    unknown = [key for key in config if key not in _BUILD_KEYS]
    if unknown:
        raise ValueError(f"config has keys that build_vae does not take: {unknown}")
    for key in ("data_dim", "latent_dim"):
        if key not in config:
            raise ValueError(f"config has no {key!r}")
    if config.get("network") == "conv" and config.get("image_shape") is None:
        raise ValueError("config: network 'conv' needs an image_shape")
    for key, value in config.items():
        if key in ("data_dim", "latent_dim", "flow_depth", "num_levels") or (
            key == "num_components" and value is not None
        ):
            _check_size(f"config[{key!r}]", value)
        elif key in ("hidden_dims", "image_shape") and value is not None:
            _check_sizes(key, value)
            if key == "image_shape" and len(value) not in (2, 3):
                raise ValueError(
                    f"config['image_shape'] must be (height, width) or (channels, height, "
                    f"width), got {value}"
                )
        else:
            _check_plain(key, value)
    if config.get("num_levels", 2) > _MAX_NUM_LEVELS:
        raise ValueError(
            f"config['num_levels'] is {config['num_levels']}: more pixel levels than 16-bit "
            f"images have ({_MAX_NUM_LEVELS})"
        )


def _check_other_config(config: dict[str, Any]) -> None:
    """A config of a model other than the VAE: its keys are its builder's arguments, every
    argument without a default is there, sizes (``*_dim``, ``num_*``) are plain positive
    ints, ``hidden_dims`` and ``image_shape`` lists of them, every other value a plain number
    or name. Whether the values make a model is for the builder to say (on meta, first)."""
    kind = _kind(config)
    parameters = inspect.signature(_builder(config)).parameters
    unknown = [key for key in _arguments(config) if key not in parameters]
    if unknown:
        raise ValueError(f"config has keys that the {kind} builder does not take: {unknown}")
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and name not in config:
            raise ValueError(f"config of a {kind} has no {name!r}")
    for key, value in _arguments(config).items():
        if key.endswith("_dim") or key.startswith("num_"):
            _check_size(f"config[{key!r}]", value)
        elif key in ("hidden_dims", "image_shape") and value is not None:
            _check_sizes(key, value)
        else:
            _check_plain(key, value)


def _check_sizes(key: str, value: Any) -> None:
    """``config[key]`` is a list (or tuple) of plain positive ints."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"config[{key!r}] must be a list of ints, got {type(value).__name__}")
    for i, size in enumerate(value):
        _check_size(f"config[{key!r}][{i}]", size)


def _check_plain(key: str, value: Any) -> None:
    """``config[key]`` is None, a plain number or a name: nothing weights_only refuses."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise ValueError(f"config[{key!r}] must be a number or a name, got {type(value).__name__}")


def _check_size(what: str, value: Any) -> None:
    # type() rather than isinstance: a bool is an int, and numpy ints are not plain Python.
    if type(value) is not int:
        raise ValueError(f"{what} must be a plain int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be a positive int, got {value}")


def _sizes(config: dict[str, Any]) -> str:
    keys = ("data_dim", "latent_dim", "hidden_dims", "image_shape", "num_components", "flow_depth")
    return ", ".join(f"{k} {config[k]}" for k in keys if k in config)
