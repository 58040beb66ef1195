"""The explain report's own figures (:mod:`pyro_vae.explain`), written as PNG files: the
reparameterization cloud, the aggregate posterior over the prior, a latent traversal, KL and
activity per dimension, and how good μ(x) and σ(x) are (the two inference gaps).

Drawn as :mod:`pyro_vae.plots` draws (its docstring says why): on bare matplotlib ``Figure``
objects, never through pyplot, with matplotlib imported inside the functions, so that
``import pyro_vae`` does not load it. Latent dimensions are numbered from 1 (z_1, z_2, ...) as in
the report; the functions' ``dims`` arguments are tensor indices, from 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pyro_vae.plots import _name, _numpy, image_grid, new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pyro_vae.infer.gaps import InferenceGaps


def plot_point_cloud(
    z: Tensor, loc: Tensor, scale: Tensor, dims: tuple[int, int], path: str | os.PathLike
) -> Figure:
    """Draws z = μ + σ·ε for one x in two latent dimensions (tensor indices ``dims``), with μ
    and the 1σ and 2σ boxes; return the figure."""
    from matplotlib.patches import Rectangle

    i, j = dims
    fig = new_figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.scatter(_numpy(z[:, i]), _numpy(z[:, j]), s=3, alpha=0.3, label="z = μ(x) + σ(x)·ε")
    ax.plot(float(loc[i]), float(loc[j]), "r+", markersize=14, mew=2, label="μ(x)")
    for k in (1, 2):
        ax.add_patch(
            Rectangle(
                (float(loc[i] - k * scale[i]), float(loc[j] - k * scale[j])),
                float(2 * k * scale[i]),
                float(2 * k * scale[j]),
                fill=False,
                ec="r",
                ls="--" if k == 2 else "-",
                label=f"μ ± {k}σ",
            )
        )
    ax.set_xlabel(_name(i))
    ax.set_ylabel(_name(j))
    ax.set_title("The reparameterization cloud of one test input")
    ax.legend(loc="best", fontsize=8)
    ax.set_aspect("equal", adjustable="datalim")
    save_figure(fig, path)
    return fig


# Why the explain report shows the dimensions it shows (pyro_vae/explain.py): the two (or five)
# with the most KL, which change the image most, where the KL per dimension is known.
DIMS_CHOSEN = (
    "the two dimensions with the most KL (z_1 and z_2 where the KL per dimension is not known)"
)
ROWS_CHOSEN = "rows: the dimensions by KL, largest first\n(z_1, z_2, ... where it is not known)"

# Radii of the prior's contours, in standard deviations. In two dimensions the N(0, I) mass
# within radius r is 1 − exp(−r²/2): 39%, 86%, 99%.
_PRIOR_RADII = (1.0, 2.0, 3.0)


def plot_aggregate_posterior(
    z: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    dims: tuple[int, int],
    path: str | os.PathLike,
    standard_prior: bool = True,
    why_these: str = DIMS_CHOSEN,
) -> Figure:
    """One z ~ q(z | x) per test input (the aggregate posterior), coloured by label, over the
    contours of the N(0, I) prior in the same two dimensions (tensor indices ``dims``), each
    labelled with its radius and the mass inside it. Say ``standard_prior=False`` when the
    model's prior is another: the circles are then marked as N(0, I) for reference, not as p(z).
    ``why_these`` says under the title why these two dimensions are shown (by default, the
    explain report's rule). The legends stand outside the axes, where they hide no point.
    Return the figure."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    i, j = dims
    fig = new_figure(figsize=(8, 5.5))
    ax = fig.subplots()
    grid = torch.linspace(-3.5, 3.5, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    radius = (gx**2 + gy**2).sqrt()
    # Contours of the radius are contours of the density, exp(−r²/2) / 2π: labelling them by
    # radius says where the prior puts its mass, which density values would not.
    contours = ax.contour(
        gx.numpy(),
        gy.numpy(),
        radius.numpy(),
        levels=list(_PRIOR_RADII),
        colors="k",
        linewidths=0.6,
        alpha=0.6,
    )
    mass = {r: 1 - math.exp(-(r**2) / 2) for r in _PRIOR_RADII}
    ax.clabel(contours, fmt={r: f"{r:g}σ ({100 * mass[r]:.0f}%)" for r in _PRIOR_RADII})
    colours = colormaps["tab10"]
    for k, name in enumerate(class_names):
        mask = (labels == k).cpu()
        ax.scatter(
            _numpy(z[mask, i]),
            _numpy(z[mask, j]),
            s=5,
            alpha=0.7,
            color=colours(k % 10),
            label=name,
        )
    ax.set_xlabel(_name(i))
    ax.set_ylabel(_name(j))
    prior_name = "p(z) = N(0, I)" if standard_prior else "N(0, I) (not this model's prior)"
    ax.set_title(f"Aggregate posterior q(z) over {prior_name}\n{why_these}", fontsize=9)
    points = ax.legend(
        markerscale=3,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        title="q(z): one draw per\ntest input, by label",
    )
    ax.add_artist(points)  # a second legend would replace the first without this
    prior = Line2D([], [], color="k", lw=0.6)
    ax.legend(
        [prior],
        [
            f"{prior_name}: circles holding\n"
            + ", ".join(f"{100 * mass[r]:.0f}%" for r in _PRIOR_RADII)
            + " of its mass"
        ],
        fontsize=7,
        loc="lower left",
        bbox_to_anchor=(1.02, 0.0),
    )
    save_figure(fig, path)
    return fig


def plot_traversal(
    images: Tensor,
    dims: Sequence[int],
    values: Tensor,
    image_shape: Sequence[int],
    path: str | os.PathLike,
    row_order: str = ROWS_CHOSEN,
) -> Figure:
    """Rows: one latent dimension each (tensor indices ``dims``), varied over ``values`` with
    the others at 0; ``row_order`` says on the figure why the rows come in that order (by
    default, the explain report's rule). Return the figure."""
    rows, cols = len(dims), len(values)
    fig = new_figure(figsize=(cols * 0.8, rows * 0.9))
    ax = fig.subplots()
    ax.imshow(image_grid(images, image_shape, rows, cols), cmap="gray", vmin=0, vmax=1)
    h = image_shape[0]
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(rows)])
    ax.set_yticklabels([_name(d) for d in dims])
    ax.set_xticks([c * (image_shape[1] + 1) + (image_shape[1] - 1) / 2 for c in range(cols)])
    ax.set_xticklabels([f"{float(v):+.1f}" for v in values], fontsize=7)
    ax.set_xlabel("value of the row's dimension z_i (the others at 0), decoded (likelihood mean)")
    ax.set_ylabel(row_order, fontsize=8)
    ax.set_title("Latent traversal: one dimension varied, the others at the prior mean 0")
    save_figure(fig, path)
    return fig


def plot_kl_per_dimension(
    kl: Tensor, variance: Tensor, threshold: float, path: str | os.PathLike
) -> Figure:
    """KL per latent dimension and Cov_x(E_q[z_i]), with the active-unit threshold; return the
    figure. Bars stand at 1, 2, ...: z_1 is the first dimension, as in the report."""
    positions = list(range(1, len(kl) + 1))
    fig = new_figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    left.bar(positions, _numpy(kl))
    left.set_title("average KL(q(z_i|x) ‖ p(z_i))\n(bounds the information z_i carries)")
    left.set_ylabel("nats")
    right.bar(positions, _numpy(variance), color="tab:orange")
    right.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    right.set_yscale("log")
    right.set_title("Cov_x(E_q[z_i | x])\n(active unit: its mean moves with x)")
    right.legend(fontsize=8)
    # Every dimension's tick labelled (a locator labelled only the even ones), smaller and
    # turned when there are many.
    size, turn = (8, 0) if len(kl) <= 20 else (6, 90)
    for ax in (left, right):
        ax.set_xlabel("latent dimension i of z_i")
        ax.set_xticks(positions, [str(p) for p in positions], fontsize=size, rotation=turn)
    save_figure(fig, path)
    return fig


# Tick labels of the σ(x)/σ* histogram, those within its range.
_RATIO_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.7, 0.8, 0.9, 1, 1.1, 1.25, 1.5, 2, 5, 10, 20, 50)


def plot_inference_gaps(
    gaps: InferenceGaps, dims: Sequence[int], path: str | os.PathLike
) -> Figure:
    """How good μ(x) and σ(x) are (:func:`~pyro_vae.infer.gaps.inference_gaps`): the two gaps
    stacked, with their standard errors; μ(x) against μ* in the latent dimensions ``dims``
    (tensor indices), one point per example; and a histogram of σ(x)/σ* over every example and
    dimension. Return the figure."""
    from matplotlib import colormaps

    fig = new_figure(figsize=(14, 4.3), layout="constrained")
    bars, means, ratios = fig.subplots(1, 3, width_ratios=(0.6, 1, 1))
    approximation = gaps.average(gaps.approximation_gap)
    amortization = gaps.average(gaps.amortization_gap)
    parts = [
        ("approximation gap\nlog p(x) − ELBO(q*)", approximation, "tab:blue"),
        ("amortization gap\nELBO(q*) − ELBO(q(z|x))", amortization, "tab:orange"),
    ]
    bottom = 0.0
    for label, (mean, se), colour in parts:
        height = max(mean, 0.0)  # a gap below 0 is noise: it stacks as nothing
        bars.bar(
            0,
            height,
            bottom=bottom,
            width=0.5,
            color=colour,
            yerr=se,
            capsize=6,
            label=f"{label}\n= {mean:.3f} ± {se:.3f} nats",
        )
        bottom += height
    bars.set_xlim(-0.6, 0.6)
    bars.set_xticks([0], ["per test input\n(mean ± SE)"])
    bars.set_ylabel("nats per example")
    bars.set_title("log p(x) − ELBO of the encoder,\nsplit in two")
    handles, labels = bars.get_legend_handles_labels()
    bars.legend(
        handles[::-1], labels[::-1], fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18)
    )
    colours = colormaps["tab10"]
    low = min(float(gaps.loc[:, list(dims)].min()), float(gaps.optimized_loc[:, list(dims)].min()))
    high = max(float(gaps.loc[:, list(dims)].max()), float(gaps.optimized_loc[:, list(dims)].max()))
    means.plot([low, high], [low, high], color="k", lw=0.8, ls="--", label="μ(x) = μ*")
    for k, d in enumerate(dims):
        means.scatter(
            _numpy(gaps.optimized_loc[:, d]),
            _numpy(gaps.loc[:, d]),
            s=6,
            alpha=0.6,
            color=colours(k % 10),
            label=_name(d),
        )
    means.set_xlabel("μ*: the mean of the Gaussian fitted to the input alone")
    means.set_ylabel("μ(x): the encoder's mean")
    shift = gaps.standardized_shift.abs()
    means.set_title(
        "μ(x) against μ*, the dimensions with the most spread in μ*\n"
        f"|μ(x) − μ*| / σ*: median {float(shift.median()):.2f}, "
        f"90th percentile {float(shift.quantile(0.9)):.2f} (all dimensions)"
    )
    means.legend(fontsize=8, markerscale=2)
    # A histogram of log σ(x)/σ* on a linear axis, its ticks labelled with the ratios: the
    # spread is often narrow, where a log axis would label no tick but 1 (and that as 10⁰).
    ratio = gaps.scale_ratio.flatten().double().cpu()
    log_ratio = ratio.log10()
    ratios.hist(_numpy(log_ratio), bins=40, color="tab:green", alpha=0.8)
    ratios.axvline(0.0, color="k", lw=0.8, ls="--", label="σ(x) = σ*")
    low, high = ratios.get_xlim()
    ticks = [t for t in _RATIO_TICKS if low <= math.log10(t) <= high]
    ratios.set_xticks([math.log10(t) for t in ticks], [f"{t:g}" for t in ticks])
    wider = float((ratio > 1).double().mean())
    ratios.set_xlabel("σ(x) / σ* (log scale)")
    ratios.set_ylabel("(input, dimension) pairs")
    ratios.set_title(
        f"σ(x) / σ* over every input and dimension: median {float(ratio.median()):.2f};\n"
        f"the encoder is wider than q* in {100 * wider:.0f}% of them"
    )
    ratios.legend(fontsize=8)
    save_figure(fig, path)
    return fig
