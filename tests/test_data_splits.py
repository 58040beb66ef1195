"""The digits split: train and test are a partition of scikit-learn's 1797 digits."""

from collections import Counter

import pytest
import torch
from sklearn.datasets import load_digits

import pyro_vae as pv
from pyro_vae.data import validation_indices


def labelled_rows(pixels: torch.Tensor, labels: torch.Tensor) -> Counter:
    """Each example as (16 pixel levels 0..16 ..., label), counted."""
    levels = (pixels * 16).round().long().tolist()
    return Counter((*row, label) for row, label in zip(levels, labels.tolist(), strict=True))


def test_digits_train_and_test_are_disjoint_and_together_the_whole_dataset():
    data = pv.load_dataset("digits")
    train = labelled_rows(data.x_train, data.y_train)
    test = labelled_rows(data.x_test, data.y_test)
    full = load_digits()
    everything = labelled_rows(torch.as_tensor(full.data) / 16, torch.as_tensor(full.target))
    assert len(everything) == 1797  # every digit in the dataset is distinct
    assert not train & test, "test examples that are also training examples"
    assert train + test == everything


def test_digits_test_split_is_stratified():
    data = pv.load_dataset("digits")
    per_class = torch.bincount(torch.cat([data.y_train, data.y_test]), minlength=10)
    expected = per_class * 360 / 1797
    # Stratified: each class's share of the test set is its share of the data, to one example.
    assert ((torch.bincount(data.y_test, minlength=10) - expected).abs() < 1).all()


def test_holding_out_validation_rows_partitions_the_training_set():
    """hold_out moves exactly the given rows, with their labels, from training to validation:
    together the two are the training set again, and no row is in both."""
    data = pv.load_dataset("digits")
    held = validation_indices(len(data.x_train), 144, seed=5)
    split = data.hold_out(held)
    assert (len(split.x_train), split.num_val) == (1437 - 144, 144) and data.num_val == 0
    assert torch.equal(split.x_val, data.x_train[held]) and torch.equal(
        split.y_val, data.y_train[held]
    )
    keep = torch.ones(1437, dtype=torch.bool)
    keep[held] = False
    assert torch.equal(split.x_train, data.x_train[keep]) and torch.equal(
        split.y_train, data.y_train[keep]
    )
    assert torch.equal(split.x_test, data.x_test)
    # Seeded: the same rows for the same seed, others for another; none twice.
    assert torch.equal(held, validation_indices(1437, 144, seed=5))
    assert not torch.equal(held, validation_indices(1437, 144, seed=6))
    assert len(held.unique()) == 144
    assert data.hold_out(held[:0]) is data  # no validation set
    with pytest.raises(ValueError, match="leaves no training rows"):
        validation_indices(1437, 1437, seed=0)
