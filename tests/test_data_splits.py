"""The digits split: train and test are a partition of scikit-learn's 1797 digits."""

from collections import Counter

import torch
from sklearn.datasets import load_digits

import pyro_vae as pv


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
