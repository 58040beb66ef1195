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


def plot_weight_spread(
    inputs: Tensor, mean: Tensor, std: Tensor, image_shape: Sequence[int], path: str | os.PathLike
) -> None:
    """Inputs, the average reconstruction over weight draws, and its pixel-wise standard
    deviation (on its own colour scale, printed in the title)."""
    n = min(len(inputs), 10)
    fig, axes = plt.subplots(3, 1, figsize=(n * 0.9, 3.6))
    rows = [
        (inputs[:n], "input", 1.0),
        (mean[:n], "mean reconstruction", 1.0),
        (std[:n], "std over weights", float(std[:n].max()) or 1.0),
    ]
    for ax, (images, label, top) in zip(axes, rows, strict=True):
        ax.imshow(_image_grid(images, image_shape, 1, n), cmap="gray", vmin=0, vmax=top)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
    axes[0].set_title(
        "Reconstructions (z = μ(x)) over draws of the decoder's weights; "
        f"std scale 0 to {rows[2][2]:.3g}"
    )
    _save(fig, path)


def plot_point_cloud(
    z: Tensor, loc: Tensor, scale: Tensor, dims: tuple[int, int], path: str | os.PathLike
) -> None:
    """Draws z = μ + σ·ε for one x in two latent dimensions, with μ and the 1σ and 2σ boxes."""
    i, j = dims
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(
        z[:, i].cpu().numpy(), z[:, j].cpu().numpy(), s=3, alpha=0.3, label="z = μ(x) + σ(x)·ε"
    )
    ax.plot(float(loc[i]), float(loc[j]), "r+", markersize=14, mew=2, label="μ(x)")
    for k in (1, 2):
        ax.add_patch(
            plt.Rectangle(
                (float(loc[i] - k * scale[i]), float(loc[j] - k * scale[j])),
                float(2 * k * scale[i]),
                float(2 * k * scale[j]),
                fill=False,
                ec="r",
                ls="--" if k == 2 else "-",
                label=f"μ ± {k}σ",
            )
        )
    ax.set_xlabel(f"z[{i}]")
    ax.set_ylabel(f"z[{j}]")
    ax.set_title("The reparameterization cloud of one test input")
    ax.legend(loc="best", fontsize=8)
    ax.set_aspect("equal", adjustable="datalim")
    _save(fig, path)


def plot_aggregate_posterior(
    z: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    dims: tuple[int, int],
    path: str | os.PathLike,
) -> None:
    """One z ~ q(z | x) per test input (the aggregate posterior), coloured by label, over the
    contours of the N(0, I) prior in the same two dimensions."""
    i, j = dims
    fig, ax = plt.subplots(figsize=(6, 5.5))
    grid = torch.linspace(-3.5, 3.5, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    density = torch.exp(-(gx**2 + gy**2) / 2) / (2 * torch.pi)
    ax.contour(
        gx.numpy(), gy.numpy(), density.numpy(), levels=6, colors="k", linewidths=0.6, alpha=0.6
    )
    colours = plt.get_cmap("tab10")
    for k, name in enumerate(class_names):
        mask = (labels == k).cpu()
        ax.scatter(
            z[mask, i].cpu().numpy(),
            z[mask, j].cpu().numpy(),
            s=5,
            alpha=0.7,
            color=colours(k % 10),
            label=name,
        )
    ax.set_xlabel(f"z[{i}]")
    ax.set_ylabel(f"z[{j}]")
    ax.set_title("Aggregate posterior q(z) (one draw per test input) over N(0, I) contours")
    ax.legend(markerscale=3, fontsize=7, title="label", loc="upper right")
    _save(fig, path)


def plot_traversal(
    images: Tensor,
    dims: Sequence[int],
    values: Tensor,
    image_shape: Sequence[int],
    path: str | os.PathLike,
) -> None:
    """Rows: one latent dimension each, varied over ``values`` with the others at 0."""
    rows, cols = len(dims), len(values)
    fig, ax = plt.subplots(figsize=(cols * 0.8, rows * 0.9))
    ax.imshow(_image_grid(images, image_shape, rows, cols), cmap="gray", vmin=0, vmax=1)
    h = image_shape[0]
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(rows)])
    ax.set_yticklabels([f"z[{d}]" for d in dims])
    ax.set_xticks([c * (image_shape[1] + 1) + (image_shape[1] - 1) / 2 for c in range(cols)])
    ax.set_xticklabels([f"{float(v):+.1f}" for v in values], fontsize=7)
    ax.set_title("Latent traversal: one dimension varied, the others at the prior mean 0")
    _save(fig, path)


def plot_kl_per_dimension(
    kl: Tensor, variance: Tensor, threshold: float, path: str | os.PathLike
) -> None:
    """KL per latent dimension and Cov_x(E_q[z_i]), with the active-unit threshold."""
    dims = range(len(kl))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(dims, kl.cpu().numpy())
    left.set_title("average KL(q(z_i|x) ‖ p(z_i)) per dimension")
    left.set_xlabel("latent dimension i")
    left.set_ylabel("nats")
    right.bar(dims, variance.cpu().numpy(), color="tab:orange")
    right.axhline(threshold, color="k", ls="--", lw=1, label=f"active above {threshold}")
    right.set_yscale("log")
    right.set_title("Cov_x(E_q[z_i | x])")
    right.set_xlabel("latent dimension i")
    right.legend(fontsize=8)
    _save(fig, path)
