"""Datasets: digits offline, Fashion-MNIST / MNIST from IDX files, clear errors when missing."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import pyro_vae as pv
from pyro_vae import data as data_module

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_digits_has_a_fixed_stratified_split_in_unit_range():
    first, second = pv.load_dataset("digits"), pv.load_dataset("digits")
    assert first.x_train.shape == (1437, 64) and first.x_test.shape == (360, 64)
    assert first.x_train.dtype == torch.float32
    assert 0 <= first.x_train.min() and first.x_train.max() <= 1
    assert set(first.y_test.tolist()) == set(range(10))
    assert torch.equal(first.x_test, second.x_test)
    assert first.image_shape == (8, 8)


def write_idx(directory: Path, num_train: int, num_test: int, gzipped: bool) -> np.ndarray:
    """Write the four IDX files of a tiny 28x28 dataset; return the training images."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gzipped else open
    suffix = ".gz" if gzipped else ""
    train_images = None
    for split, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        with opener(directory / f"{split}-images-idx3-ubyte{suffix}", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with opener(directory / f"{split}-labels-idx1-ubyte{suffix}", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
        if split == "train":
            train_images = images
    return train_images


@pytest.mark.parametrize("gzipped", [True, False])
def test_fashion_mnist_reads_idx_files_from_data_dir(tmp_path, gzipped):
    images = write_idx(tmp_path / "files", 12, 5, gzipped)
    data = pv.load_dataset("fashion-mnist", data_dir=tmp_path / "files")
    assert data.x_train.shape == (12, 784) and data.x_test.shape == (5, 784)
    expected = torch.as_tensor(images.reshape(12, -1), dtype=torch.float32) / 255
    torch.testing.assert_close(data.x_train, expected)
    assert data.image_shape == (28, 28) and data.class_names[0] == "T-shirt/top"


def test_mnist_reads_torchvision_layout(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw", 7, 3, gzipped=False)
    data = pv.load_dataset("mnist", data_dir=tmp_path)
    assert data.x_train.shape == (7, 784) and data.y_test.shape == (3,)


def test_missing_files_offline_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(
        data_module._TORCHVISION_SOURCES,
        "fashion-mnist",
        ("FashionMNIST", tmp_path / "no-debian-files"),
    )

    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    import torchvision

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", no_network)
    with pytest.raises(pv.DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        pv.load_dataset("fashion-mnist", data_dir=tmp_path / "empty")


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        pv.load_dataset("cifar")


@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(),
    reason="Debian's dataset-fashion-mnist package is not installed here",
)
def test_full_fashion_mnist_from_debian_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data = pv.load_dataset("fashion-mnist")
    assert data.x_train.shape == (60000, 784) and data.x_test.shape == (10000, 784)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10


def test_binarize_draws_bernoulli_with_the_pixel_value_as_probability():
    x = torch.full((200, 50), 0.3)
    b = pv.binarize(x, torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    se = (0.3 * 0.7 / b.numel()) ** 0.5
    assert abs(b.mean().item() - 0.3) < 4 * se
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pv.binarize(torch.tensor([1.5]))


def test_to_tensor_flattens_dataset_items_and_names_bad_ones():
    images = torch.rand(5, 2, 3)
    flat = data_module.to_tensor(TensorDataset(images, torch.arange(5)), 6)
    torch.testing.assert_close(flat, images.reshape(5, 6))
    with pytest.raises(ValueError, match="item 0 must be a tensor with data_dim=7"):
        data_module.to_tensor(TensorDataset(images), 7)
