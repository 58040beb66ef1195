"""Figures of a trained VAE, drawn with matplotlib's file backend and written as PNG files."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display

import matplotlib.pyplot as plt
import torch
from torch import Tensor


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _image_grid(images: Tensor, image_shape: Sequence[int], rows: int, cols: int) -> Tensor:
    """Tile ``rows * cols`` flattened images into one 2-D array, with a 1-pixel gap."""
    h, w = image_shape
    grid = torch.ones(rows * (h + 1) - 1, cols * (w + 1) - 1)
    for index, image in enumerate(images[: rows * cols].detach().float().cpu()):
        r, c = divmod(index, cols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image.reshape(h, w)
    return grid


def plot_reconstructions(
    inputs: Tensor, reconstructions: Tensor, image_shape: Sequence[int], path: str | os.PathLike
) -> None:
    """Inputs in the top row of each pair, their reconstructions below."""
    n = min(len(inputs), 10)
    pairs = torch.stack([inputs[:n], reconstructions[:n]], dim=1).reshape(2 * n, -1)
    columns = torch.cat([pairs[0::2], pairs[1::2]])  # row 1 inputs, row 2 reconstructions
    fig, ax = plt.subplots(figsize=(n * 0.9, 2.2))
    ax.imshow(_image_grid(columns, image_shape, 2, n), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([(image_shape[0] - 1) / 2, image_shape[0] * 1.5])
    ax.set_yticklabels(["input", "reconstruction"])
    ax.set_xticks([])
    ax.set_title("Test inputs and their reconstructions (likelihood mean at z = μ(x))")
    _save(fig, path)


def plot_samples(samples: Tensor, image_shape: Sequence[int], path: str | os.PathLike) -> None:
    """A grid of decoded prior samples."""
    cols = 8
    rows = max(1, len(samples) // cols)
    fig, ax = plt.subplots(figsize=(cols, rows))
    ax.imshow(_image_grid(samples, image_shape, rows, cols), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title("Samples: z ~ p(z), decoded (likelihood mean)")
    _save(fig, path)


def plot_latent_space(
    loc: Tensor, labels: Tensor, class_names: Sequence[str], path: str | os.PathLike
) -> None:
    """μ(x) of the test set coloured by label; projected on its two principal axes when the
    latent space has more than two dimensions."""
    loc = loc.detach().double().cpu()
    if loc.shape[1] > 2:
        centred = loc - loc.mean(0)
        _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ directions[:2].T
        explained = (singular[:2] ** 2 / (singular**2).sum()).tolist()
        axis_names = [
            f"principal axis {i + 1} of μ ({100 * e:.0f}% of variance)"
            for i, e in enumerate(explained)
        ]
        title = f"Test-set μ(x) in {loc.shape[1]} dimensions, projected to 2-D (PCA)"
    else:
        points = torch.cat([loc, torch.zeros(len(loc), 2 - loc.shape[1])], dim=1)
        axis_names = ["μ₁(x)", "μ₂(x)" if loc.shape[1] == 2 else "(none)"]
        title = "Test-set μ(x)"
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    labels = labels.cpu()
    for k, name in enumerate(class_names):
        chosen = labels == k
        if chosen.any():
            ax.scatter(
                points[chosen, 0], points[chosen, 1], s=6, alpha=0.7, color=cmap(k % 10), label=name
            )
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=8, loc="best", title="label")
    _save(fig, path)


def plot_loss_curves(metrics: list[dict], path: str | os.PathLike) -> None:
    """Per-example −ELBO (train and test) and the KL term, per epoch."""
    epochs = [m["epoch"] for m in metrics]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, [m["train_loss"] for m in metrics], label="training objective (running)")
    left.plot(epochs, [-m["train_elbo"] for m in metrics], label="train −ELBO")
    left.plot(epochs, [-m["test_elbo"] for m in metrics], label="test −ELBO")
    left.set_xlabel("epoch")
    left.set_ylabel("nats per example")
    left.set_title("Loss")
    left.legend()
    right.plot(epochs, [-m["test_reconstruction"] for m in metrics], label="test −E_q[log p(x|z)]")
    right.plot(epochs, [m["test_kl"] for m in metrics], label="test KL(q(z|x) ‖ p(z))")
    right.set_xlabel("epoch")
    right.set_ylabel("nats per example")
    right.set_title("The two terms of the test ELBO")
    right.legend()
    _save(fig, path)
