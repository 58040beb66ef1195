"""Where fit's batches come from: tensors held in memory, or a map-style ``Dataset`` streamed
through a ``DataLoader``, batch by batch, never materialized.

Both take the same batches: fit draws each epoch's shuffle itself (and shards it under
torchrun), and hands either source the index batches of that shuffle. A ``DataLoader`` given
them as its ``batch_sampler`` fetches exactly those rows, in that order, with its workers and
(on a GPU) pinned memory; so a streamed run trains to the numbers an in-memory one does, and a
resumed run goes on from the same step of the same shuffle.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pyro_vae.data import is_binary, to_tensor
from pyro_vae.infer.objective import device_and_dtype


class EpochOrder(Protocol):
    """Which rows one epoch takes, in which order: ``length`` indices, cut into batches of
    fit's batch size in turn. A model that needs more than a shuffle (M2's labelled rows in
    every batch) returns one from ``module.epoch_order(*tensors, batch_size=B)``."""

    length: int

    def draw(self, generator: torch.Generator | None, device: torch.device) -> Tensor: ...


@dataclass
class Shuffled:
    """fit's default order: every row once per epoch, in a fresh random order."""

    length: int

    def draw(self, generator: torch.Generator | None, device: torch.device) -> Tensor:
        return torch.randperm(self.length, device=device, generator=generator)


class FewInEveryBatch:
    """Every batch holds ``per_batch`` rows of a small subset ``few`` and fills the rest with
    the ``other`` rows; an epoch is one pass over ``other``, each once, while ``few`` is
    cycled through in fresh shuffles (a row of it may be seen several times an epoch).

    Why: when ``few`` is rare (M2's labelled rows, 100 among 50,000), a uniform shuffle puts
    none of it in most batches, so its term of the loss arrives as rare, large spikes. Here
    every step sees it. Each slot of ``few`` is, marginally, a uniform draw from ``few``, and
    each row of ``other`` is seen once: a model that scales the rows of each part of a batch by
    that part's size in the data over its size in the batch (``len(few) / per_batch`` and
    ``len(other) / (batch_size - per_batch)``) estimates the sum over all rows without bias.

    Each batch is ``per_batch`` rows of ``few`` followed by up to ``batch_size - per_batch``
    of ``other``; only the last batch of an epoch is shorter. Under torchrun the shared order
    is dealt out as any order is (:func:`~pyro_vae.infer.distributed.shard`), so each rank's
    batch holds about ``per_batch / world_size`` rows of ``few``.
    """

    def __init__(self, few: Tensor, other: Tensor, batch_size: int, per_batch: int) -> None:
        if len(other) == 0:
            raise ValueError("FewInEveryBatch needs other rows; with none, shuffle (Shuffled)")
        if not 1 <= per_batch <= min(len(few), batch_size - 1):
            raise ValueError(
                f"per_batch must be between 1 and min(len(few), batch_size - 1) = "
                f"{min(len(few), batch_size - 1)}, got {per_batch}"
            )
        self.few, self.other, self.per_batch = few, other, per_batch
        self.room = batch_size - per_batch
        """Rows of ``other`` per batch: every batch is exactly ``batch_size`` long (fit cuts
        the order into batches by length), the last one excepted."""
        self.num_batches = math.ceil(len(other) / self.room)
        self.length = len(other) + self.num_batches * per_batch

    def draw(self, generator: torch.Generator | None, device: torch.device) -> Tensor:
        few, other = self.few.to(device), self.other.to(device)
        needed = self.num_batches * self.per_batch
        shuffles = [
            few[torch.randperm(len(few), device=device, generator=generator)]
            for _ in range(math.ceil(needed / len(few)))
        ]
        few_rows = torch.cat(shuffles)[:needed].split(self.per_batch)
        other_rows = other[torch.randperm(len(other), device=device, generator=generator)]
        return torch.cat(
            [
                torch.cat([few_part, other_part])
                for few_part, other_part in zip(few_rows, other_rows.split(self.room), strict=True)
            ]
        )


class InMemoryRows:
    """Data tensors on the module's device, indexed batch by batch."""

    def __init__(self, tensors: tuple[Tensor, ...]) -> None:
        self.tensors = tensors
        self.num_data = len(tensors[0])

    def first(self, size: int) -> tuple[Tensor, ...]:
        return tuple(t[:size] for t in self.tensors)

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[tuple[Tensor, ...]]:
        for indices in index_batches:
            yield tuple(t[indices] for t in self.tensors)

    @property
    def scanned(self) -> Tensor:
        """The data a first-step failure is blamed on when not finite: all of it."""
        return self.tensors[0]


class StreamedRows:
    """A map-style ``Dataset`` of examples (tensors of ``data_dim`` values, or ``(tensor,
    label)`` pairs), fetched by a ``DataLoader`` batch by batch.

    A dataset that defines ``__getitems__(indices)`` (one read of a whole batch, as
    :class:`~pyro_vae.data.ArrayDataset` does from a memory-mapped array) may return the
    batch as one tensor; otherwise its items are stacked.
    """

    def __init__(
        self,
        dataset: Dataset,
        data_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        num_workers: int,
        check: Any,
    ) -> None:
        self.dataset, self.data_dim = dataset, data_dim
        self.device, self.dtype = device, dtype
        self.num_workers = num_workers
        self.num_data = len(dataset)  # type: ignore[arg-type]
        self.check = check
        """Called on each batch as it arrives: the model's check of its data."""
        self._first: Tensor | None = None

    def _collate(self, items: Any) -> Tensor:
        if isinstance(items, Tensor):  # a whole batch from __getitems__
            return items.reshape(len(items), self.data_dim)
        rows = []
        for item in items:
            row = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(row, Tensor) or row.numel() != self.data_dim:
                shape = tuple(row.shape) if isinstance(row, Tensor) else type(row).__name__
                raise ValueError(
                    f"Dataset items must be tensors with data_dim={self.data_dim} elements "
                    f"(or (tensor, label) pairs), got {shape}"
                )
            rows.append(row.reshape(self.data_dim))
        return torch.stack(rows)

    def _arrived(self, x: Tensor) -> tuple[Tensor]:
        if not x.is_floating_point():
            raise ValueError(f"training data must have a floating dtype, got {x.dtype}")
        x = x.to(self.device, self.dtype, non_blocking=True)
        self.check(x)
        return (x,)

    def first(self, size: int) -> tuple[Tensor, ...]:
        if self._first is None:
            rows = list(range(min(size, self.num_data)))
            getitems = getattr(self.dataset, "__getitems__", None)
            items = getitems(rows) if callable(getitems) else [self.dataset[i] for i in rows]
            self._first = self._arrived(self._collate(items))[0]
        return (self._first,)

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[tuple[Tensor, ...]]:
        loader = DataLoader(
            self.dataset,
            batch_sampler=[indices.tolist() for indices in index_batches],
            num_workers=self.num_workers,
            collate_fn=self._collate,
            pin_memory=self.device.type == "cuda",
            # A loader draws its workers' base seed when it starts iterating: from a generator
            # of its own, not torch's global one, whose draws are the model's z.
            generator=torch.Generator().manual_seed(0),
        )
        for x in loader:
            yield self._arrived(x)

    @property
    def scanned(self) -> Tensor:
        """The data a first-step failure is blamed on when not finite: the first batch."""
        assert self._first is not None
        return self._first


Rows = InMemoryRows | StreamedRows


def prepare_rows(
    module: Any,
    data: Tensor | Dataset | tuple[Tensor, ...],
    binarize: bool | None,
    batch_size: int,
    stream: bool,
    num_workers: int,
) -> tuple[Rows, bool]:
    """fit's data as a source of batches on the module's device, checked against the model
    (all of it in memory; a streamed dataset batch by batch, its first batch before any step);
    and whether to binarize x dynamically."""
    device, dtype = device_and_dtype(module)
    data_dim = getattr(module, "data_dim", None)
    if stream and data_dim is None and isinstance(data, TensorDataset):
        # A model of one's own takes a TensorDataset's tensors as its arguments, in memory.
        data, stream = tuple(data.tensors), False
    if stream:
        if not isinstance(data, Dataset) or isinstance(data, Tensor):
            raise ValueError("stream=True streams a torch Dataset; pass the Dataset as data")
        if data_dim is None:
            raise ValueError(
                f"a Dataset other than a TensorDataset is streamed to a model of one input with "
                f"a data_dim, which {type(module).__name__} has not; pass its tensors as a "
                f"tuple or a TensorDataset: fit(..., TensorDataset(x, y)) calls "
                f"model(x_batch, y_batch, num_data=N)"
            )
        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("data is an empty Dataset: it has no examples")
        validate_data = getattr(module, "validate_data", None)
        source = StreamedRows(data, data_dim, device, dtype, num_workers, lambda x: None)
        first = source.first(batch_size)[0]
        if binarize is None:
            # Judged from the first batch: a streamed dataset is not scanned whole.
            binary = bool(getattr(getattr(module, "likelihood", None), "binary_data", False))
            binarize = binary and not is_binary(first)
        if callable(validate_data):
            validate_data(first, "training data", probabilities=binarize)
            probabilities = binarize
            source.check = lambda x: validate_data(x, "training data", probabilities=probabilities)
        return source, binarize
    if isinstance(data, tuple):
        if not data or not all(isinstance(t, Tensor) for t in data):
            raise ValueError("data given as a tuple must hold tensors (one per model argument)")
        if len({len(t) for t in data}) != 1:
            lengths = ", ".join(str(len(t)) for t in data)
            raise ValueError(f"the tensors of data must have as many rows each, got {lengths}")
        tensors = data
    elif isinstance(data, Tensor):
        tensors = (data,)  # as to_tensor would return it
    elif data_dim is None:
        raise ValueError("pass data as a tensor or a tuple of tensors for this model")
    else:
        tensors = (to_tensor(data, data_dim),)
    check_dense(tensors)
    x = tensors[0]
    if not x.is_floating_point():  # checked before the cast below would hide it
        raise ValueError(f"training data must have a floating dtype, got {x.dtype}")
    tensors = tuple(
        t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tensors
    )
    x = tensors[0]
    if binarize is None:
        # A likelihood of binary data (Bernoulli) says so: grayscale data are then binarized.
        binary = bool(getattr(getattr(module, "likelihood", None), "binary_data", False))
        binarize = binary and not is_binary(x)
    validate_data = getattr(module, "validate_data", None)
    if callable(validate_data):
        validate_data(x, "training data", probabilities=binarize)
    # The model's own check of all its data tensors (M2's labels, say), before any step.
    validate_inputs = getattr(module, "validate_inputs", None)
    if callable(validate_inputs):
        validate_inputs(*tensors)
    return InMemoryRows(tensors), binarize


def check_dense(tensors: tuple[Tensor, ...]) -> None:
    """Every data tensor holds its values as an ordinary (dense, strided) tensor: sparse,
    nested or meta tensors (the last hold no values at all) are refused here, naming the
    tensor, rather than by an operator deep in the model that has no kernel for them."""
    for i, t in enumerate(tensors):
        what = "data" if len(tensors) == 1 else f"data[{i}]"
        if t.is_meta:
            raise ValueError(
                f"{what} is on the meta device, which holds shapes only and no values: there "
                "is nothing to train on"
            )
        if t.is_nested:
            raise ValueError(f"{what} is a nested tensor; fit trains on dense (N, ...) tensors")
        if t.layout != torch.strided:
            raise ValueError(
                f"{what} is a {str(t.layout).removeprefix('torch.')} tensor; fit trains on "
                f"dense tensors: pass {what}.to_dense()"
            )
