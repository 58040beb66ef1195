"""The package's figures, written as PNG files: a trained VAE's, M2's and the conditional VAE's
(the explain report's own are in :mod:`pyro_vae.explain_plots`, drawn the same way).

The figures are drawn on :class:`matplotlib.figure.Figure` objects, never through pyplot.
pyplot holds process-wide state: a backend, which a library must not choose for its user (doing
so at import switched a user's ``matplotlib.use("svg")`` to Agg), and a registry of open figures.
A bare Figure needs neither: ``savefig`` picks the canvas for the file's format itself (Agg for
PNG), so a figure is saved on a machine without a display whatever backend the user chose, and
that choice is left exactly as it was. matplotlib is imported inside the functions that draw,
so ``import pyro_vae`` does not load it.

Latent dimensions are numbered from 1 (z_1, z_2, ...) as in the explain report; the functions'
``dims`` arguments are tensor indices, from 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pyro_vae._files import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from pyro_vae.models.cvae_estimators import Completions


def new_figure(**kwargs: Any) -> Figure:
    """A bare matplotlib ``Figure`` (no pyplot: see the module's docstring); keywords go to
    it."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` to ``path`` in the format its suffix names (PNG without one), atomically:
    an interrupted run leaves the old file or none, never a truncated image."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_write(path, "wb") as file:
        fig.savefig(file, format=fmt, dpi=100, bbox_inches="tight")


def _name(index: int) -> str:
    """A latent dimension's name for people: tensor index 0 is z_1."""
    return f"z_{index + 1}"


def _input_label(inputs: Tensor) -> str:
    # Binary inputs shown without a word look like a bad scan next to grey reconstructions.
    binary = bool(((inputs == 0) | (inputs == 1)).all())
    return "input (binary)" if binary else "input"


def image_grid(images: Tensor, image_shape: Sequence[int], rows: int, cols: int) -> Any:
    """Tile ``rows * cols`` flattened images into one numpy array, with a 1-pixel gap: 2-D for
    ``image_shape`` (height, width) or one channel, (height, width, 3) for colour images of
    shape (3, height, width), which ``imshow`` draws in colour (values clipped to [0, 1]).
    numpy, not a tensor: matplotlib's ``np.array(x, copy=False)`` on a tensor is deprecated."""
    *channels, h, w = image_shape
    c = channels[0] if channels else 1
    grid = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1)
    for index, image in enumerate(images[: rows * cols].detach().float().cpu()):
        r, k = divmod(index, cols)
        at = (slice(None), slice(r * (h + 1), r * (h + 1) + h), slice(k * (w + 1), k * (w + 1) + w))
        grid[at] = image.reshape(c, h, w)
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).clamp(0, 1).numpy()


def _numpy(values: Tensor) -> Any:
    return values.detach().cpu().numpy()


def integer_ticks(ax: Axes) -> None:
    """Ticks at whole numbers only on ``ax``'s x axis (epochs: a tick at 1.5 names none)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_reconstructions(
    inputs: Tensor,
    reconstructions: Tensor,
    image_shape: Sequence[int],
    path: str | os.PathLike,
    input_label: str | None = None,
) -> Figure:
    """Inputs in the top row, their reconstructions below; return the figure.

    ``input_label`` names the top row; by default "input (binary)" when every value is 0 or 1
    (a binarized test set), else "input". Pass "input (binarized)" when you binarized it."""
    n = min(len(inputs), 10)
    rows = torch.cat([inputs[:n], reconstructions[:n]])
    fig = new_figure(figsize=(n * 0.9, 2.2))
    ax = fig.subplots()
    ax.imshow(image_grid(rows, image_shape, 2, n), cmap="gray", vmin=0, vmax=1)
    h = image_shape[-2]
    ax.set_yticks([(h - 1) / 2, (h + 1) + (h - 1) / 2])
    ax.set_yticklabels([input_label or _input_label(inputs[:n]), "reconstruction\n(mean)"])
    ax.set_xticks([])
    ax.set_title("Test inputs and their reconstructions (likelihood mean at z = μ(x))")
    save_figure(fig, path)
    return fig


def plot_samples(samples: Tensor, image_shape: Sequence[int], path: str | os.PathLike) -> Figure:
    """A grid of decoded prior samples, 8 to a row (every sample shown); return the figure."""
    cols = min(8, max(1, len(samples)))
    rows = max(1, math.ceil(len(samples) / cols))
    fig = new_figure(figsize=(cols, rows))
    ax = fig.subplots()
    ax.imshow(image_grid(samples, image_shape, rows, cols), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title("Samples: z ~ p(z), decoded (likelihood mean)")
    save_figure(fig, path)
    return fig


def plot_latent_space(
    loc: Tensor, labels: Tensor, class_names: Sequence[str], path: str | os.PathLike
) -> Figure:
    """μ(x) of the test set coloured by label; projected on its two principal axes when the
    latent space has more than two dimensions. Return the figure."""
    from matplotlib import colormaps

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
        axis_names = ["μ_1(x)", "μ_2(x)" if loc.shape[1] == 2 else "(none)"]
        title = "Test-set μ(x)"
    fig = new_figure(figsize=(7, 6))
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    labels = labels.cpu()
    for k, name in enumerate(class_names):
        chosen = labels == k
        if chosen.any():
            ax.scatter(
                _numpy(points[chosen, 0]),
                _numpy(points[chosen, 1]),
                s=6,
                alpha=0.7,
                color=cmap(k % 10),
                label=name,
            )
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=8, loc="best", title="label")
    save_figure(fig, path)
    return fig


def plot_loss_curves(
    metrics: list[dict], path: str | os.PathLike, best_epoch: int | None = None
) -> Figure:
    """Per-example −ELBO (training subset and validation set) and the two terms of the
    validation ELBO (the training subset's without a validation set), per epoch, with the
    epoch kept marked; return the figure."""
    epochs = [m["epoch"] for m in metrics]
    shown = "val" if "val_elbo" in metrics[0] else "train"
    name = {"val": "validation", "train": "training subset"}[shown]
    fig = new_figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [m["train_loss"] for m in metrics], label="training objective (running)")
    left.plot(epochs, [-m["train_elbo"] for m in metrics], label="train −ELBO")
    if shown == "val":
        left.plot(epochs, [-m["val_elbo"] for m in metrics], label="validation −ELBO")
    left.set_ylabel("nats per example")
    left.set_title("Loss")
    right.plot(epochs, [-m[f"{shown}_reconstruction"] for m in metrics], label="−E_q[log p(x|z)]")
    right.plot(epochs, [m[f"{shown}_kl"] for m in metrics], label="KL(q(z|x) ‖ p(z))")
    right.set_ylabel("nats per example")
    right.set_title(f"The two terms of the ELBO ({name})")
    if best_epoch is not None:
        for ax in (left, right):
            ax.axvline(best_epoch, color="k", lw=0.8, ls=":", label=f"epoch kept ({best_epoch})")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        integer_ticks(ax)  # epochs are whole: a tick at 1.5 names no epoch
        ax.legend()
    save_figure(fig, path)
    return fig


def plot_weight_spread(
    inputs: Tensor,
    mean: Tensor,
    std: Tensor,
    image_shape: Sequence[int],
    path: str | os.PathLike,
    input_label: str | None = None,
) -> Figure:
    """Inputs, the average reconstruction over weight draws, and its pixel-wise standard
    deviation (on its own colour scale, printed in the title); return the figure.
    ``input_label`` as in :func:`plot_reconstructions`."""
    n = min(len(inputs), 10)
    fig = new_figure(figsize=(n * 0.9, 3.6))
    axes = fig.subplots(3, 1)
    rows = [
        (inputs[:n], input_label or _input_label(inputs[:n]), 1.0),
        (mean[:n], "mean reconstruction", 1.0),
        (std[:n], "std over weights", float(std[:n].max()) or 1.0),
    ]
    for ax, (images, label, top) in zip(axes, rows, strict=True):
        ax.imshow(image_grid(images, image_shape, 1, n), cmap="gray", vmin=0, vmax=top)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
    axes[0].set_title(
        "Reconstructions (z = μ(x)) over draws of the decoder's weights; "
        f"std scale 0 to {rows[2][2]:.3g}"
    )
    save_figure(fig, path)
    return fig


# ---------------------------------------------------------------------------- M2's figures

# Below this mean spread across classes (the std over y of each pixel's likelihood mean, in
# [0, 0.5]) M2's class figures show nearly one image per column whatever y: the decoder hardly
# uses y. Measured on digits M2 runs at the defaults: 0.005 after 2 epochs (a blur, the same in
# every row), 0.031 after 30 (rows told apart only by looking closely).
CLASS_SPREAD_CAUTION = 0.05


def class_spread(decoded: Tensor) -> float:
    """How much y changes M2's images: ``decoded`` is ``(classes, columns, data_dim)``, each
    column one z under every class; the std over classes of each pixel, averaged."""
    return float(decoded.detach().double().std(dim=0).mean()) if len(decoded) > 1 else 0.0


def _caution(spread: float) -> str:
    """A caution for M2's figures when the classes barely differ ('' otherwise)."""
    if spread >= CLASS_SPREAD_CAUTION:
        return ""
    return (
        f"\ncaution: y barely changes these images (spread over y {spread:.3f} < "
        f"{CLASS_SPREAD_CAUTION}): the decoder hardly uses y yet (too few epochs?)"
    )


def plot_accuracy(
    metrics: list[dict[str, Any]], num_labels: int, path: str | os.PathLike
) -> Figure:
    """M2's validation accuracy of q(y|x) per epoch, binarized and grayscale, over chance;
    return the figure (with no curve without a validation set: the test set is scored once)."""
    epochs = [row["epoch"] for row in metrics if "val_accuracy" in row]
    fig = new_figure(figsize=(6, 4))
    ax = fig.subplots()
    shown = [row for row in metrics if "val_accuracy" in row]
    ax.plot(epochs, [row["val_accuracy"] for row in shown], "o-", label="binarized validation set")
    ax.plot(
        epochs,
        [row["val_accuracy_grayscale"] for row in shown],
        "s--",
        label="grayscale validation set",
    )
    ax.axhline(1 / num_labels, color="k", lw=0.8, ls=":", label=f"chance (1/{num_labels})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy of argmax q(y|x)")
    ax.set_ylim(0, 1)
    integer_ticks(ax)
    ax.set_title("M2: validation accuracy of the classifier q(y|x)")
    ax.legend()
    save_figure(fig, path)
    return fig


def plot_class_samples(
    samples: Tensor, image_shape: Sequence[int], class_names: Sequence[str], path: str | os.PathLike
) -> Figure:
    """M2's samples, a row per class: y fixed, z ~ p(z) varied along the row (the same z in
    every row). ``samples`` holds the rows one after the other; return the figure."""
    rows = len(class_names)
    cols = len(samples) // rows
    fig = new_figure(figsize=(cols * 0.8, rows * 0.8))
    ax = fig.subplots()
    ax.imshow(image_grid(samples, image_shape, rows, cols), cmap="gray", vmin=0, vmax=1)
    h = image_shape[-2]
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(rows)])
    ax.set_yticklabels([f"y = {name}" for name in class_names])
    ax.set_xticks([])
    ax.set_xlabel("z ~ p(z): one draw per column")
    spread = class_spread(samples[: rows * cols].reshape(rows, cols, -1))
    ax.set_title("M2 samples: y fixed per row, z varied (likelihood mean)" + _caution(spread))
    save_figure(fig, path)
    return fig


def plot_style_transfer(
    grid: Tensor,
    rows: int,
    image_shape: Sequence[int],
    class_names: Sequence[str],
    path: str | os.PathLike,
) -> Figure:
    """M2's style transfer, a row per test input: the input, then its z decoded under every
    class; return the figure."""
    cols = len(class_names) + 1
    fig = new_figure(figsize=(cols * 0.8, rows * 0.8))
    ax = fig.subplots()
    ax.imshow(image_grid(grid, image_shape, rows, cols), cmap="gray", vmin=0, vmax=1)
    w = image_shape[-1]
    ax.set_xticks([c * (w + 1) + (w - 1) / 2 for c in range(cols)])
    ax.set_xticklabels(["binarized\ninput", *(f"y = {name}" for name in class_names)], fontsize=7)
    ax.set_yticks([])
    decoded = grid[: rows * cols].reshape(rows, cols, -1)[:, 1:].transpose(0, 1)
    ax.set_title(
        "M2 style transfer: z = μ(x, most probable y) of a test input, decoded under each y"
        + _caution(class_spread(decoded))
    )
    save_figure(fig, path)
    return fig


# ---------------------------------------------------------------------------- the CVAE's figure


def plot_completions(figure_data: Completions, path: str | os.PathLike | None = None) -> Figure:
    """Draw :func:`~pyro_vae.models.cvae_estimators.completions` as a grid, one column per
    image: inputs (missing pixels in red, with a key), truth, baseline, then one row per CVAE
    sample, under a title that says so. Saved
    to ``path`` (PNG unless its suffix names another format) when given; returns the
    matplotlib ``Figure``.

    A bare ``Figure``, never pyplot, as every figure here."""
    from matplotlib import colormaps

    channels, height, width = figure_data.image_shape
    rows = [
        ("inputs", figure_data.inputs),
        ("truth", figure_data.truth),
        ("baseline", figure_data.baseline),
        *((f"CVAE {k + 1}", s) for k, s in enumerate(figure_data.samples)),
    ]
    num_images = figure_data.truth.shape[0]
    fig = new_figure(figsize=(0.9 * num_images + 0.8, 0.9 * len(rows)))
    axes = fig.subplots(len(rows), num_images, squeeze=False)
    cmap = colormaps["gray"].with_extremes(bad="tab:red")
    for r, (label, batch) in enumerate(rows):
        for i in range(num_images):
            image = batch[i].detach().cpu().reshape(channels, height, width)
            ax = axes[r][i]
            if channels == 1:
                ax.imshow(image[0].numpy(), cmap=cmap, vmin=0.0, vmax=1.0)
            else:
                ax.imshow(image.permute(1, 2, 0).nan_to_num(0.0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    from matplotlib.patches import Patch

    fig.suptitle(
        "CVAE completions of test images: the given pixels kept, the missing ones predicted\n"
        "(baseline: one deterministic prediction; CVAE k: one draw z ~ p(z | given) each; "
        "likelihood mean)",
        fontsize=8,
    )
    fig.legend(
        handles=[Patch(color="tab:red", label="missing pixels (not given to the models)")],
        loc="lower center",
        bbox_to_anchor=(0.5, -0.02),
        fontsize=7,
        frameon=False,
    )
    if path is not None:
        save_figure(fig, path)
    return fig
