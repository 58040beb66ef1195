"""train.py on a .npy streams it (issue 21, part 3): the training rows stay in the file,
memory-mapped, and reach fit as a pv.ArrayDataset read batch by batch; only the test,
validation and evaluation subsets are read into memory. The streamed run trains to the very
numbers of the same data held in memory (a .npz of the same array, same seed), resumes as an
uninterrupted run, and names a bad value by its row in the whole training set. A subprocess on
a file of 200 MB checks what the process holds."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae import array_dataset
from pyro_vae.data import validation_indices
from pyro_vae.jobs import runs

train_script = load_script("train")
TINY = ("--latent-dim", "2", "--hidden-dims", "8", "--no-progress", "--num-iw-particles", "2")
TINY += ("--batch-size", "32", "--seed", "3", "--compile", "off")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("float32")


def pixels(count=600, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 8, 8), dtype=np.uint8)


@pytest.fixture
def fits(monkeypatch):
    """The data every pv.fit of the runner was given (threads.py's timing calls fit's own
    module, not pv.fit)."""
    given = []
    real = pv.fit

    def fit(module, data, **options):
        given.append(data)
        return real(module, data, **options)

    monkeypatch.setattr(pv, "fit", fit)
    return given


def test_load_dataset_streams_the_training_rows_of_the_in_memory_split(tmp_path):
    """stream=True: the same rows, in the same order, as tensors in memory give; the split's
    seeded test rows and the held-out validation rows alike."""
    np.save(tmp_path / "d.npy", pixels())
    path = str(tmp_path / "d.npy")
    memory, streamed = pv.load_dataset(path, seed=3), pv.load_dataset(path, seed=3, stream=True)
    assert isinstance(streamed.x_train, pv.ArrayDataset) and streamed.streamed
    assert isinstance(streamed.x_train.array, np.memmap)
    assert torch.equal(streamed.x_train.read(), memory.x_train)
    assert torch.equal(streamed.x_test, memory.x_test)
    held = validation_indices(len(memory.x_train), 48, seed=3)
    memory, streamed = memory.hold_out(held), streamed.hold_out(held)
    assert isinstance(streamed.x_train, pv.ArrayDataset)
    assert torch.equal(streamed.x_train.read(), memory.x_train)
    assert torch.equal(streamed.x_val, memory.x_val)
    assert torch.equal(streamed.train_head(10), memory.x_train[:10])
    # Scaled batch by batch exactly as in memory (x / 255, not x * (1/255)).
    batch = [5, 0, 400]
    assert torch.equal(streamed.x_train.__getitems__(batch).reshape(3, 64), memory.x_train[batch])


def test_train_py_hands_fit_the_mapped_file_and_never_reads_it_whole(
    tmp_path, capsys, fits, monkeypatch
):
    """The runner's fit gets the training rows as an ArrayDataset on the file's memory map,
    and no read of the file takes more rows at once than a batch, a scan's chunk, the
    validation set or the evaluation subset (here all made small, on a file of 600 rows)."""
    np.save(tmp_path / "d.npy", pixels())
    monkeypatch.setattr(array_dataset, "_CHUNK", 50 * 64)  # 50 rows a chunk
    monkeypatch.setattr(runs, "MAX_TRAIN_EVAL", 40)
    reads = []
    real = pv.ArrayDataset.__getitems__

    def getitems(self, indices):
        reads.append(len(indices))
        return real(self, indices)

    monkeypatch.setattr(pv.ArrayDataset, "__getitems__", getitems)
    out = tmp_path / "run"
    code, stdout, err = call(train_script, *TINY, "--dataset", str(tmp_path / "d.npy"),
                             "--num-epochs", "1", "--out-dir", str(out), capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert "432 train / 48 validation / 120 test" in stdout
    (data,) = fits
    assert isinstance(data, tuple) and isinstance(data[0], pv.ArrayDataset)
    assert isinstance(data[0].array, np.memmap)  # mapped, not loaded
    assert len(data[0]) == 432  # 600, less 120 test rows, less 48 validation rows
    assert reads and max(reads) <= 50, reads


def training_rows(tmp_path, images):
    """The rows of ``images`` that train (seed 3, 48 validation rows), in the file's order."""
    np.save(tmp_path / "rows.npy", images)
    loaded = pv.load_dataset(str(tmp_path / "rows.npy"), seed=3, stream=True)
    split = loaded.hold_out(validation_indices(len(loaded.x_train), 48, seed=3))
    assert isinstance(split.x_train, pv.ArrayDataset) and split.x_train.rows is not None
    return split.x_train.rows.tolist()


def train_and_read(tmp_path, capsys, data, *extra):
    out = tmp_path / f"run-{data.suffix[1:]}"
    code, _, err = call(train_script, *TINY, "--dataset", str(data), "--out-dir", str(out),
                        "--num-epochs", "2", *extra, capsys=capsys)  # fmt: skip
    assert code == 0, err
    rows = json.loads((out / "metrics.json").read_text())
    for row in rows:
        del row["seconds"]
    final = json.loads((out / "final_metrics.json").read_text())
    numbers = {k: v for k, v in final.items() if not k.endswith("_seconds")}
    weights = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
    return rows, numbers, weights


@pytest.mark.parametrize(
    ("likelihood", "gray"), [("bernoulli", "all"), ("normal", "all"), ("bernoulli", "last")]
)
def test_a_streamed_npy_trains_to_the_numbers_of_the_same_data_in_memory(
    tmp_path, capsys, fits, likelihood, gray
):
    """The .npy is streamed, a .npz of the same array is read into memory: with the same
    seed the test rows, validation rows, shuffles and draws are the same, so every epoch's
    numbers, the test score and the weights are equal, bit for bit. The Normal likelihood
    sees the scaled values themselves (the Bernoulli's binarization would hide a last-bit
    difference in the scaling). ``gray="last"``: black and white images but for one gray
    pixel in the last row, a training row: binarized as in memory, though fit's first
    streamed batch alone would say the data are binary."""
    images = pixels()
    if gray == "last":
        images = np.where(images > 127, 255, 0).astype(np.uint8)
        images[training_rows(tmp_path, images)[-1], 0, 0] = 100
    np.save(tmp_path / "d.npy", images)
    np.savez(tmp_path / "d.npz", x=images)
    options = ("--likelihood", likelihood)
    streamed = train_and_read(tmp_path, capsys, tmp_path / "d.npy", *options)
    memory = train_and_read(tmp_path, capsys, tmp_path / "d.npz", *options)
    assert isinstance(fits[0][0], pv.ArrayDataset) and isinstance(fits[1][0], torch.Tensor)
    assert streamed[0] == memory[0]
    assert streamed[1] == memory[1]
    for name, tensor in memory[2].items():
        assert torch.equal(streamed[2][name], tensor), name


def test_the_speed_probe_trains_a_streamed_npy_as_the_run_does(tmp_path, capsys, monkeypatch):
    """At the speed defaults (the thread count timed, --compile auto) the probe's fit is given
    the job's binarization, decided on all the rows: black and white first rows and gray ones
    after them train, as they do in memory, where fit alone would judge the first batch binary
    and refuse the first gray one."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # where set, nothing is timed
    images = np.where(pixels() > 127, 255, 0).astype(np.uint8)
    images[300:, 0, 0] = 100
    np.save(tmp_path / "d.npy", images)
    threads = torch.get_num_threads()
    try:
        code, out, err = call(train_script, *TINY, "--dataset", str(tmp_path / "d.npy"),
                              "--out-dir", str(tmp_path / "run"), "--num-epochs", "1",
                              "--compile", "auto", capsys=capsys)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert "timed" in out  # the probe ran


def test_a_streamed_run_resumed_ends_as_an_uninterrupted_one(tmp_path, capsys, fits):
    """One epoch, then --resume to two: the run reads the .npy back streamed, checks its
    validation rows and test digest, and ends where two epochs in one go end."""
    np.save(tmp_path / "d.npy", pixels())
    args = (*TINY, "--dataset", str(tmp_path / "d.npy"))
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert call(train_script, *args, "--num-epochs", "2", "--out-dir", str(whole),
                capsys=capsys)[0] == 0  # fmt: skip
    assert call(train_script, *args, "--num-epochs", "1", "--out-dir", str(parts),
                capsys=capsys)[0] == 0  # fmt: skip
    code, _, err = call(train_script, "--resume", str(parts), "--num-epochs", "2",
                        "--num-workers", "1", capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert all(isinstance(data[0], pv.ArrayDataset) for data in fits)
    expected = torch.load(whole / "checkpoint.pt", weights_only=True)["state_dict"]
    resumed = torch.load(parts / "checkpoint.pt", weights_only=True)["state_dict"]
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_bad_value_in_a_later_chunk_is_named_by_its_row_in_the_training_set(
    tmp_path, capsys, monkeypatch
):
    """The streamed rows are checked a chunk at a time: the refusal names the row as a check
    of the whole set in memory does (the same line as for a .npz of the same array)."""
    x = pixels().astype(np.float32) / 255
    # The file's row at training position 300 (after the test and validation rows are out).
    x[training_rows(tmp_path, x)[300], 3, 3] = 7.0
    np.save(tmp_path / "d.npy", x)
    np.savez(tmp_path / "d.npz", x=x)
    monkeypatch.setattr(array_dataset, "_CHUNK", 50 * 64)
    lines = []
    for data in (tmp_path / "d.npy", tmp_path / "d.npz"):
        code, _, err = call(train_script, *TINY, "--dataset", str(data), "--num-epochs", "1",
                            "--out-dir", str(tmp_path / "run"), capsys=capsys)  # fmt: skip
        assert code == 2 and not (tmp_path / "run").exists()
        lines.append(err.replace(str(data), "DATA"))
    assert "training rows" in lines[0] and "first in example 300:" in lines[0], lines[0]
    assert lines[0] == lines[1]


PEAK = """
import os, runpy, sys, threading, time
import torch, pyro_vae  # imported before the baseline: the script's own imports cost nothing

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

base, peak, done = anon(), [0], threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)

threading.Thread(target=watch, daemon=True).start()
code = None
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path("scripts/train.py", run_name="__main__")
except SystemExit as exit_:
    code = exit_.code
done.set()
print("GROWTH", max(peak[0], anon()) - base, "CODE", code, flush=True)
"""


def write_npy(path, rows):
    """A uint8 .npy of ``rows`` 28x28 images, written a part at a time through a map: the
    test holds no copy of it."""
    images = np.lib.format.open_memmap(path, "w+", np.uint8, (rows, 28, 28))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 20000):
        stop = min(start + 20000, rows)
        images[start:stop] = rng.integers(0, 256, (stop - start, 28, 28), dtype=np.uint8)
    images.flush()
    return path


def anon_growth(npy, test_npy, out):
    """How much a train.py process's anonymous memory grew over one epoch on ``npy``."""
    command = [sys.executable, "-c", textwrap.dedent(PEAK), "--dataset", str(npy),
               "--test-dataset", str(test_npy), "--val-size", "500", "--num-epochs", "1",
               "--batch-size", "512", "--latent-dim", "2", "--hidden-dims", "16",
               "--num-iw-particles", "0", "--num-threads", "1", "--compile", "off",
               "--no-progress", "--no-tensorboard", "--out-dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    words = done.stdout.split()
    assert done.returncode == 0 and words[words.index("CODE") + 1] == "0", done.stderr
    return int(words[words.index("GROWTH") + 1])


@pytest.mark.slow
def test_a_200_mb_npy_trains_without_the_process_holding_it(tmp_path):
    """A train.py process on a uint8 .npy of 200 MB, beside one on 20000 rows of the same
    form: its anonymous memory (what it holds, apart from the file's pages, which the kernel
    may drop and read again) grows by no more than the small run's, give or take a quarter
    of the file. What both hold is the same (the 10000-row evaluation subset, binarized, the
    validation and test rows, a scan's chunk, a batch's work: 180 MB measured); a copy of
    the training rows would add 0.8 of the file as uint8, 3.2 as float32. RssAnon is sampled
    every 5 ms: the kernel keeps no peak of it apart from the file's pages (VmHWM counts
    both)."""
    big = write_npy(tmp_path / "big.npy", 200 * 2**20 // 784)
    small = write_npy(tmp_path / "small.npy", 20000)
    np.save(tmp_path / "test.npy", np.load(small, mmap_mode="r")[:500])
    fixed = anon_growth(small, tmp_path / "test.npy", tmp_path / "small-run")
    growth = anon_growth(big, tmp_path / "test.npy", tmp_path / "big-run")
    size = big.stat().st_size
    print(f"RssAnon growth {growth / 2**20:.0f} MiB on {size / 2**20:.0f} MiB, "
          f"{fixed / 2**20:.0f} MiB on 20000 rows")  # fmt: skip
    assert growth - fixed < 0.25 * size, f"{growth / 2**20:.0f} vs {fixed / 2**20:.0f} MiB"


def test_num_workers_is_for_a_dataset_given_as_a_path(tmp_path, capsys):
    code, _, err = call(train_script, "--num-workers", "2", "--out-dir", str(tmp_path / "r"),
                        capsys=capsys)  # fmt: skip
    assert code == 2 and "--num-workers is for a --dataset given as a path" in err
    assert not (tmp_path / "r").exists()


def test_a_pickled_dataset_maps_the_file_again(tmp_path):
    """A worker started by spawn gets the dataset pickled: it carries the file's name and the
    rows, and maps the file again, instead of a copy of the whole array."""
    np.save(tmp_path / "d.npy", pixels(6000))
    data = pv.load_dataset(str(tmp_path / "d.npy"), seed=3, stream=True)
    assert isinstance(data.x_train, pv.ArrayDataset)
    blob = pickle.dumps(data.x_train)
    assert len(blob) < data.x_train.array.nbytes / 4  # the rows' indices, not the pixels
    again = pickle.loads(blob)
    assert isinstance(again.array, np.memmap)
    assert torch.equal(again.read(), data.x_train.read())


def test_a_pickled_view_of_a_map_keeps_its_own_rows(tmp_path):
    """A view of a map (rows or columns cut from it) pickles as its values: mapped again from
    its filename and offset, which are its parent's, it would read the parent's first rows."""
    np.save(tmp_path / "d.npy", pixels(100))
    mapped = np.load(tmp_path / "d.npy", mmap_mode="r")
    for view in (mapped[50:], mapped[:, :2]):
        data = pv.ArrayDataset(view)
        again = pickle.loads(pickle.dumps(data))
        assert torch.equal(again.read(), data.read())


def test_a_streamed_file_is_scanned_twice_before_training(tmp_path, capsys, monkeypatch):
    """Each scan of a file larger than memory reads all of it from disk: whether its rows
    are binary is found once (the runner's checks, the evaluation sets and the job's
    binarization share it), and the values' support is checked once."""
    np.save(tmp_path / "d.npy", np.where(pixels() > 127, 255, 0).astype(np.uint8))
    scans = []
    real = pv.ArrayDataset.chunks

    def chunks(self):
        scans.append(len(self))
        return real(self)

    monkeypatch.setattr(pv.ArrayDataset, "chunks", chunks)
    code, _, err = call(train_script, *TINY, "--dataset", str(tmp_path / "d.npy"),
                        "--out-dir", str(tmp_path / "run"), "--num-epochs", "1",
                        capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert len(scans) == 2, scans
