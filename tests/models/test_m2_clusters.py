"""M2 at its defaults on a problem with a known answer: three well-separated clusters of binary
vectors, one label per class (issue 22). The Bayes classifier is right on nearly every row, and
a classifier trained on the three labelled rows alone reaches it, so M2 must too: its epoch
kept by validation accuracy scores ≥ 0.95 on the test rows and is not below that baseline
beyond two standard errors of the paired difference; and its last epoch stays within a stated
margin of the kept one (at the paper's α it fell below chance: docs/design.md, "M2")."""

import copy
import math

import pyro
import pytest
import torch

import pyro_vae as pv
from pyro_vae.models.labels import hide_labels, labelled_subset
from pyro_vae.models.m2 import M2, SupervisedClassifier

NUM_CLASSES, BITS, FLIP = 3, 24, 0.1
EPOCHS, BATCH = 40, 60
# How far below the kept epoch's test accuracy the last epoch's may be. Measured over the
# three seeds below: the last epoch 0.002 above, 0.012 above and 0.002 below the kept one; on
# other seeds of the same problem up to 0.074 below (a dip after the classes form, recovered
# from by epoch 40 on most), hence the margin.
LAST_EPOCH_MARGIN = 0.08


def clusters(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As many rows of each class; class k sets its own block of 8 of the 24 bits and clears
    the others, then 10% of all bits are flipped. Blocks 16 bits apart, against 2.4 flips a
    row on average."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(num) % NUM_CLASSES)[torch.randperm(num, generator=generator)]
    blocks = torch.arange(BITS) // (BITS // NUM_CLASSES)
    x = (blocks == labels[:, None]).to(torch.get_default_dtype())
    flips = torch.rand(num, BITS, generator=generator) < FLIP
    return torch.where(flips, 1 - x, x), labels


def best_by_validation(model, x_val, y_val, x_test, y_test):
    """A fit callback keeping, of the epoch best on validation (the first on ties), which test
    rows the model gets right; and the last epoch's test accuracy."""
    kept = {"val": -1.0, "right": None, "last": 0.0}

    def callback(epoch, history):
        val = model.accuracy(x_val, y_val)
        right = (model.classify(x_test) == y_test).double()
        if val > kept["val"]:
            kept.update(val=val, right=right)
        kept["last"] = float(right.mean())

    return kept, callback


def train_both(seed: int):
    x, labels = clusters(600, seed)
    x_test, y_test = clusters(600, seed + 100)
    x_val, y_val = clusters(300, seed + 200)
    keep = labelled_subset(labels, NUM_CLASSES, seed=seed)  # one label per class
    pyro.set_rng_seed(seed)
    m2 = M2.from_data(x, hide_labels(labels, keep), 2, hidden_dims=(32,))  # α, batches: defaults
    baseline = SupervisedClassifier(copy.deepcopy(m2.classifier), NUM_CLASSES)
    m2_kept, m2_callback = best_by_validation(m2, x_val, y_val, x_test, y_test)
    generator = torch.Generator().manual_seed(seed)
    history = pv.fit(
        m2,
        (x, hide_labels(labels, keep)),
        loss=m2.loss(),
        num_epochs=EPOCHS,
        batch_size=BATCH,
        callback=m2_callback,
        generator=generator,
        progress=False,
    )
    # The baseline takes as many steps (of its three rows), scored as often.
    steps_per_epoch = len(history.step_loss) // EPOCHS
    base_kept, base_callback = best_by_validation(baseline, x_val, y_val, x_test, y_test)
    pv.fit(
        baseline,
        (x[keep], labels[keep]),
        num_epochs=EPOCHS * steps_per_epoch,
        batch_size=NUM_CLASSES,
        callback=lambda e, h: base_callback(e, h) if e % steps_per_epoch == 0 else None,
        generator=generator,
        progress=False,
    )
    return m2_kept, base_kept


@pytest.mark.slow
def test_m2_at_its_defaults_learns_clusters_from_one_label_each():
    m2_right, base_right, kept, last = [], [], [], []
    for seed in range(3):
        m2_kept, base_kept = train_both(seed)
        m2_right.append(m2_kept["right"])
        base_right.append(base_kept["right"])
        kept.append(float(m2_kept["right"].mean()))
        last.append(m2_kept["last"])
    assert min(kept) >= 0.95, kept
    # Paired over the 3 × 600 test rows: M2 must not fall below the baseline by more than two
    # standard errors of the mean difference of (right or not) per row.
    difference = torch.cat(m2_right) - torch.cat(base_right)
    standard_error = float(difference.std()) / math.sqrt(len(difference))
    baseline = [float(r.mean()) for r in base_right]
    assert float(difference.mean()) >= -2 * standard_error, (kept, baseline)
    for at_kept, at_last in zip(kept, last, strict=True):
        assert at_last >= at_kept - LAST_EPOCH_MARGIN, (kept, last)
