"""Checkpoints: a model's ``state_dict`` plus the plain arguments that rebuild it.

The config's ``"model"`` key names the function that rebuilds it (:data:`MODEL_NAMES`):
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

1. the path is a regular file (a FIFO or a device would block or never end);
2. the archive is whole: every member is stored uncompressed, as ``torch.save`` writes them
   (a compressed member could inflate to any size), the members fit in the file, and each
   one's CRC-32 matches its bytes. ``torch.load`` checks no CRC, so a flipped bit in a weight
   would otherwise load silently. A CRC catches accidental damage (flipped bits, overwritten
   or missing bytes), not a deliberate edit that recomputes it: no checksum stored in the
   file could. Checkpoints written before this check have the same format and CRCs, and are
   checked the same way;
3. the pickle holds only tensors and plain values (``weights_only=True``);
4. its structure: the format tag, the config's model name, its other keys (the builder's
   arguments, every one without a default present) and types (sizes plain positive ints;
   a VAE config of version 0.1 is first mapped to today's names, see
   :func:`upgrade_config`), names mapped to tensors;
5. sizes: every tensor is backed by bytes of its own in the file, and the config's model
   holds no more weights than the checkpoint, so that a small crafted file cannot make the
   model's construction allocate gigabytes. For a VAE, a lower bound on its weights is
   computed from the config (:func:`_least_weights`). The other models are built on the
   ``meta`` device, which allocates nothing (their hidden layers first counted against the
   tensors held, since even there each layer takes time), and their weights must be the
   checkpoint's, name for name and shape for shape; a config whose meta build fails is
   refused;
6. the weights are finite.

Then the model is built, and its weights must fit it exactly. Each refusal is a
``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import inspect
import io
import itertools
import math
import os
import pickle
import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn

from pyro_vae._files import atomic_write
from pyro_vae.components.encoders import IAFEncoder
from pyro_vae.data import check_device
from pyro_vae.models.build import build_vae, describe

FORMAT = "pyro_vae.checkpoint/1"

MODEL_NAMES = ("vae", "m2", "cvae", "cvae-baseline")
"""The values of a config's ``"model"`` key: which builder rebuilds the model. No key means
``"vae"`` (:func:`~pyro_vae.models.build.build_vae`), so that every checkpoint written before the
key
existed loads as it did."""

# The config key that names the builder; every other key is one of the builder's arguments.
_MODEL_KEY = "model"
_BUILD_KEYS = frozenset(inspect.signature(build_vae).parameters) | {_MODEL_KEY}
# The size of the IAF encoder's context h(x); build_vae leaves it at its default.
_IAF_CONTEXT = inspect.signature(IAFEncoder).parameters["context_dim"].default

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

    ``config["model"]`` names the builder, one of :data:`MODEL_NAMES`: absent or ``"vae"``,
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
        _check_payload(_unpickle(data, torch.device("cpu")), len(data))
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
    device = check_device(map_location)
    data = _read_regular_file(path)
    try:
        _check_archive(data)
        payload = _unpickle(data, device)
        _check_payload(payload, len(data))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    config = payload["config"]
    try:
        module = _builder(config)(**_arguments(config))
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
    """The config's model name, checked by :func:`_check_config` to be one of MODEL_NAMES."""
    return str(config.get(_MODEL_KEY, "vae"))


def _builder(config: dict[str, Any]) -> Callable[..., nn.Module]:
    """The function that builds the config's model from its other keys."""
    kind = _kind(config)
    if kind == "vae":
        return build_vae  # looked up at each call, so that a test can watch it
    # Imported here: the model modules import parts of the package that need not load with
    # every checkpoint, and a later import of this module from theirs cannot become a cycle.
    if kind == "m2":
        from pyro_vae.models import m2 as semisupervised

        return semisupervised.build_m2
    from pyro_vae.models import cvae as conditional

    return conditional.build_cvae if kind == "cvae" else conditional.build_cvae_baseline


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


def _read_regular_file(path: str | os.PathLike) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"{path}: cannot read the checkpoint ({error.strerror})") from error
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO or a device"
            raise ValueError(f"{path}: not a loadable checkpoint: it is {kind}, not a file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)


def _check_archive(data: bytes) -> None:
    """Refuse anything but a whole, uncompressed zip archive: what torch.save writes."""
    if not data:
        raise ValueError("not a loadable checkpoint: the file is empty")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception as error:  # a damaged archive can fail in many ways; all mean the same
        if not data.startswith(b"PK\x03\x04"):  # how every zip archive begins
            raise ValueError(
                "not a loadable checkpoint: not a zip archive, which is what torch.save writes"
            ) from error
        raise ValueError(
            f"not a loadable checkpoint: the file is corrupt or truncated ({error})"
        ) from error
    with archive:
        members = archive.infolist()
        for member in members:
            if member.compress_type != zipfile.ZIP_STORED or member.file_size != (
                member.compress_size
            ):
                raise ValueError(
                    f"not a loadable checkpoint: its member {member.filename} is compressed, "
                    "which torch.save never does (and which could inflate to any size)"
                )
        # Overlapping members could make a small file read as a large one.
        stored = sum(member.file_size for member in members)
        if stored > len(data):
            raise ValueError(
                f"not a loadable checkpoint: its members claim {stored} bytes, more than the "
                f"file's {len(data)}"
            )
        try:
            damaged = archive.testzip()  # reads every member and checks its CRC-32
        except Exception as error:
            raise ValueError(f"not a loadable checkpoint: the file is corrupt ({error})") from error
    if damaged is not None:
        raise ValueError(
            f"not a loadable checkpoint: the file is corrupt: its member {damaged} fails its "
            "CRC-32 check (damaged on disk or in transit)"
        )


def _unpickle(data: bytes, device: torch.device) -> Any:
    try:
        with warnings.catch_warnings():
            # A foreign pickle draws a warning about its protocol before it is refused below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is many lines; keep the one that says what was refused.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if any("GLOBAL" in line for line in lines):
            # weights_only refused a named Python object: unpickling it could run code.
            detail = next(line for line in lines if "GLOBAL" in line)
            raise ValueError(
                "not a loadable checkpoint: it holds objects other than tensors and plain "
                f"values, which could run code when loaded; refused without loading them "
                f"({detail})"
            ) from error
        detail = next((line for line in lines if "Unsupported" in line), lines[-1] if lines else "")
        raise ValueError(
            f"not a loadable checkpoint: its pickled data are not a checkpoint's ({detail})"
        ) from error
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"not a loadable checkpoint ({type(error).__name__}: {first_line})"
        ) from error


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
            return _built_on_meta(config)
        except Exception as error:
            if _kind(config) != "vae":
                # Its models build on meta: a failure there is the config's.
                raise ValueError(f"its build on the meta device fails ({error})") from error
            # Some operation did not run on meta (Pyro's autoregressive networks read a value
            # while they are built). The CPU build decides, also whether the config is at fault.
            return build_vae(**_arguments(config))


def _built_on_meta(config: dict[str, Any]) -> nn.Module:
    """The config's model with every tensor on the meta device: shapes, no values, no memory.
    Its models' own checks of their parts run there too (shapes only)."""
    with torch.random.fork_rng(devices=[]):
        # Validation reads values (a meta tensor has none); the shapes are checked anyway.
        with torch.device("meta"), pyro.validation_enabled(False):
            return _builder(config)(**_arguments(config))


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
    for name, value in state_dict.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"not a whole checkpoint: its state_dict maps {name!r} to a "
                f"{type(value).__name__}, not a tensor"
            )
    _check_tensor_sizes(payload, file_size)
    if _kind(payload["config"]) == "vae":
        least = _least_weights(payload["config"])
        held = sum(value.numel() for value in state_dict.values())
        if least > held:
            raise ValueError(
                f"refused before building its model: the config ({_sizes(payload['config'])}) "
                f"describes a model of at least {least} weights, and the checkpoint holds {held}"
            )
    else:
        _check_fits_on_meta(payload["config"], state_dict)
    for name, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"its weights {name!r} hold NaN or infinite values")


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
        built = _built_on_meta(config)
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
    """The config names a model of :data:`MODEL_NAMES`, its other keys are that builder's
    arguments, and its values plain Python of the right kind."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    kind = config.get(_MODEL_KEY, "vae")
    if not isinstance(kind, str) or kind not in MODEL_NAMES:
        shown = repr(kind) if isinstance(kind, str) else type(kind).__name__
        raise ValueError(
            f"config[{_MODEL_KEY!r}] is {shown}: not a model a checkpoint holds (one of "
            f"{', '.join(MODEL_NAMES)})"
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


def _check_tensor_sizes(payload: dict, file_size: int) -> None:
    """Every tensor anywhere in the payload is backed by bytes of its own in the file.

    A tensor is saved as a view (sizes and strides) of a stored block of bytes; a crafted view
    (stride 0, or many views of one block) can claim far more values than the file holds, and
    any copy of it (into a model, an optimizer) would allocate them all.
    """
    claimed = 0
    seen: set[int] = set()
    pending: list[Any] = [payload]
    while pending:  # a loop, not recursion: pickled containers can nest deeply
        item = pending.pop()
        if id(item) in seen:  # shared containers are walked once
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, torch.Tensor):
            size = item.numel() * item.element_size()
            if size > item.untyped_storage().nbytes():
                raise ValueError(
                    f"not a loadable checkpoint: a tensor of shape {tuple(item.shape)} claims "
                    f"{size} bytes from a stored block of {item.untyped_storage().nbytes()}"
                )
            claimed += size
    if claimed > file_size:
        raise ValueError(
            f"not a loadable checkpoint: its tensors claim {claimed} bytes, more than the "
            f"file's {file_size}"
        )


def _least_weights(config: dict[str, Any]) -> int:
    """A lower bound on the number of weights of ``build_vae(**config)``, from the structure
    of its parts, without building it. A model holding more weights than its checkpoint
    cannot be the one the checkpoint came from; and since the bound is within a small factor
    of the true count (tested), building costs a small multiple of the weights stored.

    The terms are weight matrices of: the encoder network and its read-out of the
    posterior's parameters (loc; loc and scale; plus the off-diagonal entries for the full
    covariance); the decoder (an MLP mirroring ``hidden_dims``, or for network ``conv`` a
    linear map from z to a 64-channel feature map of a sixteenth of the pixels, as two
    stride-2 layers leave, and the encoder's read-out from the same map); each
    autoregressive flow layer (latent_dim inputs, and the IAF's context, to 4 * latent_dim
    hidden units, to two outputs per latent); the mixture's means and scales and the
    VampPrior's pseudo-inputs; a learned scale per feature.
    """
    data_dim, latent_dim = config["data_dim"], config["latent_dim"]
    hidden = list((400,) if config.get("hidden_dims") is None else config["hidden_dims"])
    flow_depth = config.get("flow_depth", 2)
    encoder = config.get("encoder", "diagonal")
    outputs = {
        "delta": latent_dim,
        "full-covariance": 2 * latent_dim + latent_dim * (latent_dim - 1) // 2,
        "iaf": 2 * latent_dim + _IAF_CONTEXT,
    }.get(encoder, 2 * latent_dim)
    if config.get("network", "mlp") == "conv":
        *channels, height, width = config["image_shape"]  # _check_config asks for one
        features = 64 * math.ceil(height / 4) * math.ceil(width / 4)
        least = features * latent_dim + features * outputs
        least += 32 * 9 * (channels or [1])[0]  # the first layer: 32 filters of 3x3 per channel
    else:  # network mlp: latent -> reversed(hidden) -> data, deterministic or Bayesian
        widths = [data_dim, *hidden]
        least = 2 * sum(a * b for a, b in itertools.pairwise(widths))
        least += widths[-1] * latent_dim + widths[-1] * outputs
    if config.get("likelihood_scale") == "learned-per-feature" and config.get("likelihood") in (
        "normal",
        "laplace",
        "discretized-logistic",
    ):
        least += data_dim
    if encoder == "iaf":  # each layer also reads the context h(x)
        least += flow_depth * (12 * latent_dim**2 + 4 * latent_dim * _IAF_CONTEXT)
    prior = config.get("prior", "standard-normal")
    if prior == "flow":
        least += flow_depth * 12 * latent_dim**2
    elif prior == "mixture":
        least += 2 * (config.get("num_components") or 10) * latent_dim
    elif prior == "vamp":
        least += (config.get("num_components") or 100) * data_dim
    return least


def _sizes(config: dict[str, Any]) -> str:
    keys = ("data_dim", "latent_dim", "hidden_dims", "image_shape", "num_components", "flow_depth")
    return ", ".join(f"{k} {config[k]}" for k in keys if k in config)
