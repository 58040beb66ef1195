"""fit's epoch orders: the default shuffle, and FewInEveryBatch, which puts rows of a small
subset (M2's labelled rows) in every batch. Its layout is exact; each of its slots is a uniform
draw, so that a model scaling each part by its count in the data over its count in the batch
estimates the full sum without bias; fit takes a module's own order."""

import math

import pytest
import torch

import pyro_vae as pv
from pyro_vae.infer.batches import FewInEveryBatch, Shuffled
from pyro_vae.models.labels import UNLABELLED, hide_labels, labelled_subset
from pyro_vae.models.m2 import M2

CPU = torch.device("cpu")


def test_every_batch_holds_its_share_of_the_few_and_every_other_row_once():
    few, other = torch.arange(10), torch.arange(10, 105)
    order = FewInEveryBatch(few, other, batch_size=16, per_batch=3)
    assert order.num_batches == math.ceil(95 / 13) and order.length == 95 + 3 * 8
    drawn = order.draw(torch.Generator().manual_seed(0), CPU)
    assert len(drawn) == order.length
    batches = drawn.split(16)  # as fit cuts an epoch
    assert len(batches) == order.num_batches
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 3 + 95 % 13
    for batch in batches:
        assert bool((batch[:3] < 10).all()) and bool((batch[3:] >= 10).all())
    others = torch.cat([b[3:] for b in batches])
    assert sorted(others.tolist()) == other.tolist()  # each once an epoch
    # The few are dealt in whole shuffles: 24 slots are two full passes and 4 more.
    counts = torch.bincount(torch.cat([b[:3] for b in batches]), minlength=10)
    assert set(counts.tolist()) <= {2, 3} and int(counts.sum()) == 24


def test_each_slot_is_a_uniform_draw_so_the_scaled_sums_are_unbiased():
    # Values v of 7 few and 40 other rows; per step, (N_f / B_f) Σ_few-in-batch v estimates
    # Σ_few v, and (N_o / B_o) Σ_other-in-batch v estimates Σ_other v. Averaged over 400
    # epochs' steps, each must land within 4 standard errors of the truth.
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(47, generator=generator).exp()
    few, other = torch.arange(7), torch.arange(7, 47)
    order = FewInEveryBatch(few, other, batch_size=8, per_batch=2)
    few_estimates, other_estimates = [], []
    for _ in range(400):
        for batch in order.draw(generator, CPU).split(8):
            f, o = batch[:2], batch[2:]
            few_estimates.append(7 / len(f) * values[f].sum())
            other_estimates.append(40 / len(o) * values[o].sum())
    for estimates, truth in (
        (torch.stack(few_estimates), values[few].sum()),
        (torch.stack(other_estimates), values[other].sum()),
    ):
        standard_error = estimates.std() / math.sqrt(len(estimates))
        assert abs(float(estimates.mean() - truth)) < 4 * float(standard_error)


@pytest.mark.parametrize(
    ("per_batch", "message"), [(0, "between 1 and"), (8, "between 1 and"), (5, "between 1 and")]
)
def test_impossible_counts_are_refused(per_batch, message):
    with pytest.raises(ValueError, match=message):
        FewInEveryBatch(torch.arange(4), torch.arange(4, 20), batch_size=8, per_batch=per_batch)


def test_the_default_order_is_a_shuffle_of_every_row():
    drawn = Shuffled(9).draw(torch.Generator().manual_seed(0), CPU)
    assert sorted(drawn.tolist()) == list(range(9))


class RecordingM2(M2):
    """M2 that notes how many labelled rows each training batch held."""

    def model(self, x, y, num_data=None):
        if num_data is not None:
            self.seen.append(int((y != UNLABELLED).sum()))
        return super().model(x, y, num_data)


def test_fit_trains_m2_with_labelled_rows_in_every_batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((200, 6), 0.5), generator=generator)
    labels = torch.randint(0, 2, (200,), generator=generator)
    y = hide_labels(labels, labelled_subset(labels, 4, seed=0))
    m2 = RecordingM2(6, 2, 2, alpha=1.0, num_labelled=4, hidden_dims=(4,))
    m2.seen = []
    pv.fit(m2, (x, y), loss=m2.loss(), num_epochs=1, batch_size=20, progress=False)
    # A shuffle would leave about two thirds of these batches without a labelled row.
    expected = m2.epoch_order(x, y, batch_size=20)
    del m2.seen[0]  # fit's first call finds the parameters on the first rows, before training
    assert len(m2.seen) == expected.num_batches == math.ceil(196 / (20 - expected.per_batch))
    assert m2.seen == [expected.per_batch] * expected.num_batches
