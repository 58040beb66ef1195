"""A ``.npy`` file of examples as a map-style ``Dataset`` that reads only the rows asked for.

``np.load(path, mmap_mode="r")`` maps the file instead of reading it: a batch reads its rows
from the page cache, and the rest of the file costs no memory. Given to
:func:`~pyro_vae.fit`, it streams through a ``DataLoader`` (``pyro_vae.infer.batches``), so
a dataset larger than memory trains as one that fits.

A dataset may stand for a subset of the file's rows (``rows``): scripts/train.py's training
rows are what is left of a ``.npy`` once the test and validation rows are taken out, picked by
index rather than copied.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# Values read at a time by chunks(): 16 MiB of float32, never the whole of a mapped file.
_CHUNK = 1 << 22


class ArrayDataset(Dataset):
    """The rows of a ``.npy`` array ``(N, ...)``, memory-mapped, as float tensors: 8-bit
    values (``uint8``) scaled to [0, 1] (divided by 255, batch by batch, exactly as
    :func:`pyro_vae.load_dataset` scales them in memory), other numbers as they are.

    :param path: the ``.npy`` file, or an array already mapped from one (``np.load(...,
        mmap_mode=...)``), which is used as it is.
    :param dtype: the floating dtype of the rows handed out.
    :param rows: the rows of the array this dataset holds, in this order (``None``: all).
    :raises ValueError: when the file is no ``.npy`` array of numbers with at least one row.
    """

    def __init__(
        self,
        path: str | os.PathLike | np.ndarray,
        dtype: torch.dtype = torch.float32,
        *,
        rows: Tensor | Sequence[int] | None = None,
    ) -> None:
        if isinstance(path, np.ndarray):
            self.array = path
            path = getattr(path, "filename", None) or "the array"
        else:
            try:
                self.array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise ValueError(f"{path}: not a readable .npy array ({error})") from error
        if not isinstance(self.array, np.ndarray) or self.array.ndim < 2 or not len(self.array):
            raise ValueError(f"{path}: needs an array (N, ...) of N >= 1 examples")
        kind = self.array.dtype
        # The dtypes torch takes as they are (a view, no conversion of the whole): booleans,
        # uint8, signed integers and floats, in this machine's byte order.
        if kind.kind not in "biuf" or (kind.kind == "u" and kind != np.uint8):
            raise ValueError(
                f"{path}: holds {kind} values; give uint8 (0..255), signed integers, booleans "
                "or floats"
            )
        if not kind.isnative:
            raise ValueError(f"{path}: holds {kind} values of the other byte order")
        self.path, self.dtype = path, dtype
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.scale = 1 / 255 if kind == np.uint8 else 1.0

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows)

    @property
    def data_dim(self) -> int:
        """The values of one example, flattened."""
        return math.prod(self.array.shape[1:])

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        """The rows ``indices`` as one tensor, from one read of the map (the ``DataLoader``
        asks for a whole batch at once)."""
        positions = np.asarray(indices, dtype=np.int64)
        if self.rows is not None:
            positions = self.rows.numpy()[positions]
        values = torch.from_numpy(np.asarray(self.array[positions])).to(self.dtype)
        # Divided, not multiplied by 1/255: the in-memory path's very numbers (x / 255 and
        # x * (1/255) differ in the last bit for some x).
        return values / 255.0 if self.scale != 1.0 else values

    def read(self, positions: Tensor | Sequence[int] | None = None) -> Tensor:
        """The rows at ``positions`` (``None``: all) as one tensor ``(n, data_dim)``, in
        memory: for the small sets a run holds (validation, test, a training subset)."""
        if positions is None:
            positions = range(len(self))
        positions = torch.as_tensor(positions, dtype=torch.long).tolist()
        if not positions:
            return torch.zeros(0, self.data_dim, dtype=self.dtype)
        return self.__getitems__(positions).reshape(len(positions), self.data_dim)

    def chunks(self) -> Iterator[Tensor]:
        """Every row in turn, a chunk ``(n, data_dim)`` at a time: a scan (checks of the
        values) holds one chunk, never the whole file."""
        size = max(1, _CHUNK // max(1, self.data_dim))
        for start in range(0, len(self), size):
            yield self.read(range(start, min(start + size, len(self))))

    def subset(self, positions: Tensor) -> ArrayDataset:
        """The rows at ``positions`` of this dataset, as a dataset on the same map."""
        rows = positions.cpu().long() if self.rows is None else self.rows[positions.cpu()]
        return ArrayDataset(self.array, self.dtype, rows=rows)

    def __getstate__(self) -> dict[str, Any]:
        """A worker started by spawn (not fork) maps the file again: a pickled ``np.memmap``
        would carry a copy of the whole array. Only a whole map is mapped again: a view of one
        (``mm[50:]``, ``mm[:, :2]``) keeps its parent's filename and offset, so mapping those
        again would give the parent's first rows; a view pickles as its values."""
        state = dict(self.__dict__)
        if (
            isinstance(self.array, np.memmap)
            and isinstance(self.array.base, mmap.mmap)
            and self.array.filename is not None
        ):
            state["array"] = (
                self.array.filename,
                self.array.offset,
                self.array.dtype,
                self.array.shape,
                "F" if self.array.flags.f_contiguous and not self.array.flags.c_contiguous else "C",
            )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["array"], tuple):
            filename, offset, dtype, shape, order = state["array"]
            state["array"] = np.memmap(
                filename, dtype=dtype, mode="r", offset=offset, shape=shape, order=order
            )
        self.__dict__.update(state)
