"""train.py on a user's own data (--dataset PATH): a 1-epoch run on each form, the run read back
from its path, and every bad input refused in one line, exit 2, before anything is written."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.jobs import load_run

train_script, evaluate_script = load_script("train"), load_script("evaluate")
TINY = ("--num-epochs", "1", "--latent-dim", "2", "--hidden-dims", "8", "--no-progress")
TINY += ("--num-iw-particles", "2")

pytestmark = pytest.mark.usefixtures("float32")


def images(count=60, shape=(8, 8), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def write_folder(folder, count, mode="L", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    shape = (8, 8) if mode == "L" else (8, 8, 3)
    for i, pixels in enumerate(images(count, shape, seed)):
        Image.fromarray(pixels, mode).save(folder / f"{i}.png")
    return folder


def make_npy(d):
    np.save(d / "data.npy", images().astype(np.float32) / 255)
    return d / "data.npy"


def make_npz(d):
    labels = np.arange(60) % 3
    np.savez(d / "data.npz", x_train=images(), y_train=labels, x_test=images(12, seed=1),
             y_test=labels[:12])  # fmt: skip
    return d / "data.npz"


def make_pt(d):
    torch.save({"x": torch.as_tensor(images()), "y": torch.arange(60) % 2}, d / "data.pt")
    return d / "data.pt"


def make_classes(d):
    write_folder(d / "data" / "one", 30, seed=1)
    write_folder(d / "data" / "two", 30, mode="RGB", seed=2)  # a mix: read as colour
    return d / "data"


def make_unlabelled(d):
    return write_folder(d / "data", 60)


@pytest.mark.parametrize("make", [make_npy, make_npz, make_pt, make_classes, make_unlabelled])
def test_train_on_own_data_and_read_it_back(tmp_path, make, capsys):
    data = make(tmp_path)
    out = tmp_path / "run"
    code, stdout, err = call(train_script, *TINY, "--dataset", str(data), "--out-dir", str(out),
                             capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert stdout.startswith(f"{data}: ")
    final = json.loads((out / "final_metrics.json").read_text())
    assert math_finite(final["test_elbo"])
    run = load_run(out)  # the data rebuilt from the path, the test set checked by its digest
    assert run.args["dataset"] == str(data) and run.data.name == str(data)
    code, _, err = call(evaluate_script, str(out), "--num-particles", "2", capsys=capsys)
    assert code == 0, err


def math_finite(value):
    return isinstance(value, float) and np.isfinite(value)


def test_colour_folder_trains_with_conv_and_the_test_dataset(tmp_path, capsys):
    train_dir = write_folder(tmp_path / "train" / "a", 40, mode="RGB").parent
    write_folder(tmp_path / "train" / "b", 20, mode="RGB", seed=1)
    test_dir = write_folder(tmp_path / "test" / "b", 8, mode="RGB", seed=2).parent
    out = tmp_path / "run"
    argv = ("--num-epochs", "1", "--latent-dim", "2", "--no-progress", "--num-iw-particles", "2",
            "--network", "conv", "--dataset", str(train_dir), "--test-dataset", str(test_dir),
            "--out-dir", str(out))  # fmt: skip
    code, stdout, err = call(train_script, *argv, capsys=capsys)
    assert code == 0, err
    assert "54 train / 6 validation / 8 test examples of 192 features" in stdout
    run = load_run(out)
    assert run.config["image_shape"] == [3, 8, 8] and run.data.y_test.tolist() == [1] * 8


def test_default_run_directory_is_named_by_the_file(tmp_path, monkeypatch, capsys):
    data = make_npy(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = call(train_script, *TINY, "--dataset", str(data), capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "data" / "checkpoint.pt").is_file() and data.is_file()


def continuous(d):
    np.save(d / "bad.npy", images().astype(np.float32) / 100)  # up to 2.55
    return d / "bad.npy", r"bad\.npy \(training rows\) has values outside the probabilities in "
    r"\[0, 1\] .*; values outside \[0, 1\] need --likelihood normal or laplace"


def bad_file(d):
    (d / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    return d / "bad.npy", r"bad\.npy: cannot read it as a \.npy array"


def mixed_sizes(d):
    folder = write_folder(d / "bad", 10)
    Image.fromarray(np.zeros((5, 8), np.uint8)).save(folder / "small.png")
    return folder, r"bad: images of unequal size: 0\.png is 8x8, small\.png is 5x8"


def empty_folder(d):
    (d / "bad").mkdir()
    return d / "bad", r"bad: holds no PNG or JPEG images"


def nan(d):
    x = images().astype(np.float32) / 255
    x[7, 1, 1] = np.nan
    np.save(d / "bad.npy", x)
    return d / "bad.npy", r"bad\.npy: the array has a NaN or infinite value in row 7"


def object_array(d):
    np.save(d / "bad.npy", np.array([[0.5], "x"], dtype=object))
    return d / "bad.npy", r"bad\.npy: holds an object array"


def label_count(d):
    np.savez(d / "bad.npz", x=images(), y=np.zeros(59, dtype=int))
    return d / "bad.npz", r"bad\.npz: y has shape \(59,\), but x has 60 rows"


def extension(d):
    (d / "bad.csv").write_text("0,1\n")
    return d / "bad.csv", r"bad\.csv: unknown kind of file \.csv"


def missing(d):
    return d / "bad.npy", r"unknown dataset '.*bad\.npy': not one of .*, nor a file or folder"


@pytest.mark.parametrize(
    "make",
    [continuous, bad_file, mixed_sizes, empty_folder, nan, object_array, label_count, extension,
     missing],
)  # fmt: skip
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, make, capsys):
    data, message = make(tmp_path)
    out = tmp_path / "run"
    code, _, err = call(train_script, *TINY, "--dataset", str(data), "--out-dir", str(out),
                        capsys=capsys)  # fmt: skip
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"train.py: error: {'unknown dataset' if make is missing else data}")
    assert re.search(message, err), err
    assert not out.exists()


def test_path_options_refused_for_a_named_dataset(tmp_path, capsys):
    code, _, err = call(train_script, "--image-size", "8,8", "--out-dir", str(tmp_path / "r"),
                        capsys=capsys)  # fmt: skip
    assert code == 2 and "--image-size is for a --dataset given as a path" in err
    assert not (tmp_path / "r").exists()


def test_a_run_saved_before_the_path_flags_loads_and_resumes(tmp_path, capsys):
    """A checkpoint whose arguments lack --test-dataset and --image-size (older runs) is read
    back and resumed with None for both (FLAGS_ADDED_SINCE)."""
    out = tmp_path / "old"
    code, _, err = call(train_script, *TINY, "--out-dir", str(out), capsys=capsys)
    assert code == 0, err
    model, payload = pv.load_checkpoint(out / "checkpoint.pt")
    del payload["args"]["test_dataset"], payload["args"]["image_size"]
    extra = {k: v for k, v in payload.items() if k not in ("config", "state_dict", "format")}
    pv.save_checkpoint(out / "checkpoint.pt", model, payload["config"], **extra)
    assert load_run(out).args["test_dataset"] is None
    code, stdout, err = call(train_script, "--resume", str(out), "--num-epochs", "2", capsys=capsys)
    assert code == 0, err
    assert "epoch   2/2" in stdout


def test_help_names_the_path_forms(capsys):
    code, stdout, _ = call(train_script, "--help", capsys=capsys)
    assert code == 0
    for words in ("x_train", "--test-dataset PATH", "20% of its rows", "--image-size H,W"):
        assert words in " ".join(stdout.split()), words
