"""Datasets as whole tensors, and the helpers that turn user data into them.

Every dataset is loaded once into tensors ``(N, data_dim)`` of values in [0, 1], with integer
labels, and moved to the training device in one go: no per-example transform runs inside the
training loop. Loading never downloads unless files are missing and torchvision's download can
reach the internet; offline, a missing dataset is a :class:`DataUnavailableError` that says how
to get it.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyro_vae._files import atomic_write

DATASETS = ("digits", "fashion-mnist", "mnist")

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


@dataclass
class DataSplits:
    """A dataset as tensors: images flattened to ``(N, data_dim)``, values in [0, 1]."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    image_shape: tuple[int, int]
    class_names: tuple[str, ...]
    num_levels: int = 256
    """Distinct pixel values k / (num_levels - 1): 17 for digits (0..16), 256 for 8-bit images."""

    @property
    def data_dim(self) -> int:
        return self.x_train.shape[1]

    def to(self, device: torch.device | str) -> DataSplits:
        """The same splits on another device."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )


def load_dataset(
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DataSplits:
    """Load a dataset with its train/test split and labels.

    - ``"digits"``: scikit-learn's bundled handwritten digits, 1797 images of 8x8, always
      offline; a fixed stratified split of 1437 train / 360 test.
    - ``"fashion-mnist"`` and ``"mnist"``: 60000 train / 10000 test images of 28x28, read with
      torchvision from, in this order: ``data_dir`` (the four IDX files, gzipped or not, in
      ``data_dir`` itself or in torchvision's ``data_dir/<Class>/raw/``); Debian's
      ``dataset-fashion-mnist`` package; torchvision's download.

    :param name: one of :data:`DATASETS`.
    :param data_dir: where to look for (and download) the files; ``None`` means the cache
        directory ``$XDG_CACHE_HOME/pyro_vae`` (``~/.cache/pyro_vae``).
    :raises ValueError: for an unknown name.
    :raises DataUnavailableError: when the files are missing and cannot be downloaded.
    """
    if name == "digits":
        splits = _load_digits()
    elif name in _TORCHVISION_SOURCES:
        splits = _load_torchvision(name, None if data_dir is None else Path(data_dir))
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    splits.x_train = splits.x_train.to(dtype)
    splits.x_test = splits.x_test.to(dtype)
    return splits.to(device)


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
    import torchvision

    class_name, system_dir = _TORCHVISION_SOURCES[name]
    dataset_class = getattr(torchvision.datasets, class_name)
    root = data_dir if data_dir is not None else _cache_dir()
    search = [] if data_dir is None else [data_dir / class_name / "raw", data_dir]
    if system_dir is not None:
        search.append(system_dir)
    found = _find_idx_files(search)
    if found is not None:
        _stage_raw_files(found, root / class_name / "raw")
    else:
        try:
            dataset_class(root, train=True, download=True)
            dataset_class(root, train=False, download=True)
        except Exception as error:  # network errors come in many types; all mean "not here"
            looked = ", ".join(str(d) for d in search) or "nowhere (no --data-dir given)"
            raise DataUnavailableError(
                f"{name}: the IDX files ({', '.join(_IDX_FILES)}, gzipped or not) are not in "
                f"{looked}, and torchvision could not download them ({type(error).__name__}). "
                + (
                    "Install them with 'apt-get install dataset-fashion-mnist', or put "
                    if name == "fashion-mnist"
                    else "Put "
                )
                + "the four files in a directory and pass it as data_dir (--data-dir)."
            ) from error
    try:
        train = dataset_class(root, train=True, download=False)
        test = dataset_class(root, train=False, download=False)
    except Exception as error:  # torchvision's IDX reader fails with bare asserts
        raise ValueError(
            f"{name}: the IDX files in {root / class_name / 'raw'} are corrupt or truncated "
            f"({type(error).__name__}: {error or 'bad header'}); replace them"
        ) from error

    def flat(images: Tensor) -> Tensor:
        return images.reshape(len(images), -1).float() / 255.0

    class_names = _FASHION_CLASSES if name == "fashion-mnist" else tuple(map(str, range(10)))
    return DataSplits(
        name,
        flat(train.data),
        train.targets.long(),
        flat(test.data),
        test.targets.long(),
        tuple(train.data.shape[1:]),
        class_names,
    )


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pyro_vae"


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


def _stage_raw_files(files: dict[str, Path], raw_dir: Path) -> None:
    """Put plain IDX files where torchvision reads them. torchvision's own download step
    would reject Debian's gzip files (other md5 sums), so they are unpacked here instead,
    atomically: an interrupted copy never leaves a half-written file behind."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for stem, source in files.items():
        target = raw_dir / stem
        if target.exists() and target.resolve() == source.resolve():
            continue
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            continue  # staged before
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, atomic_write(target) as dst:
            shutil.copyfileobj(src, dst)


def to_tensor(data: Tensor | Dataset, data_dim: int) -> Tensor:
    """A tensor ``(N, data_dim)`` from a tensor or a torch ``Dataset``.

    A dataset's items may be tensors or ``(tensor, label)`` pairs, of any shape with
    ``data_dim`` elements (images are flattened). Tensors pass through unchanged, to be checked
    by :meth:`~pyro_vae.model.VAE.validate_data`.
    """
    if isinstance(data, Tensor):
        return data
    if not isinstance(data, Dataset):
        raise ValueError(
            f"data must be a torch.Tensor (N, {data_dim}) or a torch Dataset, "
            f"got {type(data).__name__}"
        )
    try:
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
    except TypeError as error:
        raise ValueError("a Dataset passed as data must support len() and indexing") from error
    if not items:
        raise ValueError("data is an empty Dataset: it has no examples")
    rows = []
    for i, item in enumerate(items):
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

    Drawing afresh for every batch (dynamic binarization, what :func:`~pyro_vae.train.fit`
    does) makes grayscale images proper data for a Bernoulli likelihood; a fixed draw with a
    seeded ``generator`` gives a reproducible test set.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"binarize needs a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError("binarize needs floating values in [0, 1] (pixel intensities)")
    return torch.bernoulli(x, generator=generator)
