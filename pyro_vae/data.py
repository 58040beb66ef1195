"""Datasets as whole tensors, and the helpers that turn user data into them.

Every dataset is loaded once into tensors ``(N, data_dim)`` of values in [0, 1], with integer
labels, and moved to the training device in one go: no per-example transform runs inside the
training loop. Loading never downloads unless files are missing and torchvision's download can
reach the internet; offline, a missing dataset is a :class:`DataUnavailableError` that says how
to get it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import math
import os
import struct
import warnings
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyro_vae.array_dataset import ArrayDataset

DATASET_NAMES = ("digits", "fashion-mnist", "mnist")

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# torchvision class name, and where Debian's packages put the gzipped IDX files.
_TORCHVISION_SOURCES = {
    "fashion-mnist": ("FashionMNIST", Path("/usr/share/datasets/fashion-mnist")),
    "mnist": ("MNIST", None),
}

_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataUnavailableError(FileNotFoundError):
    """A dataset's files are not on this machine and could not be downloaded."""


# Per streamed dataset (a read-only view of its file, shared by the DataSplits made from one
# another): whether all its values are 0 or 1 (DataSplits.train_rows_binary).
_STREAMED_ROWS_BINARY: weakref.WeakKeyDictionary[ArrayDataset, bool] = weakref.WeakKeyDictionary()


@dataclass
class DataSplits:
    """A dataset as tensors: images flattened to ``(N, data_dim)``, values in [0, 1].

    The training rows of a ``.npy`` loaded with ``stream=True`` are a
    :class:`~pyro_vae.ArrayDataset` instead: the file memory-mapped, read batch by batch by
    :func:`~pyro_vae.fit` (scaled as they are read), never held whole; the test and validation
    rows are tensors all the same (a run scores them whole)."""

    name: str
    x_train: Tensor | ArrayDataset
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    image_shape: tuple[int, ...]
    """``(height, width)``, or ``(channels, height, width)`` for colour: the rows are the
    images flattened in that order."""
    class_names: tuple[str, ...]
    num_levels: int = 256
    """Distinct pixel values k / (num_levels - 1): 17 for digits (0..16), 256 for 8-bit images."""
    x_val: Tensor | None = None
    """The validation rows held out of the training data (:meth:`hold_out`), or ``None``."""
    y_val: Tensor | None = None

    @property
    def data_dim(self) -> int:
        if isinstance(self.x_train, ArrayDataset):
            return self.x_train.data_dim
        return self.x_train.shape[1]

    @property
    def num_val(self) -> int:
        """How many rows are held out for validation (0 without a validation set)."""
        return 0 if self.x_val is None else len(self.x_val)

    @property
    def streamed(self) -> bool:
        """Whether the training rows stay in their file, read batch by batch."""
        return isinstance(self.x_train, ArrayDataset)

    def to(self, device: torch.device | str) -> DataSplits:
        """The same splits on another device; streamed training rows stay in their file
        (:func:`~pyro_vae.fit` moves each batch to the model's device as it reads it)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device) if isinstance(self.x_train, Tensor) else self.x_train,
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            x_val=None if self.x_val is None else self.x_val.to(device),
            y_val=None if self.y_val is None else self.y_val.to(device),
        )

    def in_memory(self) -> DataSplits:
        """The same splits with streamed training rows read whole into a tensor (for the
        models that train on tensors only); splits in memory already are returned as they
        are."""
        if isinstance(self.x_train, ArrayDataset):
            return dataclasses.replace(self, x_train=self.x_train.read())
        return self

    def train_tensor(self) -> Tensor:
        """The training rows as a tensor: read whole when streamed."""
        x = self.in_memory().x_train
        assert isinstance(x, Tensor)
        return x

    def train_head(self, count: int) -> Tensor:
        """The first ``count`` training rows (all when fewer) as a tensor: of streamed rows,
        only these are read."""
        if isinstance(self.x_train, ArrayDataset):
            return self.x_train.read(range(min(count, len(self.x_train))))
        return self.x_train[:count]

    def train_chunks(self) -> Iterator[tuple[int, Tensor]]:
        """The training rows a chunk at a time, each with the position of its first row: the
        whole tensor in memory at once, streamed rows a bounded chunk at a time (a scan of
        them never holds the file)."""
        if isinstance(self.x_train, ArrayDataset):
            start = 0
            for chunk in self.x_train.chunks():
                yield start, chunk
                start += len(chunk)
        else:
            yield 0, self.x_train

    def train_rows_binary(self) -> bool:
        """Whether every training value is exactly 0 or 1. A streamed file is scanned once, a
        chunk at a time: the runner's checks, the evaluation sets and the job's binarization
        all ask, and each scan of a file larger than memory reads all of it from disk."""
        if not isinstance(self.x_train, ArrayDataset):
            return is_binary(self.x_train)
        known = _STREAMED_ROWS_BINARY.get(self.x_train)
        if known is None:
            known = all(is_binary(chunk) for chunk in self.x_train.chunks())
            _STREAMED_ROWS_BINARY[self.x_train] = known
        return known

    def hold_out(self, indices: Tensor) -> DataSplits:
        """The splits with the training rows ``indices`` held out as the validation set (and
        left out of training); ``indices`` empty: no validation set. Model choices (the epoch,
        settings) are made on the validation set, so that the test set is scored once.
        Streamed training rows stay streamed: the rows left are picked by index, and only the
        validation rows are read."""
        if self.x_val is not None:
            raise ValueError("these splits already hold a validation set")
        if len(indices) == 0:
            return self
        keep = torch.ones(len(self.x_train), dtype=torch.bool)
        keep[indices.cpu()] = False
        if isinstance(self.x_train, ArrayDataset):
            return dataclasses.replace(
                self,
                x_train=self.x_train.subset(keep.nonzero().squeeze(1)),
                y_train=self.y_train[keep.to(self.y_train.device)],
                x_val=self.x_train.read(indices.cpu()),
                y_val=self.y_train[indices.to(self.y_train.device)],
            )
        keep = keep.to(self.x_train.device)
        held = indices.to(self.x_train.device)
        return dataclasses.replace(
            self,
            x_train=self.x_train[keep],
            y_train=self.y_train[keep],
            x_val=self.x_train[held],
            y_val=self.y_train[held],
        )


def validation_indices(num_train: int, val_size: int, seed: int) -> Tensor:
    """The training rows held out for validation: ``val_size`` of them, drawn from a stream
    of their own derived from ``seed`` (so that the training noise drawn from ``seed`` stays
    as it was), sorted.

    :raises ValueError: when ``val_size`` would leave no training rows.
    """
    if val_size >= num_train:
        raise ValueError(
            f"--val-size {val_size} leaves no training rows: the training set has {num_train}"
        )
    (state,) = np.random.SeedSequence(seed, spawn_key=(2,)).generate_state(1, np.uint64)
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(int(state)))
    return order[:val_size].sort().values


def load_dataset(
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    test_dataset: str | os.PathLike | None = None,
    image_size: tuple[int, int] | list[int] | None = None,
    seed: int = 0,
    stream: bool = False,
) -> DataSplits:
    """Load a dataset with its train/test split and labels.

    ``name`` is one of :data:`DATASET_NAMES`, or the path of a user's own data (a ``.npy``,
    ``.npz`` or ``.pt`` file, or a folder of images), read by
    :func:`pyro_vae.user_data.load_user_dataset` with ``test_dataset``, ``image_size`` and
    ``seed`` (which draws the test rows when no test set is given); those three are for paths
    only.

    - ``"digits"``: scikit-learn's bundled handwritten digits, 1797 images of 8x8, always
      offline; a fixed stratified split of 1437 train / 360 test.
    - ``"fashion-mnist"`` and ``"mnist"``: 60000 train / 10000 test images of 28x28, read from
      the four IDX files, gzipped or not, found first in: ``data_dir`` itself or torchvision's
      ``data_dir/<Class>/raw/``; Debian's ``dataset-fashion-mnist`` package; the cache
      directory. If none holds them, torchvision downloads them (into ``data_dir``, or the
      cache). The files are read in place, every time, and nothing is written beside them:
      a replaced file is always the one read, and a read-only directory is enough. Images and
      labels are checked together (counts, label values) before anything is returned.

    :param name: one of :data:`DATASET_NAMES`, or a path.
    :param data_dir: where to look for (and download) the files; ``None`` means the cache
        directory ``$XDG_CACHE_HOME/pyro_vae`` (``~/.cache/pyro_vae``).
    :param device: where the tensors go; checked before anything is read.
    :param dtype: the images' floating dtype (labels are ``torch.long``).
    :param stream: the training rows of a ``.npy`` file as a :class:`~pyro_vae.ArrayDataset`
        over its memory map (read batch by batch by :func:`~pyro_vae.fit`, never whole; the
        device is then the test and validation sets' alone), instead of a tensor; for the
        other data, which are read into memory anyway, it changes nothing.
    :raises ValueError: for an unknown device or a non-floating dtype, a name that is no
        dataset and no file or folder, and for data files that cannot be read or do not hold
        what they should; the message names the file.
    :raises DataUnavailableError: when the files are missing and cannot be downloaded.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        # An integer dtype would truncate every pixel value in [0, 1) to 0.
        raise ValueError(f"dtype must be a floating torch.dtype (pixels in [0, 1]), got {dtype!r}")
    if name not in DATASET_NAMES:
        from pyro_vae.user_data import load_user_dataset

        if not Path(name).exists():
            names = ", ".join(DATASET_NAMES)
            raise ValueError(f"unknown dataset {name!r}: not one of {names}, nor a file or folder")
        device = check_device(device)
        user = load_user_dataset(
            name,
            test_dataset=test_dataset,
            image_size=image_size,
            seed=seed,
            dtype=dtype,
            stream=stream,
        )
        return DataSplits(**user._asdict()).to(device)
    if test_dataset is not None or image_size is not None:
        raise ValueError(f"{name}: a test dataset and an image size are for data given as a path")
    device = check_device(device)
    if name == "digits":
        splits = _load_digits()
    else:
        splits = _load_torchvision(name, None if data_dir is None else Path(data_dir))
    splits.x_train = splits.train_tensor().to(dtype)
    splits.x_test = splits.x_test.to(dtype)
    return splits.to(device)


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``, or a ValueError when it is not one or not usable here
    (``"cuda"`` without a GPU, say)."""
    try:
        checked = torch.device(device)
        torch.empty(0, device=checked)  # the cheapest way to ask whether it works here
    except (RuntimeError, TypeError, AssertionError) as error:  # no CUDA: an AssertionError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"device {str(device)!r} is not usable here ({reason})") from error
    if checked.type == "meta":
        raise ValueError("device 'meta' holds shapes only, no values: data cannot go there")
    return checked


def _load_digits() -> DataSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.as_tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(
        range(len(y)), test_size=360, random_state=0, stratify=digits.target
    )
    return DataSplits(
        "digits",
        x[train],
        y[train],
        x[test],
        y[test],
        (8, 8),
        tuple(str(d) for d in range(10)),
        num_levels=17,
    )


def _load_torchvision(name: str, data_dir: Path | None) -> DataSplits:
    class_name, system_dir = _TORCHVISION_SOURCES[name]
    # torchvision's download puts the files in root/<Class>/raw; look there too, so that a
    # download is made once.
    # A data_dir given is the only place looked in (and downloaded into): a directory the
    # user named that lacks the files must not be passed over silently for other files.
    root = data_dir if data_dir is not None else _cache_dir()
    if data_dir is not None:
        search = [data_dir / class_name / "raw", data_dir]
    else:
        search = [*([] if system_dir is None else [system_dir]), root / class_name / "raw"]
    found = _find_idx_files(search)
    if data_dir is not None and found is not None:
        _say_which_were_read(name, found, search)
    if found is None:
        _download(name, class_name, root, search)
        found = _find_idx_files([root / class_name / "raw"])
        if found is None:
            raise DataUnavailableError(
                f"{name}: torchvision's download left no IDX files in {root / class_name / 'raw'}"
            )
    class_names = _FASHION_CLASSES if name == "fashion-mnist" else tuple(map(str, range(10)))
    # The files are read where they are, every time: nothing is copied or cached, so a
    # replaced file is always the one read, and a read-only directory is enough.
    x_train, y_train = _read_split(found, "train", len(class_names))
    x_test, y_test = _read_split(found, "t10k", len(class_names))
    _, rows, cols = x_train.shape  # _read_idx checked: three dimensions
    image_shape = (rows, cols)
    if tuple(x_test.shape[1:]) != image_shape:
        raise ValueError(
            f"{found['t10k-images-idx3-ubyte']}: test images are {x_test.shape[1:]}, "
            f"but training images ({found['train-images-idx3-ubyte']}) are {image_shape}"
        )

    def flat(images: Tensor) -> Tensor:
        return images.reshape(len(images), -1).float() / 255.0

    return DataSplits(name, flat(x_train), y_train, flat(x_test), y_test, image_shape, class_names)


def _download(name: str, class_name: str, root: Path, search: list[Path]) -> None:
    import torchvision

    # torchvision makes root/<Class>/raw before it downloads; a failed download must not
    # leave those directories behind, empty.
    made = [d for d in (root, root / class_name, root / class_name / "raw") if not d.exists()]
    try:
        # One dataset object downloads all four files.
        getattr(torchvision.datasets, class_name)(root, train=True, download=True)
    except Exception as error:  # network errors come in many types; all mean "not here"
        for directory in reversed(made):
            with contextlib.suppress(OSError):  # not empty after all: leave it
                directory.rmdir()
        looked = ", ".join(str(d) for d in search)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataUnavailableError(
            f"{name}: the IDX files ({', '.join(_IDX_FILES)}, gzipped or not) are not in "
            f"{looked}, and torchvision could not download them into {root} "
            f"({type(error).__name__}: {reason}). "
            + (
                "Install them with 'apt-get install dataset-fashion-mnist', or put "
                if name == "fashion-mnist"
                else "Put "
            )
            + "the four files in a directory and pass it as data_dir (--data-dir)."
        ) from error


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pyro_vae"


def _say_which_were_read(name: str, found: dict[str, Path], search: list[Path]) -> None:
    """A data_dir that holds the IDX files twice (in <Class>/raw/, where torchvision puts
    them, and in itself; or a file both plain and gzipped) is read in that order of
    preference: one warning, one line, says which files were read and which were not."""
    chosen = next(iter(found.values())).parent
    unread = [str(d) for d in search if d != chosen and _find_idx_files([d]) is not None]
    unread += [
        f"{path.name}.gz" for path in found.values() if path.with_name(f"{path.name}.gz").is_file()
    ]
    if unread:
        plain = " (the plain files, not their .gz)" if unread[-1].endswith(".gz") else ""
        warnings.warn(
            f"{name}: read the IDX files in {chosen}{plain}; not read: {', '.join(unread)}",
            stacklevel=4,
        )


def _find_idx_files(directories: list[Path]) -> dict[str, Path] | None:
    """The first directory holding all four IDX files, each plain or gzipped."""
    for directory in directories:
        files = {}
        for stem in _IDX_FILES:
            for candidate in (directory / stem, directory / f"{stem}.gz"):
                if candidate.is_file():
                    files[stem] = candidate
                    break
        if len(files) == len(_IDX_FILES):
            return files
    return None


def _read_split(files: dict[str, Path], split: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """Images ``(N, rows, cols)`` as uint8 and labels ``(N,)`` as long, checked together."""
    images_path = files[f"{split}-images-idx3-ubyte"]
    labels_path = files[f"{split}-labels-idx1-ubyte"]
    images = _read_idx(images_path, "images", 3)
    labels = _read_idx(labels_path, "labels", 1).long()
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
        )
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        at = int(bad[0])
        raise ValueError(
            f"{labels_path}: label {int(labels[at])} at position {at} is not a class "
            f"(0..{num_classes - 1})"
        )
    return images, labels


# Deflate, the compression of gzip, inflates at most 1032-fold (258 bytes for 2 bits): a gzip
# file cannot hold more than this many times its own size, whatever its header says.
_MAX_INFLATION = 1032


def _read_idx(path: Path, what: str, ndim: int) -> Tensor:
    """An IDX file of unsigned bytes, gzipped or not, as a uint8 tensor; a ValueError naming
    the file when it cannot be read or is not what its header says.

    The format (yann.lecun.com/exdb/mnist): a big-endian magic number 0x0800 + the number of
    dimensions, one 32-bit size per dimension, then the bytes in C order. torchvision's reader
    is not used: it reads no gzip and fails with bare asserts.

    The header is read first, and no more than it promises is ever read (or inflated), into a
    buffer of that size: a promise the file cannot keep (more bytes than a plain file holds,
    than a gzip file of its size can inflate to, or than this machine's memory) is refused
    before anything else is read, and a file that goes on past it is refused at its first
    extra byte (a gzip bomb is never inflated).
    """
    gzipped = path.suffix == ".gz"
    header_size = 4 + 4 * ndim
    try:
        on_disk = path.stat().st_size
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as file:
            header = file.read(header_size)
            magic = struct.unpack(">I", header[:4])[0] if len(header) >= 4 else None
            if magic != 0x0800 + ndim or len(header) < header_size:
                raise ValueError(
                    f"{path}: not an IDX file of {what} (a {ndim}-dimensional array of bytes, "
                    f"magic number {0x0800 + ndim}); its magic number is {magic}"
                )
            shape = struct.unpack(f">{ndim}I", header[4:])
            size = math.prod(shape)
            promised = f"its header promises {what} of shape {shape} ({header_size + size} bytes)"
            if not gzipped and on_disk != header_size + size:
                state = (
                    "truncated" if on_disk < header_size + size else "longer than its header says"
                )
                raise ValueError(f"{path}: {state}: {promised}, the file holds {on_disk} bytes")
            if gzipped and size > _MAX_INFLATION * on_disk:
                raise ValueError(
                    f"{path}: truncated: {promised}, more than a gzip file of {on_disk} bytes "
                    f"can hold ({_MAX_INFLATION} times its size at most)"
                )
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if size > memory:
                raise ValueError(
                    f"{path}: {promised}, more than this machine's {memory / 2**30:.3g} GiB of "
                    "memory"
                )
            content = bytearray(size)
            view, got = memoryview(content), 0
            while got < size:
                count = file.readinto(view[got:])
                if not count:
                    break
                got += count
            if got < size:
                raise ValueError(
                    f"{path}: truncated: {promised}, the "
                    f"{'inflated stream' if gzipped else 'file'} holds {header_size + got} bytes"
                )
            # One byte more, at most: gzip checks its CRC and length when it reaches the end.
            if file.read(1):
                raise ValueError(
                    f"{path}: longer than its header says: {promised}, and more bytes follow"
                )
    except gzip.BadGzipFile as error:
        raise ValueError(f"{path}: not a valid gzip file ({error})") from error
    except (EOFError, zlib.error) as error:
        raise ValueError(f"{path}: the gzip stream is truncated or corrupt ({error})") from error
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from error
    # A view of the buffer (writable, unlike bytes): no second copy of the images.
    return torch.from_numpy(np.frombuffer(content, dtype=np.uint8).reshape(shape))


def to_tensor(data: Tensor | Dataset, data_dim: int) -> Tensor:
    """A tensor ``(N, data_dim)`` from a tensor or a torch ``Dataset``.

    A dataset's items may be tensors or ``(tensor, label)`` pairs, of any shape with
    ``data_dim`` elements (images are flattened). Its ``len()`` is taken as the number of
    examples: a dataset too large to hold as one tensor in this machine's memory is refused
    before any item is read, and one that cannot give an item below its ``len()`` is refused
    naming the item. Tensors pass through unchanged, to be checked by
    :meth:`~pyro_vae.models.vae.VAE.validate_data`.
    """
    if isinstance(data, Tensor):
        return data
    if not isinstance(data, Dataset):
        raise ValueError(
            f"data must be a torch.Tensor (N, {data_dim}) or a torch Dataset, "
            f"got {type(data).__name__}"
        )
    try:
        num_items = len(data)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"a Dataset passed as data must have a len() ({error})") from error
    if num_items == 0:
        raise ValueError("data is an empty Dataset: it has no examples")
    # Refused up front: reading 10^12 items one by one would run for days before failing.
    # One byte per value is the least any dtype needs.
    needed = num_items * data_dim
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise ValueError(
            f"the Dataset's len() is {num_items}: {num_items} examples of {data_dim} values "
            f"would need at least {needed / 2**30:.3g} GiB as one tensor, more than this machine's "
            f"{memory / 2**30:.3g} GiB of memory"
        )
    rows = []
    for i in range(num_items):
        try:
            item = data[i]
        except Exception as error:  # a user's __getitem__ may raise anything
            raise ValueError(
                f"the Dataset's len() is {num_items}, but item {i} cannot be read "
                f"({type(error).__name__}: {error})"
            ) from error
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, Tensor) or item.numel() != data_dim:
            shape = tuple(item.shape) if isinstance(item, Tensor) else type(item).__name__
            raise ValueError(
                f"Dataset item {i} must be a tensor with data_dim={data_dim} elements "
                f"(or a (tensor, label) pair), got {shape}"
            )
        rows.append(item.reshape(data_dim))
    return torch.stack(rows)


def is_binary(x: Tensor) -> bool:
    """Whether every value is exactly 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One stochastic binarization: each value v in [0, 1] becomes 1 with probability v.

    Drawing afresh for every batch (dynamic binarization, what :func:`~pyro_vae.infer.fit.fit`
    does) makes grayscale images proper data for a Bernoulli likelihood; a fixed draw with a
    seeded ``generator`` gives a reproducible test set.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"binarize needs a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError("binarize needs floating values in [0, 1] (pixel intensities)")
    return torch.bernoulli(x, generator=generator)
