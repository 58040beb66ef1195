"""Checkpoints: a model's ``state_dict`` plus the plain arguments that rebuild it.

No pickled user objects go in, so loading uses ``torch.load(weights_only=True)`` and cannot run
code. Files are written to a temporary name and renamed, so a crash mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from pyro_vae._files import atomic_write
from pyro_vae.build import build_vae, describe
from pyro_vae.model import VAE

FORMAT = "pyro_vae.checkpoint/1"


def save_checkpoint(
    path: str | os.PathLike, vae: VAE, config: dict[str, Any], **extra: Any
) -> None:
    """Write ``vae``'s weights with ``config``, the keyword arguments that rebuild it through
    :func:`~pyro_vae.build.build_vae` (component names, sizes), and any plain ``extra``
    entries (epoch, metrics, script arguments).

    Everything must be tensors or plain Python values (no modules, no classes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "config": dict(config), "state_dict": vae.state_dict(), **extra}
    with atomic_write(path) as file:
        torch.save(payload, file)


def load_checkpoint(
    path: str | os.PathLike, map_location: torch.device | str = "cpu"
) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the VAE saved at ``path``; return it with the whole checkpoint dictionary.

    :raises ValueError: when the file is not a pyro_vae checkpoint or does not fit the model
        its config describes; the message says which.
    """
    try:
        with warnings.catch_warnings():
            # A foreign pickle draws a warning about its protocol before it is refused below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as error:
        # weights_only refused something that is not a tensor or a plain value: unpickling it
        # could run code. torch's message is many lines; keep the one that names the object.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
        raise ValueError(
            f"{path}: not a loadable checkpoint: it holds objects that could run code when "
            f"loaded, refused without loading them ({detail})"
        ) from error
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"{path}: not a loadable checkpoint ({type(error).__name__}: {first_line})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pyro_vae checkpoint (no format {FORMAT!r})")
    try:
        vae = build_vae(**payload["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: its config does not describe a model: {error}") from error
    try:
        vae.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        # torch lists every mismatched tensor on its own line; one line says it all here.
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        details = problems[0] if problems else str(error)
        if len(problems) > 1:
            details += f" (and {len(problems) - 1} more)"
        raise ValueError(
            f"{path}: weights do not fit the saved config (latent_dim {vae.latent_dim}, "
            f"{describe(payload['config'])}): {details}"
        ) from error
    return vae.to(map_location), payload
