"""Datasets: digits offline, Fashion-MNIST / MNIST from IDX files, clear errors when missing."""

import gzip
import os
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


def test_a_data_dir_without_the_files_is_not_passed_over_for_other_files(tmp_path, monkeypatch):
    """Debian's files are there, but the user named another directory: they get an error
    about theirs, not a model of other data; and the failed download leaves no empty
    directories behind."""
    debian = tmp_path / "debian"
    write_idx(debian, 20, 10, gzipped=True)
    monkeypatch.setitem(data_module._TORCHVISION_SOURCES, "fashion-mnist", ("FashionMNIST", debian))

    def no_network(self):  # as torchvision's does: the directories first, then the network
        os.makedirs(self.raw_folder, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    import torchvision

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", no_network)
    assert len(pv.load_dataset("fashion-mnist").x_train) == 20  # the control: found by default
    with pytest.raises(pv.DataUnavailableError, match=r"are not in .*theirs"):
        pv.load_dataset("fashion-mnist", data_dir=tmp_path / "theirs")
    assert not (tmp_path / "theirs").exists()


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


# ---------------------------------------------------------------- files that are bad or change


def load_fashion(directory: Path) -> pv.DataSplits:
    return pv.load_dataset("fashion-mnist", data_dir=directory)


def test_replaced_idx_files_are_read_again_even_when_older(tmp_path):
    # cp -p, tar and rsync -a keep a file's old mtime: a replaced file can look older than
    # anything made from the previous one.
    files = tmp_path / "files"
    write_idx(files, 6, 2, gzipped=True)
    first = load_fashion(files)
    path = files / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, 6, 28, 28) + bytes(6 * 784))
    os.utime(path, (1e9, 1e9))  # 2001
    second = load_fashion(files)
    assert first.x_train.sum() > 0 and second.x_train.sum() == 0


def tree(directory: Path) -> list:
    """Every path under ``directory`` with its content (None for a directory)."""
    return sorted(
        (str(p.relative_to(directory)), p.read_bytes() if p.is_file() else None)
        for p in directory.rglob("*")
    )


def test_reading_a_data_dir_writes_nothing_into_it(tmp_path):
    # A read-only directory (a shared dataset, a mounted volume) must do: nothing is written.
    # Tests run as root, which ignores permissions, so compare the tree rather than chmod.
    files = tmp_path / "files"
    write_idx(files, 6, 2, gzipped=True)
    before = tree(files)
    load_fashion(files)
    assert tree(files) == before


def write_labels(path: Path, labels: bytes, count: int | None = None) -> None:
    count = len(labels) if count is None else count
    path.write_bytes(struct.pack(">II", 2049, count) + labels)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        pytest.param(bytes([1, 2, 3, 4, 5]), "5 labels for 6 images", id="too-few-labels"),
        pytest.param(bytes([1, 2, 3, 4, 5, 6, 7]), "7 labels for 6 images", id="too-many"),
        pytest.param(
            bytes([1, 2, 3, 10, 5, 6]), r"label 10 at position 3 .*0\.\.9", id="out-of-range"
        ),
    ],
)
def test_bad_label_files_are_refused_naming_the_file(tmp_path, labels, message):
    files = tmp_path / "files"
    write_idx(files, 6, 2, gzipped=False)
    write_labels(files / "train-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError, match=message) as error:
        load_fashion(files)
    assert "train-labels-idx1-ubyte" in str(error.value)


def test_a_label_file_shorter_than_its_header_says_is_refused(tmp_path):
    files = tmp_path / "files"
    write_idx(files, 6, 2, gzipped=False)
    write_labels(files / "t10k-labels-idx1-ubyte", bytes([1]), count=2)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: .*truncated"):
        load_fashion(files)


def truncate_gzip(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-20])


def not_gzip(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100].replace(b"\x1f\x8b", b"xx", 1))


def truncate_after_header(path: Path) -> None:
    with gzip.open(path, "rb") as f:
        content = f.read()
    with gzip.open(path, "wb") as f:
        f.write(content[: len(content) // 2])


def labels_as_images(path: Path) -> None:
    path.write_bytes((path.parent / "train-labels-idx1-ubyte.gz").read_bytes())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (not_gzip, r"not a valid gzip file .*Not a gzipped file"),
        (truncate_gzip, "gzip stream is truncated"),
        (truncate_after_header, "truncated"),
        (labels_as_images, "not an IDX file of images"),
    ],
    ids=["not-gzip", "truncated-gzip", "truncated-idx", "labels-as-images"],
)
def test_unreadable_data_files_get_a_one_line_error_naming_the_file(tmp_path, damage, message):
    files = tmp_path / "files"
    write_idx(files, 6, 2, gzipped=True)
    damage(files / "train-images-idx3-ubyte.gz")
    with pytest.raises(ValueError, match=message) as error:
        load_fashion(files)
    text = str(error.value)
    assert str(files / "train-images-idx3-ubyte.gz") in text and "\n" not in text


def test_bad_device_or_dtype_is_refused_before_loading():
    with pytest.raises(ValueError, match="device 'bogus'"):
        pv.load_dataset("digits", device="bogus")
    if not torch.cuda.is_available():  # a run from a GPU machine, resumed on this one
        with pytest.raises(ValueError, match="device 'cuda' is not usable here"):
            pv.load_dataset("digits", device="cuda")
    # Integer pixels would truncate every value in [0, 1) to 0.
    with pytest.raises(ValueError, match=r"dtype must be a floating.*torch\.int64"):
        pv.load_dataset("digits", dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        pv.load_dataset("digits", dtype="float32")


class LyingDataset(torch.utils.data.Dataset):
    def __init__(self, length: int, real: int) -> None:
        self.length, self.real = length, real

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if i >= self.real:
            raise IndexError(f"index {i} is out of range")
        return torch.zeros(4)


def test_to_tensor_refuses_a_dataset_whose_len_lies_or_is_huge():
    with pytest.raises(ValueError, match=r"len\(\) is 5, but item 3 .*IndexError"):
        data_module.to_tensor(LyingDataset(5, 3), 4)
    # 10^12 examples: refused up front, without reading an item (which would take days).
    with pytest.raises(ValueError, match=r"len\(\) is 1000000000000: .* this machine's"):
        data_module.to_tensor(LyingDataset(10**12, 3), 4)


# ---------------------------------------------------------------- promises a file cannot keep


class _CountingReads:
    """A file opened by gzip.open, counting the inflated bytes handed out."""

    def __init__(self, file) -> None:
        self.file, self.inflated = file, 0

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def read(self, size=-1):
        data = self.file.read(size)
        self.inflated += len(data)
        return data

    def readinto(self, buffer):
        count = self.file.readinto(buffer)
        self.inflated += count
        return count


def _images_gz(path: Path, count: int, body: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, count, 28, 28) + body)


def test_a_gzip_bomb_is_refused_at_its_first_byte_past_the_header_s_promise(tmp_path):
    """6 images promised (4704 bytes), 64 MiB of zeros behind them in a 64 KiB file: refused
    after 4704 + 1 bytes of the body, without inflating the rest."""
    files = tmp_path / "files"
    write_idx(files, 6, 2, gzipped=True)
    path = files / "train-images-idx3-ubyte.gz"
    _images_gz(path, 6, bytes(64 * 2**20))
    assert path.stat().st_size < 2**17
    real = gzip.open
    seen = []

    def counting(name, *args, **kwargs):
        seen.append(_CountingReads(real(name, *args, **kwargs)))
        return seen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module.gzip, "open", counting)
        with pytest.raises(ValueError, match="longer than its header says") as error:
            load_fashion(files)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert seen[-1].inflated == 16 + 6 * 784 + 1


def test_a_gzip_header_promising_more_than_the_file_can_inflate_to_is_refused_unread(tmp_path):
    """A header of 60000 images (47 MB) in a file of a few hundred bytes: deflate inflates
    1032-fold at most, so it is refused after the header, before any buffer is made."""
    files = tmp_path / "files"
    write_idx(files, 6, 2, gzipped=True)
    path = files / "train-images-idx3-ubyte.gz"
    _images_gz(path, 60000, bytes(1000))
    real = gzip.open
    seen = []

    def counting(name, *args, **kwargs):
        seen.append(_CountingReads(real(name, *args, **kwargs)))
        return seen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module.gzip, "open", counting)
        with pytest.raises(ValueError, match=r"truncated: .*\(60000, 28, 28\).*can hold"):
            load_fashion(files)
    assert seen[-1].inflated == 16


def test_a_plain_idx_header_promising_more_than_the_file_holds_is_refused_unread(tmp_path):
    files = tmp_path / "files"
    write_idx(files, 6, 2, gzipped=False)
    path = files / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 2051, 2**32 - 1, 2**16, 2**16) + bytes(100))
    with pytest.raises(ValueError, match=r"truncated: .*the file holds 116 bytes"):
        load_fashion(files)


def test_an_idx_file_larger_than_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    files = tmp_path / "files"
    write_idx(files, 6, 2, gzipped=True)
    # A machine of 4 KiB: the 4704 bytes of 6 images do not fit.
    monkeypatch.setattr(
        data_module.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 1
    )
    with pytest.raises(ValueError, match=r"\(4720 bytes\), more than this machine's"):
        load_fashion(files)
