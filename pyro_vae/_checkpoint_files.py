"""The bytes of a checkpoint file, checked before anything is built from them
(:mod:`pyro_vae.checkpoint` calls these in order):

1. the path is a regular file (a FIFO or a device would block or never end):
   :func:`read_regular_file`;
2. the archive is whole (:func:`check_archive`): every member is stored uncompressed, as
   ``torch.save`` writes them (a compressed member could inflate to any size), the members fit
   in the file, and each one's CRC-32 matches its bytes. ``torch.load`` checks no CRC, so a
   flipped bit in a weight would otherwise load silently. A CRC catches accidental damage
   (flipped bits, overwritten or missing bytes), not a deliberate edit that recomputes it: no
   checksum stored in the file could. Checkpoints written before this check have the same
   format and CRCs, and are checked the same way;
3. the pickle holds only tensors and plain values (``weights_only=True``): :func:`unpickle`;
4. the state dict maps names to tensors (:func:`check_state_dict`);
5. every tensor is backed by bytes of its own in the file (:func:`check_tensor_sizes`), so that
   a small crafted file cannot claim gigabytes;
6. the weights are finite (:func:`check_finite`).

Between 3 and 4 the checkpoint module checks the format tag and the config, and between 5 and 6
that the config's model holds no more weights than the file. Each refusal is a ``ValueError``
saying what is wrong.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import warnings
import zipfile
from typing import Any

import torch


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of the file at ``path``, refused (``ValueError``, naming it) unless it is a
    regular file: a FIFO or a device would block or never end."""
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


def check_archive(data: bytes) -> None:
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


def unpickle(data: bytes, device: torch.device) -> Any:
    """What ``torch.load(weights_only=True)`` reads from ``data``, its tensors on ``device``;
    anything but tensors and plain values is refused without being loaded."""
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


def check_tensor_sizes(payload: dict, file_size: int) -> None:
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


def check_state_dict(state_dict: dict) -> None:
    """Every entry of ``state_dict`` maps a name to a tensor."""
    for name, value in state_dict.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"not a whole checkpoint: its state_dict maps {name!r} to a "
                f"{type(value).__name__}, not a tensor"
            )


def check_finite(state_dict: dict[str, torch.Tensor]) -> None:
    """Every floating weight of ``state_dict`` is finite."""
    for name, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"its weights {name!r} hold NaN or infinite values")
