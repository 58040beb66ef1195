"""A user's own data as a :class:`~pyro_vae.data.DataSplits`: a tensor file (``.npy``,
``.npz``, ``.pt``) or a folder of images, with the test set from a second such source or a
seeded fraction of the first.

Values: 8-bit data (``uint8``) are scaled to [0, 1] and booleans become 0 and 1; every other
number is kept as it is, so that the model's likelihood can refuse what it cannot take (Bernoulli
needs [0, 1]; continuous values go with a Normal or Laplace likelihood). What this module refuses
itself is what no model could take: an unreadable file, NaN or infinite values, object arrays,
labels that do not match the rows, mixed image sizes, an empty folder. Every refusal is one
``ValueError`` line that names the file.

A ``.npy`` file is memory-mapped (copy-on-write, so that an in-place write to the tensor can
neither reach the file nor crash on read-only pages), and the checks read it in chunks: when it
holds the asked dtype and its test set comes from elsewhere, the training tensor is a view of
the mapping, read from disk only where it is used. With ``stream=True`` (scripts/train.py) the
training rows are a :class:`~pyro_vae.ArrayDataset` over the mapping whatever its dtype (those
torch takes as they are): the rows left once the test rows are drawn are picked by index, not
copied, and 8-bit values are scaled batch by batch as they are read; only the test rows are
read into memory.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pyro_vae.array_dataset import ArrayDataset

TENSOR_SUFFIXES = (".npy", ".npz", ".pt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The names a .npz file or a .pt dict may hold: the rows, their labels, and a test set.
ARRAY_NAMES = ("x", "x_train", "y", "y_train", "x_test", "y_test")
TEST_FRACTION = 0.2
"""The share of the rows held out as the test set when none is given (seeded)."""
UNLABELLED_CLASSES = ("all",)
# Elements checked at a time for NaN and infinities: the check holds 16 MiB of float32, never
# the whole of a memory-mapped file.
_CHUNK = 1 << 22
# PIL modes taken: grayscale, and colour read as RGB. Others (16-bit, float) are refused.
_GRAY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


@dataclass
class _Source:
    """What one file or folder holds: images ``(N, C, H, W)`` or rows ``(N, D)``, labels or
    ``None``, and its class names (``None``: numbered by label)."""

    path: Path
    x: Tensor
    y: Tensor | None
    class_names: tuple[str, ...] | None
    num_levels: int
    rows: Tensor | None = None
    """The rows of ``x`` this source holds (``None``: all): a mapped ``x`` is split by index,
    not copied."""
    mapped: np.ndarray | None = None
    """The memory-mapped array that ``x`` is a view of (a ``.npy`` whose dtype torch takes as
    it is), else ``None``."""

    def __len__(self) -> int:
        return len(self.x) if self.rows is None else len(self.rows)

    def held(self) -> Tensor:
        """The rows this source holds, as a tensor in memory."""
        return self.x if self.rows is None else self.x[self.rows]


class UserData(NamedTuple):
    """The fields of a :class:`~pyro_vae.data.DataSplits` (which
    :func:`pyro_vae.load_dataset` makes of them: this module imports nothing of data.py, so
    that the two import no circle)."""

    name: str
    x_train: Tensor | ArrayDataset
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    image_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    num_levels: int


def load_user_dataset(
    path: str | os.PathLike,
    *,
    test_dataset: str | os.PathLike | None = None,
    image_size: tuple[int, int] | list[int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    stream: bool = False,
) -> UserData:
    """The data in ``path`` as train/test splits (``name`` is the path), to be made a
    ``DataSplits`` by :func:`pyro_vae.load_dataset`, which takes the same arguments.

    :param path: a ``.npy`` file (images ``(N, H, W)`` or ``(N, C, H, W)`` with C 1 or 3, or
        rows ``(N, D)``); a ``.npz`` file or a ``.pt`` file (a tensor, or a dict of tensors)
        holding ``x`` or ``x_train``, optionally ``y``/``y_train`` (integer labels) and
        ``x_test``/``y_test``; or a folder of PNG/JPEG images, with one subfolder per class
        (labelled by the sorted subfolder names, as torchvision's ``ImageFolder``) or none
        (unlabelled: one class, "all"). Grayscale images give one channel; colour (or a folder
        that mixes both) three.
    :param test_dataset: the test set, in any of these forms; without it, the file's own
        ``x_test``, else :data:`TEST_FRACTION` of the rows drawn with ``seed``.
    :param image_size: ``(height, width)`` every image of a folder is resized to (bilinear);
        without it, images of unequal size are refused.
    :param stream: the training rows of a ``.npy`` as a :class:`~pyro_vae.ArrayDataset` over
        its mapping (see the module's docstring) instead of a tensor.
    :raises ValueError: one line naming the file, for anything that cannot be read or used.
    """
    path = Path(path)
    train = _read_source(path, image_size)
    if test_dataset is not None:
        if train.held_test is not None:
            raise ValueError(
                f"{path}: holds its own x_test, and --test-dataset gives another test set; "
                "leave one out"
            )
        test = _read_source(Path(test_dataset), image_size)
        if test.held_test is not None:
            raise ValueError(f"{test.source.path}: a test set holding a test set of its own")
        train_source, test_source = train.source, test.source
    elif train.held_test is not None:
        train_source, test_source = train.source, train.held_test
    else:
        train_source, test_source = _split_off_test(train.source, seed)
    return _splits(path, train_source, test_source, dtype, stream)


@dataclass
class _Read:
    source: _Source
    held_test: _Source | None = None


def _read_source(path: Path, image_size: tuple[int, int] | list[int] | None) -> _Read:
    if path.is_dir():
        return _Read(_read_folder(path, image_size))
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        raise ValueError(
            f"{path}: unknown kind of file {suffix or '(no extension)'}; give a "
            f"{', '.join(TENSOR_SUFFIXES)} file or a folder of images"
        )
    if image_size is not None:
        raise ValueError(f"{path}: --image-size resizes a folder's images, not a tensor file")
    if suffix == ".npy":
        array = _open_npy(path)
        source = _source(path, "the array", array, None, None)
        if source.x.data_ptr() == array.ctypes.data:  # a view: no conversion copied it
            source.mapped = array
        return _Read(source)
    arrays = _read_npz(path) if suffix == ".npz" else _read_pt(path)
    return _named_arrays(path, arrays)


def _open_npy(path: Path) -> np.ndarray:
    """The array of a .npy file, memory-mapped; its header read first, so that a file that is
    no .npy (numpy would try to unpickle it) and an object array are told apart."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            _, _, dtype = read_header(file)
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({_line(error)})") from None
    except ValueError as error:
        raise ValueError(f"{path}: cannot read it as a .npy array ({_line(error)})") from None
    if np.dtype(dtype).hasobject:
        raise ValueError(f"{path}: holds an object array (Python objects), not numbers")
    try:
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it as a .npy array ({_line(error)})") from None


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError(f"{path}: a .npy array named .npz; rename it to .npy")
            return {name: archive[name] for name in archive.files}
    except ValueError as error:
        if "object" in str(error).lower():
            raise ValueError(
                f"{path}: holds an object array (Python objects), not numbers"
            ) from None
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read it as a .npz archive ({_line(error)})") from None
    except Exception as error:  # zipfile's and numpy's many errors: all mean "not readable"
        raise ValueError(f"{path}: cannot read it as a .npz archive ({_line(error)})") from None


def _read_pt(path: Path) -> dict[str, Any]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types; all mean "not readable"
        raise ValueError(
            f"{path}: cannot read it as tensors with torch.load(weights_only=True) "
            f"({type(error).__name__}: {_line(error)})"
        ) from None
    if isinstance(content, Tensor):
        return {"x": content}
    if not isinstance(content, dict) or not all(isinstance(k, str) for k in content):
        raise ValueError(
            f"{path}: holds a {type(content).__name__}; expected a tensor or a dict of tensors "
            f"named {_NAMES_HELP}"
        )
    return content


_NAMES_HELP = "x or x_train, optional y or y_train, optional x_test and y_test"


def _named_arrays(path: Path, arrays: dict[str, Any]) -> _Read:
    unknown = sorted(set(arrays) - set(ARRAY_NAMES))
    if unknown:
        raise ValueError(f"{path}: holds arrays named {', '.join(unknown)}; expected {_NAMES_HELP}")
    for a, b in (("x", "x_train"), ("y", "y_train")):
        if a in arrays and b in arrays:
            raise ValueError(f"{path}: holds both {a} and {b}; name the rows once")
    x_name = "x" if "x" in arrays else "x_train"
    if x_name not in arrays:
        raise ValueError(f"{path}: holds no x or x_train; expected {_NAMES_HELP}")
    y_name = "y" if "y" in arrays else "y_train"
    source = _source(path, x_name, arrays[x_name], arrays.get(y_name), y_name)
    held_test = None
    if "x_test" in arrays:
        held_test = _source(path, "x_test", arrays["x_test"], arrays.get("y_test"), "y_test")
    elif "y_test" in arrays:
        raise ValueError(f"{path}: holds y_test but no x_test")
    return _Read(source, held_test)


def _source(path: Path, x_name: str, x: Any, y: Any, y_name: str | None) -> _Source:
    """Rows or images from an array or tensor, checked; 8-bit values scaled to [0, 1]."""
    tensor = _as_tensor(path, x_name, x)
    if tensor.is_complex():
        raise ValueError(f"{path}: {x_name} holds {tensor.dtype} values, not real numbers")
    if tensor.ndim not in (2, 3, 4):
        raise ValueError(
            f"{path}: {x_name} has shape {tuple(tensor.shape)}; expected rows (N, D) or images "
            "(N, H, W) or (N, C, H, W)"
        )
    if tensor.ndim == 4 and tensor.shape[1] not in (1, 3):
        raise ValueError(
            f"{path}: {x_name} has shape {tuple(tensor.shape)}: {tensor.shape[1]} channels; "
            "images (N, C, H, W) have 1 (grayscale) or 3 (colour)"
        )
    if tensor.shape[0] == 0 or tensor[0].numel() == 0:
        raise ValueError(f"{path}: {x_name} has shape {tuple(tensor.shape)}: no values")
    if tensor.is_floating_point():
        _check_finite(path, x_name, tensor)
    labels = None if y is None else _labels(path, y_name or "y", y, len(tensor), x_name)
    levels = 2 if tensor.dtype == torch.bool else 256
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    return _Source(path, tensor, labels, None, levels)


def _as_tensor(path: Path, name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        if value.is_sparse or value.layout != torch.strided:
            raise ValueError(f"{path}: {name} is a {value.layout} tensor; give a dense one")
        return value.detach()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{path}: {name} is a {type(value).__name__}, not an array")
    if value.dtype.hasobject:
        raise ValueError(f"{path}: {name} is an object array (Python objects), not numbers")
    if value.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {name} holds {value.dtype} values, not real numbers")
    if not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))
    if value.dtype.kind == "u" and value.dtype != np.uint8:
        value = value.astype(np.int64)  # torch has no uint16 .. uint64 arithmetic
    return torch.from_numpy(value)


def _is_integer(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _check_finite(path: Path, name: str, x: Tensor) -> None:
    """NaN or infinities refused, a chunk of rows at a time (a memory-mapped file is never held
    whole)."""
    rows = max(1, _CHUNK // max(1, x[0].numel()))
    for start in range(0, len(x), rows):
        chunk = x[start : start + rows]
        finite = torch.isfinite(chunk).reshape(len(chunk), -1).all(dim=1)
        if not bool(finite.all()):
            row = start + int((~finite).nonzero()[0])
            raise ValueError(f"{path}: {name} has a NaN or infinite value in row {row}")


def _labels(path: Path, name: str, y: Any, num_rows: int, x_name: str) -> Tensor:
    labels = _as_tensor(path, name, y)
    if not _is_integer(labels):
        raise ValueError(f"{path}: {name} holds {labels.dtype} values; labels are integers")
    if labels.ndim != 1 or len(labels) != num_rows:
        raise ValueError(
            f"{path}: {name} has shape {tuple(labels.shape)}, but {x_name} has {num_rows} rows: "
            "one label per row"
        )
    labels = labels.long()
    if bool((labels < 0).any()):
        row = int((labels < 0).nonzero()[0])
        raise ValueError(
            f"{path}: {name} has label {int(labels[row])} in row {row}; labels are 0, 1, ..."
        )
    return labels


def _read_folder(folder: Path, image_size: tuple[int, int] | list[int] | None) -> _Source:
    """A folder of images, labelled by class subfolders when it has them."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = _image_files(folder, recursive=False)
    files: list[Path] = []
    labels: list[int] = []
    class_names: tuple[str, ...] | None = None
    classes = [d for d in subfolders if _image_files(d, recursive=True)]
    if classes:
        if top:
            raise ValueError(
                f"{folder}: holds images ({top[0].name}) beside class subfolders; put every "
                "image in its class's subfolder, or use no subfolders"
            )
        empty = [d.name for d in subfolders if d not in classes]
        if empty:
            raise ValueError(f"{folder}: class subfolder {empty[0]} holds no PNG or JPEG images")
        class_names = tuple(d.name for d in classes)
        for k, directory in enumerate(classes):
            found = _image_files(directory, recursive=True)
            files += found
            labels += [k] * len(found)
    else:
        files = top
        if not files:
            raise ValueError(f"{folder}: holds no PNG or JPEG images")
    images = _read_images(folder, files, image_size)
    y = None if class_names is None else torch.tensor(labels)
    return _Source(folder, images, y, class_names, 256)


def _image_files(folder: Path, *, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _read_images(
    folder: Path, files: list[Path], image_size: tuple[int, int] | list[int] | None
) -> Tensor:
    """The images as uint8 ``(N, C, H, W)``: C = 1 when all are grayscale, else 3."""
    from PIL import Image, UnidentifiedImageError

    opened: list[tuple[Path, str, tuple[int, int]]] = []
    for file in files:  # headers only: modes and sizes, before any pixel is decoded
        try:
            with Image.open(file) as image:
                opened.append((file, image.mode, image.size))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ValueError(f"{file}: cannot read it as an image ({_line(error)})") from None
    for file, mode, _ in opened:
        if mode not in _GRAY_MODES + _COLOUR_MODES:
            raise ValueError(
                f"{file}: image mode {mode} is not taken; give 8-bit grayscale or colour images"
            )
    if image_size is None:
        first, _, (w, h) = opened[0]
        for file, _, size in opened:
            if size != (w, h):
                raise ValueError(
                    f"{folder}: images of unequal size: {first.name} is {h}x{w}, "
                    f"{file.relative_to(folder)} is {size[1]}x{size[0]} (height x width); "
                    "give --image-size H,W to resize them"
                )
    else:
        h, w = image_size
    colour = any(mode in _COLOUR_MODES for _, mode, _ in opened)
    channels, mode = (3, "RGB") if colour else (1, "L")
    images = np.empty((len(files), channels, h, w), dtype=np.uint8)
    for i, (file, _, size) in enumerate(opened):
        try:
            with Image.open(file) as image:
                converted = image.convert(mode)
                if size != (w, h):
                    converted = converted.resize((w, h), Image.Resampling.BILINEAR)
                pixels = np.asarray(converted, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ValueError(f"{file}: cannot read it as an image ({_line(error)})") from None
        images[i] = pixels.reshape(h, w, channels).transpose(2, 0, 1)
    return torch.from_numpy(images)


def _split_off_test(source: _Source, seed: int) -> tuple[_Source, _Source]:
    """:data:`TEST_FRACTION` of the rows as the test set, drawn from a stream of the seed's own
    (``spawn_key=(3,)``: validation rows use 2, the test set's binarization 1)."""
    n = len(source.x)
    num_test = round(TEST_FRACTION * n)
    if num_test < 1 or num_test >= n:
        raise ValueError(
            f"{source.path}: {n} rows are too few to hold out a test set "
            f"({TEST_FRACTION:.0%}); give more, or a test set with --test-dataset"
        )
    (state,) = np.random.SeedSequence(seed, spawn_key=(3,)).generate_state(1, np.uint64)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(state)))
    test_rows, train_rows = order[:num_test].sort().values, order[num_test:].sort().values

    def part(rows: Tensor) -> _Source:
        y = None if source.y is None else source.y[rows]
        if source.mapped is not None:  # picked by index when it is used, not copied here
            return dataclasses.replace(source, y=y, rows=rows)
        return _Source(source.path, source.x[rows], y, source.class_names, source.num_levels)

    return part(train_rows), part(test_rows)


def _splits(
    name: Path, train: _Source, test: _Source, dtype: torch.dtype, stream: bool
) -> UserData:
    if train.x.shape[1:] != test.x.shape[1:]:
        raise ValueError(
            f"{test.path}: test {_shape_words(test.x)}, but the training data ({train.path}) "
            f"are {_shape_words(train.x)}"
        )
    if (train.y is None) != (test.y is None):
        labelled, other = (train, test) if test.y is None else (test, train)
        raise ValueError(
            f"{other.path}: has no labels, but {labelled.path} has; give labels to both or none"
        )
    class_names, y_train, y_test = _classes(train, test)
    if train.x.ndim == 4:
        channels, h, w = train.x.shape[1:]
        image_shape: tuple[int, ...] = (h, w) if channels == 1 else (channels, h, w)
    else:
        image_shape = (1, train.x.shape[1])  # rows are drawn as strips of one pixel's height

    def flat(source: _Source) -> Tensor:
        x = source.held()
        x = x.reshape(len(x), -1)
        if x.dtype == torch.uint8:
            return x.to(dtype) / 255.0  # ArrayDataset scales a streamed batch alike
        return x.to(dtype)  # the same tensor when it holds dtype already: still mapped

    x_train: Tensor | ArrayDataset
    if stream and train.mapped is not None:
        x_train = ArrayDataset(train.mapped, dtype, rows=train.rows)
    else:
        x_train = flat(train)
    return UserData(
        str(name),
        x_train,
        y_train,
        flat(test),
        y_test,
        image_shape,
        class_names,
        train.num_levels,
    )


def _classes(train: _Source, test: _Source) -> tuple[tuple[str, ...], Tensor, Tensor]:
    """The class names and both splits' labels, on one numbering: a folder's by the names of
    its subfolders, a tensor file's by the numbers; no labels: one class."""
    if train.y is None or test.y is None:
        return UNLABELLED_CLASSES, _zeros(len(train)), _zeros(len(test))
    if train.class_names is None and test.class_names is None:
        count = 1 + int(max(train.y.max(), test.y.max()))
        return tuple(map(str, range(count))), train.y, test.y
    if train.class_names is None or test.class_names is None:
        numbered = train if train.class_names is None else test
        raise ValueError(
            f"{numbered.path}: its labels are numbers, the other set's are a folder's class "
            "subfolders; give both sets in one kind"
        )
    if train.class_names == test.class_names:
        return train.class_names, train.y, test.y
    unknown = sorted(set(test.class_names) - set(train.class_names))
    if unknown:
        raise ValueError(
            f"{test.path}: class {unknown[0]} is not one of the training set's "
            f"({', '.join(train.class_names)})"
        )
    index = torch.tensor([train.class_names.index(name) for name in test.class_names])
    return train.class_names, train.y, index[test.y]


def _zeros(count: int) -> Tensor:
    return torch.zeros(count, dtype=torch.long)


def _shape_words(x: Tensor) -> str:
    if x.ndim == 2:
        return f"rows of {x.shape[1]} values"
    channels, h, w = x.shape[1:]
    return f"images of {channels} channel(s), {h}x{w}"


def _line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
