"""The label bookkeeping of semi-supervised training (:mod:`pyro_vae.models.m2`): which rows
keep their labels, the label of the others (:data:`UNLABELLED`), and Kingma et al.'s weight of
the classification term."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pyro_vae._checks import check_positive_int

UNLABELLED = -1
"""The label of a row whose class is unknown."""

# The fraction of the dataset size N that Kingma et al. use as α (section 3.1.2: "α = 0.1·N").
PAPER_ALPHA_FRACTION = 0.1


def paper_alpha(num_data: int, num_labelled: int) -> float:
    """Kingma et al.'s weight of the classification term, per labelled example.

    Their objective is J^α = J + α · E_labelled[−log q(y | x)] with α = 0.1 · N, J summed over
    the N examples and the expectation an average over the N_l labelled ones. Per labelled
    example that is 0.1 · N / N_l: 60 for 100 labels among 60000 images, 2 for 3000. (Pyro's
    ``ss_vae_M2`` uses a fixed 46 on MNIST, whatever the number of labels, 3000 by default; the
    paper's rule keeps the classification term's total weight, 0.1 · N, the same whatever
    N_l.) M2's default is ten times this, :func:`default_alpha`.
    """
    check_positive_int("num_data", num_data)
    check_positive_int("num_labelled", num_labelled)
    if num_labelled > num_data:
        raise ValueError(f"num_labelled={num_labelled} exceeds num_data={num_data}")
    return PAPER_ALPHA_FRACTION * num_data / num_labelled


LABELLED_SHARE = 0.1
"""The least share of a batch that M2's labelled rows take (:func:`labelled_per_batch`)."""


def default_alpha(num_data: int, num_labelled: int) -> float:
    """M2's default weight of the classification term, per labelled example: N / N_l, so
    that the labelled rows' α · log q(y | x) weighs as much, in all, as the N rows' bound
    (ten times the paper's :func:`paper_alpha`).

    Why: while the decoder does not yet use y, the unlabelled rows' bound is largest at
    q(y | x) uniform (its entropy term), and that pull, over N_u rows, must not outweigh the
    labels'. At the paper's 0.1 · N the labels lost: q(y | x) stayed near uniform for epochs
    and the classes then formed without them, some of them swapped (docs/design.md, "M2").
    Measured on digits with 100 labels (2 seeds, epoch kept on validation): α = N/N_l
    (12.9) reached 0.813 test accuracy against the baseline's 0.788; the paper's (1.3) 0.772;
    46 (Pyro's) 0.804; 130, 0.801 (benchmarks/README.md, "M2").
    """
    check_positive_int("num_data", num_data)
    check_positive_int("num_labelled", num_labelled)
    if num_labelled > num_data:
        raise ValueError(f"num_labelled={num_labelled} exceeds num_data={num_data}")
    return num_data / num_labelled


def labelled_per_batch(batch_size: int, num_labelled: int, num_unlabelled: int) -> int:
    """How many labelled rows each of M2's batches holds: their share of the data
    (``batch_size · N_l / N``), but at least :data:`LABELLED_SHARE` of the batch and at least
    one, and no more than there are. The scales make any count unbiased; more labelled rows
    per batch make the classification term's gradient steadier (docs/design.md, "M2")."""
    share = batch_size * num_labelled / (num_labelled + num_unlabelled)
    wanted = max(1, math.ceil(share), math.ceil(LABELLED_SHARE * batch_size))
    return min(wanted, num_labelled, batch_size - 1)


def labelled_subset(labels: Tensor, num_labelled: int, seed: int) -> Tensor:
    """A fixed, class-balanced choice of ``num_labelled`` rows to keep the labels of.

    Every class gets ``num_labelled // K`` rows; the ``num_labelled % K`` left over go one each
    to classes picked at random. The rows of each class are a random draw without replacement.
    All randomness comes from a ``torch.Generator`` seeded with ``seed``, so the same labels,
    count and seed give the same rows on any machine.

    :param labels: all the training labels, integers 0..K-1, ``(N,)``; K is the largest + 1.
    :returns: the chosen row indices, sorted, ``(num_labelled,)`` (``torch.long``).
    :raises ValueError: when a class has fewer rows than its share, naming the class.
    """
    labels = check_label_tensor(labels, "labels")
    check_positive_int("num_labelled", num_labelled)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if len(labels) and int(labels.min()) < 0:
        index = int((labels < 0).nonzero()[0])
        raise ValueError(
            f"labels must all be known (0..K-1) to choose a labelled subset; "
            f"labels[{index}] = {int(labels[index])}"
        )
    if num_labelled > len(labels):
        raise ValueError(f"num_labelled={num_labelled} exceeds the {len(labels)} rows")
    labels = labels.cpu()
    num_classes = int(labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    share = torch.full((num_classes,), num_labelled // num_classes)
    share[torch.randperm(num_classes, generator=generator)[: num_labelled % num_classes]] += 1
    chosen = []
    for label in range(num_classes):
        rows = (labels == label).nonzero().squeeze(1)
        if len(rows) < share[label]:
            raise ValueError(
                f"class {label} has {len(rows)} rows, fewer than its share of "
                f"{int(share[label])} in a balanced subset of {num_labelled}"
            )
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[: share[label]]])
    return torch.cat(chosen).sort().values


def hide_labels(labels: Tensor, keep: Tensor) -> Tensor:
    """A copy of ``labels`` with every row outside the indices ``keep`` set to
    :data:`UNLABELLED`: the label tensor M2 trains on."""
    labels = check_label_tensor(labels, "labels")
    hidden = torch.full_like(labels, UNLABELLED)
    hidden[keep] = labels[keep]
    return hidden


def check_label_tensor(labels: object, what: str = "labels") -> Tensor:
    """``labels`` must be an integer tensor ``(N,)`` (class indices); returned unchanged."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor (class indices), got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{what} must have shape (N,), got {tuple(labels.shape)}")
    return labels
