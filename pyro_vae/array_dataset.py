"""A ``.npy`` file of examples as a map-style ``Dataset`` that reads only the rows asked for.

``np.load(path, mmap_mode="r")`` maps the file instead of reading it: a batch reads its rows
from the page cache, and the rest of the file costs no memory. Given to
:func:`~pyro_vae.fit`, it streams through a ``DataLoader`` (``pyro_vae.infer.batches``), so
a dataset larger than memory trains as one that fits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """The rows of a ``.npy`` array ``(N, ...)``, memory-mapped, as float tensors: 8-bit
    values (``uint8``) scaled to [0, 1], floating values as they are.

    :param path: the ``.npy`` file.
    :param dtype: the floating dtype of the rows handed out.
    :raises ValueError: when the file is no ``.npy`` array of numbers with at least one row.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable .npy array ({error})") from error
        if not isinstance(self.array, np.ndarray) or self.array.ndim < 2 or not len(self.array):
            raise ValueError(f"{path}: needs an array (N, ...) of N >= 1 examples")
        kind = self.array.dtype
        if not (np.issubdtype(kind, np.floating) or kind == np.uint8):
            raise ValueError(f"{path}: holds {kind} values; give uint8 (0..255) or floats")
        self.path, self.dtype = path, dtype
        self.scale = 1 / 255 if kind == np.uint8 else 1.0

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        """The rows ``indices`` as one tensor, from one read of the map (the ``DataLoader``
        asks for a whole batch at once)."""
        rows = np.asarray(self.array[np.asarray(indices, dtype=np.int64)])
        values = torch.from_numpy(
            rows.astype(np.float64 if self.dtype == torch.float64 else np.float32)
        )
        return (
            values.mul_(self.scale).to(self.dtype) if self.scale != 1.0 else values.to(self.dtype)
        )
