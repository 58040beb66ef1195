"""M2 (Kingma et al. 2014) trained by fit: TraceEnum_ELBO's loss is the hand-written
enumeration sum exactly; the classifier learns; bad labels are refused before any step; the
labelled subset is balanced, seeded and deterministic; the weights round-trip."""

import copy
import math

import pyro
import pytest
import torch
from conftest import binary_data
from torch.nn import functional as F

import pyro_vae as pv
from pyro_vae.models.labels import (
    UNLABELLED,
    default_alpha,
    hide_labels,
    labelled_subset,
    paper_alpha,
)
from pyro_vae.models.m2 import M2, SupervisedClassifier

K, D, LATENT = 3, 5, 2


def tiny_m2(alpha: float = 0.7, num_labelled: int | None = None) -> M2:
    return M2(D, K, LATENT, alpha=alpha, num_labelled=num_labelled, hidden_dims=(4,))


def log_normal(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(
        -1
    )


def log_bernoulli(x, logits):
    return (x * logits - F.softplus(logits)).sum(-1)


def hand_written_loss(m2: M2, x, y, num_data: int, eps_unlabelled, eps_labelled):
    """−(N_u/B_u) Σ_unlabelled [Σ_y q(y|x) ELBO(x, y) + H(q(y|x))]
    − (N_l/B_l) Σ_labelled [ELBO(x, y) + α log q(y|x)], N_l = m2.num_labelled of the N rows,
    B_l and B_u the batch's counts. ELBO(x, y) = log p(y) + log p(z) + log p(x|y,z)
    − log q(z|x,y) at z = μ + σ·ε, with the ε the guide drew."""

    def elbo_given(x_row, label, eps):
        one_hot = F.one_hot(torch.tensor(label), K).to(x.dtype)
        out = m2.encoder.net(torch.cat([x_row, one_hot]))
        loc, scale = out[:LATENT], F.softplus(out[LATENT:]) + m2.encoder.min_scale
        z = loc + scale * eps
        logits = m2.decoder(torch.cat([z, one_hot]))
        zero, one = torch.zeros(LATENT), torch.ones(LATENT)
        return (
            math.log(1 / K)
            + log_normal(z, zero, one)
            + log_bernoulli(x_row, logits)
            - log_normal(z, loc, scale)
        )

    total_u = total_l = 0.0
    unlabelled = (y == UNLABELLED).nonzero().squeeze(1).tolist()
    labelled = (y != UNLABELLED).nonzero().squeeze(1).tolist()
    for j, n in enumerate(unlabelled):
        q = torch.softmax(m2.classifier(x[n]), -1)
        total_u += sum(q[k] * elbo_given(x[n], k, eps_unlabelled[k, j]) for k in range(K))
        total_u += -(q * q.log()).sum()
    for j, n in enumerate(labelled):
        log_q = torch.log_softmax(m2.classifier(x[n]), -1)
        total_l += elbo_given(x[n], int(y[n]), eps_labelled[j]) + m2.alpha * log_q[y[n]]
    num_labelled = m2.num_labelled
    scale_u = (num_data - num_labelled) / max(len(unlabelled), 1)
    scale_l = num_labelled / max(len(labelled), 1)
    return -(scale_u * total_u + scale_l * total_l)


@pytest.mark.parametrize(
    "labels",
    [[0, -1, 2, -1, -1, 1], [-1, -1, -1, -1, -1, -1], [2, 0, 1, 1, 0, 2]],
    ids=["mixed", "all-unlabelled", "all-labelled"],
)
def test_trace_enum_loss_is_the_enumeration_sum_written_by_hand(labels):
    m2 = tiny_m2(num_labelled=4)
    x, y = binary_data(6, D, p=0.5), torch.tensor(labels)
    num_data = 15
    n_u = int((y == UNLABELLED).sum())
    with torch.no_grad():
        pyro.set_rng_seed(3)
        loss = m2.loss().loss(m2.model, m2.guide, x, y, num_data=num_data)
        # The guide's only draws: ε for q(z|x,y) of each (class, unlabelled row), then of each
        # labelled row, in that order.
        pyro.set_rng_seed(3)
        eps_unlabelled = torch.empty(K, n_u, LATENT).normal_()
        eps_labelled = torch.empty(len(y) - n_u, LATENT).normal_()
        expected = hand_written_loss(m2, x, y, num_data, eps_unlabelled, eps_labelled)
    assert loss == pytest.approx(float(expected), rel=1e-12, abs=1e-12)


def test_the_unlabelled_classes_are_enumerated_not_sampled():
    # The guide trace TraceEnum_ELBO scores holds every class at the unlabelled rows' y site,
    # in parallel along a dimension of its own left of the batch's.
    m2 = tiny_m2()
    x, y = binary_data(6, D, p=0.5), torch.tensor([0, -1, -1, 2, -1, -1])
    model_trace, guide_trace = next(iter(m2.loss()._get_traces(m2.model, m2.guide, (x, y), {})))
    site = guide_trace.nodes["y_unlabelled"]
    assert site["infer"]["enumerate"] == "parallel"
    assert tuple(site["value"].shape) == (K, 1)
    assert site["value"].reshape(-1).tolist() == list(range(K))
    assert tuple(model_trace.nodes["x_unlabelled"]["log_prob"].shape) == (K, 4)
    assert tuple(model_trace.nodes["x_labelled"]["log_prob"].shape) == (2,)  # no enumeration


def easy_problem(num: int, generator: torch.Generator):
    """Three classes of 12 binary pixels: class k lights its own block of four pixels with
    probability 0.9 and the rest with 0.1. The Bayes classifier's error is below 1e-3 (the
    majority vote inside each block errs only when two blocks tie or swap), so a classifier
    that learned the classes scores near 1, and one that learned nothing 1/3."""
    labels = torch.randint(0, 3, (num,), generator=generator)
    blocks = torch.arange(12) // 4
    probs = torch.where(blocks == labels[:, None], 0.9, 0.1)
    return torch.bernoulli(probs, generator=generator), labels


@pytest.mark.slow
def test_the_classifier_learns_an_easy_problem_from_few_labels():
    generator = torch.Generator().manual_seed(0)
    x, labels = easy_problem(600, generator)
    x_test, labels_test = easy_problem(1000, generator)
    keep = labelled_subset(labels, 6, seed=0)  # two labels per class
    y = hide_labels(labels, keep)
    m2 = M2.from_data(x, y, 2, hidden_dims=(16,))
    assert m2.num_labels == 3 and m2.alpha == pytest.approx(600 / 6)
    pv.fit(
        m2,
        (x, y),
        loss=m2.loss(),
        num_epochs=15,
        batch_size=50,
        learning_rate=1e-2,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    # Chance is 1/3 (± 0.015, one standard error on 1000 points); the threshold 0.9 is far
    # above it and, at the Bayes accuracy > 0.999, below what a trained classifier reaches.
    accuracy = m2.accuracy(x_test, labels_test)
    assert accuracy > 0.9


@pytest.mark.parametrize(
    ("index", "value"), [(7, 3), (5, -2), (9, 100)], ids=["class K", "below -1", "far above"]
)
def test_labels_out_of_range_are_refused_before_any_step(index, value):
    m2 = tiny_m2()
    x, y = binary_data(10, D), torch.full((10,), UNLABELLED)
    y[0] = 1
    y[index] = value
    before = copy.deepcopy(m2.state_dict())
    with pytest.raises(ValueError, match=rf"labels\[{index}\] = {value} is not a class"):
        # batch 2: the bad label is not in the first batch, so only a check of all the data
        # before training can catch it there.
        pv.fit(m2, (x, y), loss=m2.loss(), num_epochs=1, batch_size=2, progress=False)
    for name, tensor in m2.state_dict().items():
        assert torch.equal(before[name], tensor), name


def test_labels_that_are_not_class_indices_are_refused():
    m2 = tiny_m2()
    x = binary_data(4, D)
    with pytest.raises(ValueError, match="integer tensor"):
        pv.fit(
            m2,
            (x, torch.tensor([0.0, 1.5, 2.0, -1.0])),
            loss=m2.loss(),
            num_epochs=1,
            batch_size=2,
            progress=False,
        )
    with pytest.raises(ValueError, match="labels has 3 rows, the data 4"):
        m2.validate_inputs(x, torch.tensor([0, 1, 2]))


def test_labelled_subset_is_balanced_seeded_and_deterministic():
    labels = torch.arange(10).repeat_interleave(torch.arange(20, 30))  # classes of 20..29 rows
    labels = labels[torch.randperm(len(labels))]
    chosen = labelled_subset(labels, 100, seed=4)
    assert torch.equal(chosen, labelled_subset(labels, 100, seed=4))
    assert not torch.equal(chosen, labelled_subset(labels, 100, seed=5))
    assert len(chosen.unique()) == 100 and torch.equal(chosen, chosen.sort().values)
    assert torch.bincount(labels[chosen], minlength=10).tolist() == [10] * 10
    # 23 among 10 classes: 2 each, and 3 classes (chosen by the seed) get one more.
    counts = torch.bincount(labels[labelled_subset(labels, 23, seed=1)], minlength=10)
    assert sorted(counts.tolist()) == [2] * 7 + [3] * 3
    with pytest.raises(ValueError, match="class 0 has 20 rows, fewer than its share of 23"):
        labelled_subset(labels, 230, seed=0)
    with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
        labelled_subset(torch.tensor([0, -1, 1]), 2, seed=0)


def test_hide_labels_keeps_only_the_chosen_rows():
    labels = torch.tensor([2, 0, 1, 1, 0, 2])
    assert hide_labels(labels, torch.tensor([1, 4])).tolist() == [-1, 0, -1, -1, 0, -1]


def test_paper_alpha_and_the_default():
    assert paper_alpha(60000, 100) == pytest.approx(60.0)
    assert paper_alpha(60000, 3000) == pytest.approx(2.0)
    assert default_alpha(60000, 100) == pytest.approx(600.0)
    assert default_alpha(60000, 3000) == pytest.approx(20.0)


def test_state_dict_round_trips_and_copies_train_on_their_own():
    generator = torch.Generator().manual_seed(1)
    x, labels = easy_problem(40, generator)
    y = hide_labels(labels, labelled_subset(labels, 6, seed=0))
    trained = M2.from_data(x, y, 2, hidden_dims=(8,))
    pv.fit(trained, (x, y), loss=trained.loss(), num_epochs=2, batch_size=10, progress=False)
    rebuilt = M2.from_data(x, y, 2, hidden_dims=(8,))
    rebuilt.load_state_dict(trained.state_dict())
    for a, b in ((trained, rebuilt), (trained, copy.deepcopy(trained))):
        assert a._pyro_name != b._pyro_name
        assert torch.equal(a.classifier(x), b.classifier(x))
        pyro.set_rng_seed(0)
        loss_a = a.loss().loss(a.model, a.guide, x, y)
        pyro.set_rng_seed(0)
        assert loss_a == b.loss().loss(b.model, b.guide, x, y)


def test_convolutional_parts_read_images_and_train():
    x = binary_data(8, 36)
    y = torch.tensor([0, -1, 1, -1, 2, -1, -1, 0])
    m2 = M2(36, 3, 2, alpha=1.0, num_labelled=4, image_shape=(6, 6))
    assert isinstance(m2.classifier, pv.ConvNet) and isinstance(m2.decoder, pv.DeconvNet)
    assert m2.encoder.net.image_shape == (1 + 3, 6, 6)  # y as three constant planes
    before = copy.deepcopy(m2.state_dict())
    history = pv.fit(m2, (x, y), loss=m2.loss(), num_epochs=1, batch_size=4, progress=False)
    assert all(math.isfinite(v) for v in history.step_loss)
    moved = [n for n, t in m2.state_dict().items() if not torch.equal(before[n], t)]
    assert any(n.startswith("encoder.") for n in moved)
    assert any(n.startswith("classifier.") for n in moved)
    assert any(n.startswith("decoder.") for n in moved)


def test_the_supervised_baseline_trains_through_fit():
    generator = torch.Generator().manual_seed(2)
    x, labels = easy_problem(200, generator)
    x_test, labels_test = easy_problem(500, generator)
    baseline = SupervisedClassifier(pv.MLP(12, (16,), 3), 3)
    pv.fit(baseline, (x, labels), num_epochs=20, batch_size=50, learning_rate=1e-2, progress=False)
    assert baseline.accuracy(x_test, labels_test) > 0.9  # as for M2 above
    with pytest.raises(ValueError, match=r"labels\[1\] = -1 is not a class"):
        pv.fit(
            baseline, (x[:3], torch.tensor([0, -1, 1])), num_epochs=1, batch_size=3, progress=False
        )


def _fit_m2(weights=None, resume=None, seed=0):
    pyro.set_rng_seed(seed)
    x, labels = easy_problem(30, torch.Generator().manual_seed(3))
    y = hide_labels(labels, labelled_subset(labels, 6, seed=0))
    m2 = M2.from_data(x, y, 2, hidden_dims=(8,))
    if weights is not None:
        m2.load_state_dict(weights)
    saved = []

    def checkpoint(state):
        # What a script writes to disk: copies, taken at this instant.
        saved.append((copy.deepcopy(state.to_dict()), copy.deepcopy(m2.state_dict())))

    history = pv.fit(
        m2,
        (x, y),
        loss=m2.loss(),
        num_epochs=2,
        batch_size=8,  # 4 steps per epoch, the last of 6 rows
        checkpoint=checkpoint,
        checkpoint_every=3,
        resume=resume,
        generator=torch.Generator().manual_seed(seed + 1),
        progress=False,
    )
    return m2, history, saved


def test_resume_of_an_m2_fit_ends_exactly_like_an_uninterrupted_one():
    reference, reference_history, saved = _fit_m2()
    state, weights = saved[2]  # after global steps 3 and 4 (end of epoch 1), then step 6
    assert (state["epoch"], state["step"]) == (1, 2)
    # Another seed and fresh weights: everything that matters must come from the checkpoint.
    resumed, history, _ = _fit_m2(weights, pv.TrainingState.from_dict(state), seed=99)
    for (name, expected), actual in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name
    assert history.step_loss == reference_history.step_loss
