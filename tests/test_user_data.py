"""A user's own data (pyro_vae.user_data) through pv.load_dataset: tensor files, image folders,
the test set, and what is refused. tests/jobs/test_own_data.py runs them through train.py."""

import numpy as np
import pytest
import torch
from PIL import Image

import pyro_vae as pv
from pyro_vae import user_data


def write_images(folder, count, size=(8, 8), mode="L", seed=0):
    """``count`` random images of ``size`` (height, width) as PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
    return folder


def test_npy_is_memory_mapped_and_not_copied(tmp_path, monkeypatch):
    """A float32 .npy with a test set of its own is the training tensor itself: a view of
    the mapping, read where it is used, never a copy of the whole."""
    x = np.random.default_rng(0).random((60, 8, 8), dtype=np.float32)
    np.save(tmp_path / "train.npy", x)
    np.save(tmp_path / "test.npy", x[:10])
    mapped = []
    real_load = np.load

    def load(*args, **kwargs):
        array = real_load(*args, **kwargs)
        mapped.append(array)
        return array

    monkeypatch.setattr(np, "load", load)
    data = pv.load_dataset(str(tmp_path / "train.npy"), test_dataset=str(tmp_path / "test.npy"))
    assert isinstance(mapped[0], np.memmap)
    assert data.x_train.data_ptr() == mapped[0].ctypes.data  # shares the mapping's memory
    assert torch.equal(data.x_train, torch.from_numpy(x.reshape(60, 64)))
    # Copy-on-write: a write to the tensor never reaches the file.
    data.x_train[0, 0] = 5.0
    assert np.array_equal(real_load(tmp_path / "train.npy"), x)


def test_npy_images_rows_and_uint8_scaling(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (50, 1, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    data = pv.load_dataset(str(tmp_path / "images.npy"), seed=3)
    assert data.image_shape == (6, 5) and data.data_dim == 30
    assert (len(data.x_train), len(data.x_test)) == (40, 10)  # TEST_FRACTION of the rows
    assert data.class_names == ("all",) and not data.y_train.any()
    # The test rows are a seeded draw of their own, and the two parts make the whole.
    everything = torch.cat([data.x_train, data.x_test]) * 255
    assert sorted(map(tuple, everything.round().long().tolist())) == sorted(
        map(tuple, images.reshape(50, -1).tolist())
    )
    again = pv.load_dataset(str(tmp_path / "images.npy"), seed=3)
    other = pv.load_dataset(str(tmp_path / "images.npy"), seed=4)
    assert torch.equal(again.x_test, data.x_test) and not torch.equal(other.x_test, data.x_test)
    np.save(tmp_path / "rows.npy", np.linspace(-3, 3, 40 * 7).reshape(40, 7))
    rows = pv.load_dataset(str(tmp_path / "rows.npy"))
    assert rows.data_dim == 7 and rows.x_train.min() < 0  # floats are kept as they are


def test_npz_and_pt_with_labels_and_test_sets(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.random((30, 4, 4)), rng.integers(0, 3, 30)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    data = pv.load_dataset(str(tmp_path / "d.npz"))
    assert len(data.x_train) == 30 and torch.equal(data.y_test, torch.as_tensor(y[:6]))
    assert data.class_names == ("0", "1", "2") and data.x_train.dtype == torch.float32
    torch.save({"x": torch.as_tensor(x), "y": torch.as_tensor(y)}, tmp_path / "d.pt")
    np.savez(tmp_path / "test.npz", x=x[:6], y=y[:6])
    data = pv.load_dataset(str(tmp_path / "d.pt"), test_dataset=str(tmp_path / "test.npz"))
    assert len(data.x_train) == 30 and len(data.x_test) == 6 and data.name.endswith("d.pt")
    with pytest.raises(ValueError, match=r"d\.npz: holds its own x_test, and --test-dataset"):
        pv.load_dataset(str(tmp_path / "d.npz"), test_dataset=str(tmp_path / "test.npz"))
    torch.save(torch.as_tensor(x[:, None]), tmp_path / "t.pt")  # a bare tensor (N, 1, H, W)
    assert pv.load_dataset(str(tmp_path / "t.pt")).image_shape == (4, 4)


def test_image_folder_with_and_without_classes_grey_and_colour(tmp_path):
    write_images(tmp_path / "classes" / "b", 10, seed=1)
    write_images(tmp_path / "classes" / "a", 20, seed=2)
    data = pv.load_dataset(str(tmp_path / "classes"))
    assert data.class_names == ("a", "b") and data.image_shape == (8, 8)
    assert int(torch.cat([data.y_train, data.y_test]).sum()) == 10  # the 10 of class "b"
    assert 0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1
    colour = write_images(tmp_path / "colour", 20, size=(6, 7), mode="RGB")
    data = pv.load_dataset(str(colour))
    assert data.image_shape == (3, 6, 7) and data.data_dim == 126
    assert data.class_names == ("all",)
    # The rows are (C, H, W) flattened: the first 42 values are the red plane.
    first = np.asarray(Image.open(colour / "0.png"))
    test_or_train = torch.cat([data.x_train, data.x_test])
    red = torch.as_tensor(first[:, :, 0].reshape(-1) / 255.0, dtype=torch.float32)
    assert any(torch.allclose(row[:42], red) for row in test_or_train)


def test_mixed_sizes_refused_or_resized(tmp_path):
    folder = write_images(tmp_path / "mixed", 10)
    Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(folder / "z.png")
    with pytest.raises(
        ValueError, match=r"mixed: images of unequal size.*z.png is 9x8.*--image-size"
    ):
        pv.load_dataset(str(folder))
    data = pv.load_dataset(str(folder), image_size=(5, 4))
    assert data.image_shape == (5, 4)


def test_test_dataset_classes_are_matched_by_name(tmp_path):
    write_images(tmp_path / "train" / "a", 10)
    write_images(tmp_path / "train" / "b", 10)
    write_images(tmp_path / "test" / "b", 3)
    data = pv.load_dataset(str(tmp_path / "train"), test_dataset=str(tmp_path / "test"))
    assert data.y_test.tolist() == [1, 1, 1] and len(data.x_train) == 20


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not an array"), r"bad\.npy: cannot read it as a \.npy"),
        (lambda p: np.save(p, np.array([1, "a"], dtype=object)), r"bad\.npy: holds an object"),
        (lambda p: np.save(p, np.array([[0.5, np.nan]] * 10)), r"bad\.npy: the array has a NaN"),
        (lambda p: np.save(p, np.ones(10)), r"bad\.npy: the array has shape \(10,\)"),
    ],
)  # fmt: skip
def test_bad_npy_files_are_refused_naming_them(tmp_path, make, message):
    make(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match=message):
        pv.load_dataset(str(tmp_path / "bad.npy"))


def test_bad_named_arrays_are_refused(tmp_path):
    x = np.zeros((10, 3))
    cases = [
        ({"x": x, "y": np.zeros(9, dtype=int)}, r"y has shape \(9,\), but x has 10 rows"),
        ({"x": x, "y": np.zeros(10)}, r"y holds torch.float64 values; labels are integers"),
        ({"x": x, "ytest": np.zeros(10, dtype=int)}, r"holds arrays named ytest"),
        ({"x": x, "x_train": x}, r"holds both x and x_train"),
        ({"x": x.astype(object)}, r"object array"),
        ({"x": np.full((10, 3), np.inf)}, r"x has a NaN or infinite value in row 0"),
    ]
    for arrays, message in cases:
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(ValueError, match=rf"bad\.npz: .*{message}"):
            pv.load_dataset(str(tmp_path / "bad.npz"))


def test_bad_sources_are_refused_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"empty: holds no PNG or JPEG images"):
        pv.load_dataset(str(tmp_path / "empty"))
    folder = write_images(tmp_path / "broken", 3)
    (folder / "9.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"broken/9\.png: cannot read it as an image"):
        pv.load_dataset(str(folder))
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"data\.csv: unknown kind of file \.csv"):
        pv.load_dataset(str(tmp_path / "data.csv"))
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt: holds a list"):
        pv.load_dataset(str(tmp_path / "list.pt"))
    np.save(tmp_path / "x.npy", np.zeros((10, 3)))
    np.save(tmp_path / "y.npy", np.zeros((10, 4)))
    with pytest.raises(ValueError, match=r"y\.npy: test rows of 4 values, but the training"):
        pv.load_dataset(str(tmp_path / "x.npy"), test_dataset=str(tmp_path / "y.npy"))
    with pytest.raises(
        ValueError, match=r"unknown dataset .*nowhere.npy.: not one of digits.*nor a file or folder"
    ):
        pv.load_dataset(str(tmp_path / "nowhere.npy"))


def test_named_datasets_take_no_path_options():
    with pytest.raises(ValueError, match="for data given as a path"):
        pv.load_dataset("digits", image_size=(8, 8))
    assert user_data.TEST_FRACTION == 0.2


def test_colour_images_are_drawn_in_colour():
    from pyro_vae.plots import image_grid

    red = torch.zeros(3, 2, 3)
    red[0] = 1.0
    grid = image_grid(red.reshape(1, -1).repeat(2, 1), (3, 2, 3), 1, 2)
    assert grid.shape == (2, 7, 3)  # two 2x3 images and a 1-pixel gap, RGB
    assert (grid[:, :3] == [1.0, 0.0, 0.0]).all() and (grid[:, 3] == 1.0).all()
    assert image_grid(torch.ones(1, 6), (2, 3), 1, 1).shape == (2, 3)  # grayscale: 2-D
