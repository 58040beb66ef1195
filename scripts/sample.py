#!/usr/bin/env python
"""Draw from a trained run: a PNG grid and a .npy of the draws, images in the data's shape.

    python scripts/sample.py runs/digits                       # 64 prior samples of a VAE
    python scripts/sample.py runs/digits --interpolate         # μ(x) of test images 0 and 1,
                                                               # joined by a line in z
    python scripts/sample.py runs/digits-m2                    # M2: a row per class
    python scripts/sample.py runs/digits-cvae --images 0,5,9   # CVAE: completions of test images

Reads the run with pyro_vae.jobs.load_run (the weights of the epoch it kept) and writes into
``--out`` (default RUN/samples/), by model kind:

- VAE: ``prior.png`` and ``prior.npy`` (N, *image_shape): the likelihood's mean at N draws
  z ~ p(z); with ``--interpolate``, ``interpolation.png`` and ``interpolation.npy``
  (N, *image_shape): the decoder's mean along the straight line from μ(x_a) to μ(x_b) of two
  test images (``--images A,B``, default 0,1), both ends included;
- M2: ``classes.png`` and ``classes.npy`` (classes, N, *image_shape): row k decodes class k,
  column j the same z ~ p(z) in every row;
- CVAE: ``completions.png`` and ``completions.npy`` (images, N, *image_shape): N draws
  z ~ p(z | c) per test image (``--images``, default the first 8), the given pixels kept and
  the missing ones filled in by the likelihood's mean.

The draws come from ``--seed``: one seed, one set of files. The test images are the run's test
set as it scored it (binarized once for a Bernoulli likelihood; the CVAE's given pixels are the
grayscale image's). Bad input (no run there, counts out of range) ends with a one-line message
and exit code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch import Tensor

import pyro_vae as pv
from pyro_vae import plots
from pyro_vae._files import atomic_write
from pyro_vae.jobs import Run, cli, load_run

PROG = "sample.py"
# Defaults of --num-samples by what is drawn, and the most any of them may ask for.
DEFAULT_COUNTS = {"prior": 64, "interpolation": 10, "classes": 8, "completions": 5}
MAX_SAMPLES = 10_000
DEFAULT_CVAE_IMAGES = 8


def indices(text: str) -> list[int]:
    """Test-set indices, comma-separated (``0,5,9``)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected test-set indices separated by commas, got {text!r}"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected indices of 0 or more, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Draw from a run of scripts/train.py: a PNG grid and a .npy of the draws.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--num-samples",
        type=cli.positive_int,
        help="VAE: prior samples (default 64), or points along --interpolate's line, ends "
        "included (default 10, at least 2); M2: columns, draws of z per class (default 8); "
        f"CVAE: completions per image (default 5); at most {MAX_SAMPLES} in all",
    )
    parser.add_argument("--seed", type=cli.seed, default=0, help="seeds the draws")
    parser.add_argument(
        "--interpolate",
        action="store_true",
        help="VAE only: decode the line in z from μ(x_a) to μ(x_b) of two test images "
        "(--images A,B, default 0,1) instead of prior samples",
    )
    parser.add_argument(
        "--images",
        type=indices,
        metavar="I,J,...",
        help="test-set indices: the two ends of --interpolate (default 0,1), or the images a "
        f"CVAE completes (default the first {DEFAULT_CVAE_IMAGES})",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/samples)")
    parser.add_argument("--num-threads", type=cli.num_threads, help="CPU threads")
    return parser.parse_args(argv)


def what_is_drawn(run: Run, args: argparse.Namespace) -> str:
    """The name of the draw (and of its files): prior, interpolation, classes or completions."""
    if args.interpolate and run.kind != "vae":
        raise ValueError(f"--interpolate is for a VAE run; {run.directory} holds a {run.kind}")
    if args.images is not None and run.kind == "m2":
        raise ValueError("--images is for --interpolate or a CVAE run; M2 draws a row per class")
    if run.kind == "vae":
        if args.images is not None and not args.interpolate:
            raise ValueError("--images chooses the ends of --interpolate for a VAE run")
        return "interpolation" if args.interpolate else "prior"
    return {"m2": "classes", "cvae": "completions"}[run.kind]


def check_request(run: Run, args: argparse.Namespace, drawn: str) -> tuple[int, list[int]]:
    """The number of samples and the test images, checked against the run: a ValueError with
    one line otherwise."""
    count = args.num_samples or DEFAULT_COUNTS[drawn]
    num_test = len(run.x_test)
    images: list[int] = []
    if drawn == "interpolation":
        images = args.images if args.images is not None else [0, 1]
        if len(images) != 2:
            raise ValueError(f"--images: --interpolate joins two test images, got {len(images)}")
        if count < 2:
            raise ValueError(f"--num-samples {count}: a line needs its two ends, give 2 or more")
    elif drawn == "completions":
        images = args.images if args.images is not None else list(range(DEFAULT_CVAE_IMAGES))
        images = images[:num_test] if args.images is None else images
    bad = [i for i in images if i >= num_test]
    if bad:
        raise ValueError(
            f"--images: test image {bad[0]} is not there; the run's test set has {num_test} "
            f"(indices 0 to {num_test - 1})"
        )
    rows = {"prior": 1, "interpolation": 1, "classes": len(run.data.class_names)}
    total = count * rows.get(drawn, len(images))
    if total > MAX_SAMPLES:
        raise ValueError(
            f"--num-samples {count}: {total} images in all, more than {MAX_SAMPLES}; ask for fewer"
        )
    return count, images


def output_directory(run: Run, out: Path | None) -> Path:
    """Where the files go, refused (before anything is written) if it is a file."""
    path = out if out is not None else run.directory / "samples"
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a directory")
    return path


@torch.no_grad()
def draw(run: Run, drawn: str, count: int, images: list[int]) -> tuple[Tensor, dict[str, Any]]:
    """The draws, flat (rows of ``data_dim`` values, in the order the grid shows them), and
    what the figure needs besides."""
    model = run.model
    if drawn == "prior":
        assert isinstance(model, pv.VAE)
        return model.sample(count), {}
    if drawn == "interpolation":
        assert isinstance(model, pv.VAE)
        ends = run.x_test[images]
        loc, _ = model.encode(ends)
        t = torch.linspace(0, 1, count, dtype=loc.dtype)[:, None]
        z = (1 - t) * loc[0] + t * loc[1]
        # A Bayesian decoder's mean weights: the same decoder at every point of the line.
        path = model.likelihood(model.decode(z, weights="mean")).mean
        return path, {"ends": ends}
    if drawn == "classes":
        assert isinstance(model, pv.M2)
        z = torch.randn(count, model.latent_dim, dtype=model.dtype)
        classes = torch.arange(model.num_labels)
        # Row k: class k under each column's z.
        return model.decode(z.repeat(model.num_labels, 1), classes.repeat_interleave(count)), {}
    assert isinstance(model, pv.ConditionalVAE)
    mask = pv.quadrant_mask(run.data.image_shape, run.args["given_quadrants"])
    grey = run.data.x_test[images].to(model.dtype)
    _, c = pv.split_by_mask(grey, mask)
    completed = model.sample(c, count)  # (count, images, missing pixels)
    merged = torch.stack([pv.merge_by_mask(x, c, mask) for x in completed], dim=1)
    given = pv.merge_by_mask(torch.full((len(c), int((~mask).sum())), math.nan), c, mask)
    return merged.reshape(-1, grey.shape[1]), {"given": given, "truth": grey}


def figure(
    run: Run,
    drawn: str,
    flat: Tensor,
    count: int,
    images: list[int],
    extra: dict[str, Any],
    seed: int,
) -> Any:
    """The grid of the draws, titled with the run, the epoch and the seed."""
    from matplotlib import colormaps

    shape = run.data.image_shape
    if drawn == "classes":
        rows, labels = len(run.data.class_names), [f"y = {n}" for n in run.data.class_names]
        shown, cols = flat, count
    elif drawn == "completions":
        given, truth = extra["given"], extra["truth"]
        per_image = flat.reshape(len(images), count, -1)
        shown = torch.cat([given[:, None], truth[:, None], per_image], dim=1).flatten(0, 1)
        rows, cols = len(images), count + 2
        labels = [f"test {i}" for i in images]
    elif drawn == "interpolation":
        ends = extra["ends"]
        shown = torch.cat([ends[:1], flat, ends[1:]])
        rows, cols, labels = 1, count + 2, None
    else:
        cols = min(count, 8)
        rows, shown, labels = math.ceil(count / cols), flat, None
    width = max(3.0, 0.8 * cols)
    fig = plots.new_figure(figsize=(width, 0.8 * rows + 0.9))
    ax = fig.subplots()
    cmap = colormaps["gray"].with_extremes(bad="tab:red")
    ax.imshow(plots.image_grid(shown, shape, rows, cols), cmap=cmap, vmin=0, vmax=1)
    h, w = shape[-2], shape[-1]
    ax.set_yticks([] if labels is None else [r * (h + 1) + (h - 1) / 2 for r in range(rows)])
    if labels is not None:
        ax.set_yticklabels(labels, fontsize=7)
    ax.set_xticks([])
    if drawn == "completions":
        ax.set_xticks([c * (w + 1) + (w - 1) / 2 for c in range(2)])
        ax.set_xticklabels(["given\n(red: missing)", "truth"], fontsize=7)
        ax.set_xlabel(f"then {count} completions, z ~ p(z | given) each")
    elif drawn == "interpolation":
        ax.set_xticks([(w - 1) / 2, (cols - 1) * (w + 1) + (w - 1) / 2])
        ax.set_xticklabels([f"test {images[0]}", f"test {images[1]}"], fontsize=7)
        ax.set_xlabel(f"the decoder's mean at {count} points from μ(x_a) to μ(x_b), ends included")
    elif drawn == "classes":
        ax.set_xlabel("z ~ p(z): one draw per column, the same in every row")
    titles = {
        "prior": f"{count} samples: z ~ p(z), decoded (likelihood mean)",
        "interpolation": "Latent interpolation between two test images",
        "classes": "M2: a row per class y, z varied along the row (likelihood mean)",
        "completions": "CVAE completions of test images (likelihood mean of the missing pixels)",
    }
    epoch = "" if run.selection is None else f", epoch {run.selection['epoch']}"
    ax.set_title(f"{titles[drawn]}\n{run.directory}{epoch}, seed {seed}", fontsize=8)
    return fig


def write(path: Path, values: Tensor, fig: Any) -> list[Path]:
    """``path``.npy and ``path``.png, each written atomically."""
    array = values.detach().cpu().numpy()
    with atomic_write(path.with_suffix(".npy"), "wb") as file:
        np.save(file, array)
    plots.save_figure(fig, path.with_suffix(".png"))
    return [path.with_suffix(".npy"), path.with_suffix(".png")]


def shaped(flat: Tensor, drawn: str, count: int, image_shape: Sequence[int]) -> Tensor:
    """The draws in the data's image shape: (N, *image_shape), or (rows, N, *image_shape) for
    M2's classes and the CVAE's images."""
    if drawn in ("classes", "completions"):
        return flat.reshape(-1, count, *image_shape)
    return flat.reshape(count, *image_shape)


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.set_num_threads(args.num_threads)
    try:
        loaded = load_run(args.run_dir)
        drawn = what_is_drawn(loaded, args)
        count, images = check_request(loaded, args, drawn)
        out = output_directory(loaded, args.out)
        pyro.set_rng_seed(args.seed)
        flat, extra = draw(loaded, drawn, count, images)
        fig = figure(loaded, drawn, flat, count, images, extra, args.seed)
        out.mkdir(parents=True, exist_ok=True)
        values = shaped(flat, drawn, count, loaded.data.image_shape)
        written = write(out / drawn, values, fig)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{PROG}: error: cannot write: {error}", file=sys.stderr)
        return 1
    cli.say(f"{loaded.kind} run {args.run_dir}: {drawn} with seed {args.seed}")
    for path in written:
        cli.say(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
