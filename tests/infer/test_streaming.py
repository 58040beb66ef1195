"""fit on a map-style Dataset, streamed batch by batch through a DataLoader
(pyro_vae.infer.batches): the very numbers of the in-memory path for the same seed and order,
with or without worker processes; an exact resume in the middle of an epoch; and a memory-
mapped .npy (pv.ArrayDataset) that is never read whole."""

import copy

import numpy as np
import pyro
import pytest
import torch
from torch.utils.data import Dataset

import pyro_vae as pv

ROWS, DIM = 50, 10


class Rows(Dataset):
    """Plain items, one row at a time (no __getitems__), and a count of the rows read."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.reads = x, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        return self.x[i], 0  # a (tensor, label) pair, as torchvision's datasets give


def grayscale(rows: int = ROWS) -> torch.Tensor:
    """Grayscale rows in [0, 1]: binarized afresh for every batch (Bernoulli likelihood)."""
    return torch.rand(rows, DIM, generator=torch.Generator().manual_seed(5))


def train(data, weights=None, resume=None, seed=0, saved=None, **options):
    """Three epochs of a small VAE; with ``saved``, a checkpoint every 3 steps appended there
    as (training state, weights), copies taken at that instant as the script writes them."""
    pyro.set_rng_seed(seed)
    vae = pv.VAE(DIM, 2, hidden_dims=(8,))
    if weights is not None:
        vae.load_state_dict(weights)

    def checkpoint(state):
        assert saved is not None
        saved.append((copy.deepcopy(state.to_dict()), copy.deepcopy(vae.state_dict())))

    history = pv.fit(
        vae,
        data,
        num_epochs=3,
        batch_size=8,  # 7 steps per epoch, the last one short
        kl_warmup_epochs=2,
        checkpoint=None if saved is None else checkpoint,
        checkpoint_every=None if saved is None else 3,
        resume=resume,
        generator=torch.Generator().manual_seed(seed + 1),
        progress=False,
        **options,
    )
    return vae, history


def assert_same(a, b) -> None:
    (vae_a, history_a), (vae_b, history_b) = a, b
    for (name, expected), actual in zip(
        vae_a.state_dict().items(), vae_b.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name
    assert history_a.step_loss == history_b.step_loss and history_a.loss == history_b.loss
    assert history_a.binarized and history_b.binarized


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_streamed_dataset_trains_to_the_in_memory_numbers(num_workers):
    x = grayscale()
    dataset = Rows(x)
    assert_same(train(x), train(dataset, num_workers=num_workers))
    if num_workers == 0:
        # Every row read once an epoch, and the first batch once more before the first step
        # (parameters, checks): streamed, never gathered whole.
        assert dataset.reads == 3 * ROWS + 8


def test_a_streamed_run_resumed_mid_epoch_ends_as_an_uninterrupted_one():
    x = grayscale()
    saved: list = []
    reference = train(Rows(x), saved=saved)
    state, weights = saved[3]  # global steps 3 and 6, the end of epoch 1, then epoch 2 step 2
    assert (state["epoch"], state["step"]) == (1, 2)
    # Another seed and a fresh model: everything that matters comes from the checkpoint.
    resumed = train(Rows(x), weights=weights, resume=pv.TrainingState.from_dict(state), seed=99)
    assert_same(reference, resumed)


def test_a_memory_mapped_npy_streams_to_the_in_memory_numbers(tmp_path):
    x = grayscale()
    np.save(tmp_path / "rows.npy", x.numpy())
    dataset = pv.ArrayDataset(tmp_path / "rows.npy")
    assert isinstance(dataset.array, np.memmap)  # mapped, not read
    assert_same(train(x), train(dataset))


def test_an_8_bit_npy_is_scaled_to_the_unit_interval(tmp_path):
    pixels = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    np.save(tmp_path / "pixels.npy", pixels)
    dataset = pv.ArrayDataset(tmp_path / "pixels.npy")
    rows = dataset.__getitems__([3, 0])
    assert rows.dtype == torch.float32 and rows.shape == (2, 16)
    assert torch.allclose(rows, torch.from_numpy(pixels[[3, 0]]).float() / 255)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(5), "needs an array"),
        (np.array(["a", "b"]).reshape(2, 1), "holds <U1 values"),
        (np.zeros((0, 3)), "needs an array"),
    ],
)
def test_an_npy_that_holds_no_examples_is_refused_naming_the_file(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=message) as caught:
        pv.ArrayDataset(tmp_path / "bad.npy")
    assert "bad.npy" in str(caught.value)


def test_a_streamed_batch_outside_the_support_stops_with_the_model_s_message():
    """Each streamed batch is checked as it arrives (the data are not scanned up front): a
    value outside [0, 1] in a later batch is refused naming it, not trained on."""
    x = grayscale(40)
    x[35, 2] = 7.0
    with pytest.raises(ValueError, match="training data"):
        train(Rows(x))
