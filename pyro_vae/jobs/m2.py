"""M2's job (``scripts/train.py --model m2``): the semi-supervised VAE M2 (Kingma et al. 2014,
:class:`pyro_vae.M2`) trained on a few labels and the rest of the training images
unlabelled.

    python scripts/train.py --model m2 --num-labelled 100 --num-epochs 2

The labelled rows are ``labelled_subset(y_train, n, seed)``: fixed, class-balanced and seeded;
every other training label is hidden (:data:`pyro_vae.UNLABELLED`), and fit trains on (x, y)
with M2's ``TraceEnum_ELBO``, which sums y out where it is hidden. Beside what every run writes
(pyro_vae.jobs.run_directory), the run directory gets

- in ``checkpoint.pt``, the labelled indices (``labelled_indices``, rows of the training set):
  a resume restores them, after checking that they are the rows the seed gives;
- in ``metrics.json`` / ``metrics.csv``, per epoch: the training objective, the test accuracy
  of q(y|x) on the binarized test set (what M2 trains on) and on the grayscale one, the mean
  entropy of q(y|x) on the test set, and the test ELBO of log p(x) with y summed out;
- in ``final_metrics.json``: the last epoch's row, the label counts, α and the timings;
- ``accuracy.png`` (test accuracy per epoch), ``samples.png`` (a row per class: y fixed, z
  varied, the same z in every row), ``style_transfer.png`` (z of a few test inputs, at their
  most probable class, decoded under every class).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor

import pyro_vae as pv
from pyro_vae import plots
from pyro_vae.components.networks import DEFAULT_HIDDEN_DIMS
from pyro_vae.infer import distributed
from pyro_vae.jobs import cli
from pyro_vae.jobs.run_directory import RunDirectory, checkpoint_path
from pyro_vae.jobs.runs import (
    SPLIT_NAMES,
    Run,
    Setup,
    default_num_particles,
    explain_on,
    per_class,
    provenance,
    read_whole,
)
from pyro_vae.models.labels import UNLABELLED, default_alpha, hide_labels, labelled_subset
from pyro_vae.models.m2 import M2

KIND = "m2"
# The epoch kept, and scored on the test set: the best by this validation metric.
SELECTED_BY = "val_accuracy"
OWN_FLAGS = ("--num-labelled", "--num-unlabelled", "--alpha")
DEFAULT_NUM_LABELLED = 100
# M2's z, larger than the VAE's 10: with room for the style, the classes the generative model
# forms follow the labels more closely. Chosen on validation: Fashion-MNIST, 100 labels, 10,000
# unlabelled, 10 epochs, seed 0, best validation accuracy 0.714 at 32 against 0.682 at 10
# (which then fell to 0.617 by epoch 10), in benchmarks/results/m2-fashion-mnist-latent*.json;
# 0.712 at 64 and 0.661 at 2 in runs not kept (benchmarks/README.md, "M2").
DEFAULT_LATENT_DIM = 32
# The VAE's flags M2 has no use for: its parts are fixed (N(0, I) prior, diagonal Normal
# q(z|x,y), Bernoulli likelihood, no weight prior) and its objective is TraceEnum_ELBO, with no
# KL weight and no importance-weighted score. The sizes (--latent-dim, --hidden-dims),
# --network (mlp or conv), --num-particles and the training settings mean the same here.
VAE_ONLY = (
    "--compile",
    "--prior",
    "--encoder",
    "--likelihood",
    "--decoder",
    "--prior-scale",
    "--num-components",
    "--flow-depth",
    "--likelihood-scale",
    "--elbo",
    "--beta",
    "--kl-warmup-epochs",
    "--num-iw-particles",
)
ACCURACY, SAMPLES, STYLE_TRANSFER = FILES = FIGURES = (
    "accuracy.png",
    "samples.png",
    "style_transfer.png",
)
# Columns of samples.png (draws of z) and rows of style_transfer.png (test inputs).
SAMPLE_COLUMNS, STYLE_ROWS = 8, 8
# Test rows per chunk of the per-epoch evaluation: bounds its memory on any dataset.
CHUNK = 1000


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The flags of this model's group in scripts/train.py."""
    group.add_argument(
        "--num-labelled",
        type=cli.positive_int,
        help=f"training examples whose label M2 sees: a fixed, class-balanced subset drawn "
        f"with --seed (default {DEFAULT_NUM_LABELLED}; at least one per class)",
    )
    group.add_argument(
        "--num-unlabelled",
        type=cli.non_negative_int,
        help="unlabelled examples: the first this many of the other training examples "
        "(default: all of them)",
    )
    group.add_argument(
        "--alpha",
        type=cli.positive_float,
        help="weight of the classification term log q(y|x) per labelled example (default: "
        "N / N_labelled, N the training rows; the paper's is a tenth of that)",
    )


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The defaults that depend on other arguments, and the VAE's flags M2 has no use for
    refused (one line) when they were given."""
    refused = sorted(args.given & set(VAE_ONLY))
    if refused:
        parser.error(
            f"{', '.join(refused)} is for --model vae; --model m2 has fixed parts (an N(0, I) "
            "prior, a diagonal Normal q(z|x,y), a Bernoulli likelihood) and trains with "
            "TraceEnum_ELBO"
        )
    if args.network == "conv" and args.hidden_dims is not None:
        parser.error("--hidden-dims sets MLP widths; --network conv has fixed layers")
    args.num_particles = args.num_particles or default_num_particles("trace")  # TraceEnum_ELBO
    args.num_labelled = args.num_labelled or DEFAULT_NUM_LABELLED
    if "--latent-dim" not in args.given:
        args.latent_dim = DEFAULT_LATENT_DIM
    if args.network == "mlp":
        args.hidden_dims = args.hidden_dims or list(DEFAULT_HIDDEN_DIMS)
    else:
        args.hidden_dims = []  # the conv networks' layers are fixed


def choose_rows(
    data: pv.DataSplits, num_labelled: int, num_unlabelled: int | None, seed: int
) -> tuple[Tensor, Tensor]:
    """The labelled rows (``labelled_subset``) and all the training rows M2 fits, sorted;
    ValueErrors naming the flag for counts the data cannot give."""
    num_train, num_classes = len(data.y_train), len(data.class_names)
    if num_labelled < num_classes:
        raise ValueError(
            f"--num-labelled {num_labelled} is fewer than the {num_classes} classes of "
            f"{data.name}: a class-balanced subset needs at least one example of each"
        )
    if num_labelled > num_train:
        raise ValueError(
            f"--num-labelled {num_labelled} exceeds the {num_train} training examples of "
            f"{data.name}"
        )
    try:
        labelled = labelled_subset(data.y_train, num_labelled, seed)
    except ValueError as error:
        raise ValueError(f"--num-labelled {num_labelled}: {error}") from error
    others = torch.ones(num_train, dtype=torch.bool)
    others[labelled] = False
    unlabelled = others.nonzero().squeeze(1)
    if num_unlabelled is not None:
        if num_unlabelled > len(unlabelled):
            raise ValueError(
                f"--num-unlabelled {num_unlabelled} exceeds the {len(unlabelled)} training "
                f"examples of {data.name} left after {num_labelled} labelled ones"
            )
        unlabelled = unlabelled[:num_unlabelled]
    return labelled, torch.cat([labelled, unlabelled]).sort().values


def new_config(args: argparse.Namespace, data: pv.DataSplits) -> dict[str, Any]:
    """The checkpoint's config of a new M2 (the keyword arguments of ``build_m2``), after the
    label counts are checked against the data; α defaults to N / N_l (default_alpha)."""
    labelled, rows = choose_rows(data, args.num_labelled, args.num_unlabelled, args.seed)
    if args.alpha is None:
        args.alpha = default_alpha(len(rows), len(labelled))
    return {
        "model": "m2",
        "data_dim": data.data_dim,
        "num_labels": len(data.class_names),
        "latent_dim": args.latent_dim,
        "alpha": float(args.alpha),
        "num_labelled": len(labelled),
        "hidden_dims": list(args.hidden_dims),
        "image_shape": list(data.image_shape) if args.network == "conv" else None,
    }


def labelled_rows(run: Run, args: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The labelled rows and all the rows M2 fits, drawn from the run's ``args``; for a run
    read back, checked against the labelled rows its checkpoint recorded."""
    labelled, rows = choose_rows(
        run.data, args["num_labelled"], args["num_unlabelled"], args["seed"]
    )
    if not run.checkpoint:
        return labelled, rows
    path = checkpoint_path(run.directory)
    if "labelled_indices" not in run.checkpoint:
        raise ValueError(f"{path}: holds no 'labelled_indices'; it was not written by train.py")
    recorded = run.checkpoint["labelled_indices"]
    if not isinstance(recorded, Tensor):
        raise ValueError(f"{path}: its labelled_indices is no tensor")
    if not torch.equal(recorded.cpu(), labelled):
        raise ValueError(
            f"{path}: its labelled subset is not the one labelled_subset draws from "
            f"{args['dataset']} with seed {args['seed']} now (have the data or the code changed?)"
        )
    return recorded.cpu(), rows


def check_run(run: Run) -> None:
    """A run read back: its labelled rows are the ones the seed draws from the data now."""
    labelled_rows(run, run.args)


def prepare(run: Run, args: argparse.Namespace) -> Setup:
    """The training rows and labels (hidden but for the labelled rows) and the test sets on
    ``args.device``, checked before anything is written."""
    m2 = run.model.to(args.device)
    assert isinstance(m2, M2)  # the registry sent an "m2" run here
    # M2 trains on tensors only: rows streamed from a .npy are read whole, and it says so.
    data, notes = read_whole(run.data, KIND)
    data = data.to(args.device)
    x_all = data.train_tensor()
    labelled, rows = labelled_rows(run, vars(args))
    y_all = hide_labels(data.y_train.cpu(), labelled)
    x, y = x_all[rows.to(x_all.device)], y_all[rows].to(args.device)
    binarized = run.scored_sets(args.device, m2.dtype)
    # Data outside what M2 trains on, and labels it cannot take, are refused here, before
    # any file is written.
    scored: dict[str, Tensor] = {}
    for split, images, labels in (
        ("val", data.x_val, data.y_val),
        ("test", data.x_test, data.y_test),
    ):
        if split not in binarized or images is None or labels is None:
            continue
        m2.validate_data(binarized[split], f"{SPLIT_NAMES[split]} data")
        m2.check_labels(labels, len(labels))
        scored[split] = binarized[split]
        scored[f"{split}_grayscale"] = images.to(args.device, m2.dtype)
        scored[f"{split}_labels"] = labels.to(args.device)
    m2.validate_data(x.to(m2.dtype), "training data", probabilities=True)
    m2.check_labels(y, len(x))
    num_labelled = len(labelled)
    if m2.num_labelled is None:  # a run written before the config recorded it
        m2.num_labelled = num_labelled
    network = "conv" if args.network == "conv" else f"MLP {args.hidden_dims}"
    return Setup(
        model=m2,
        training_data=(x, y),
        loss=m2.loss(num_particles=args.num_particles),
        description=(
            f"{args.dataset}: {num_labelled} labelled + {len(x) - num_labelled} unlabelled "
            f"train / {data.num_val} validation / {len(data.x_test)} test examples of "
            f"{data.data_dim} features, "
            f"{m2.num_labels} classes; M2 ({network}, latent {args.latent_dim}, alpha "
            f"{m2.alpha:.3g}); TraceEnum_ELBO with {args.num_particles} particle(s); device "
            f"{args.device}; writing to {args.out_dir}"
        ),
        checkpoint_extra={"labelled_indices": labelled},
        scored=scored,
        notes=notes,
    )


def split_metrics(setup: Setup, split: str, seed: int) -> dict[str, float]:
    """On one evaluation set (``"val"``, ``"test"``): the accuracy of q(y|x) on the binarized
    images (what M2 trains on) and the grayscale ones, its mean entropy, and the ELBO of
    log p(x) with y summed out (z drawn from ``seed``'s stream)."""
    m2, scored = setup.model, setup.scored
    assert isinstance(m2, M2)
    x, labels = scored[split], scored[f"{split}_labels"]
    return {
        f"{split}_accuracy": m2.accuracy(x, labels, batch_size=CHUNK),
        f"{split}_accuracy_grayscale": m2.accuracy(
            scored[f"{split}_grayscale"], labels, batch_size=CHUNK
        ),
        f"{split}_label_entropy": label_entropy(m2, x),
        f"{split}_elbo": unlabelled_elbo(m2, x, seed),
    }


def epoch_row(setup: Setup, args: argparse.Namespace, epoch: int) -> dict[str, Any]:
    """The validation set's accuracy, entropy and ELBO (nothing without a validation set)."""
    return split_metrics(setup, "val", args.seed + epoch) if "val" in setup.scored else {}


def epoch_line(row: dict[str, Any]) -> str:
    if "val_accuracy" not in row:
        return "(no validation set)"
    return (
        f"val accuracy {row['val_accuracy']:.4f} (grayscale "
        f"{row['val_accuracy_grayscale']:.4f})  H(q(y|x)) {row['val_label_entropy']:.3f}  "
        f"val ELBO {row['val_elbo']:8.2f}"
    )


def finish(
    setup: Setup,
    run: Run,
    args: argparse.Namespace,
    run_dir: RunDirectory,
    metrics: list[dict[str, Any]],
    progress: bool | None,
) -> dict[str, Any]:
    """The test set's scores, once, of the weights the runner kept; the figures; the label
    counts and α."""
    m2 = setup.model
    assert isinstance(m2, M2)
    final: dict[str, Any] = split_metrics(setup, "test", args.seed)
    if distributed.ranks().is_main:
        write_figures(run_dir.path, m2, setup.scored["test"], run.data, metrics, args.seed)
    num_labelled = len(setup.checkpoint_extra["labelled_indices"])
    return {
        **final,
        "num_labelled": num_labelled,
        "num_unlabelled": len(setup.training_data[0]) - num_labelled,
        "alpha": m2.alpha,
    }


def summary(final: dict[str, Any], args: argparse.Namespace) -> str:
    return (
        f"test accuracy of q(y|x) {final['test_accuracy']:.4f} with {final['num_labelled']} labels"
    )


@torch.no_grad()
def label_entropy(m2: M2, x: Tensor) -> float:
    """The mean entropy of q(y|x) over ``x``, in nats: 0 when the classifier is sure of every
    row, log K when it cannot tell the classes apart."""
    total = sum(float(m2.label_posterior(chunk).entropy().sum()) for chunk in x.split(CHUNK))
    return total / len(x)


@torch.no_grad()
def unlabelled_elbo(m2: M2, x: Tensor, seed: int, num_particles: int = 1) -> float:
    """The mean ELBO of log p(x) per row of ``x`` with every label hidden: y summed out
    exactly by M2's ``TraceEnum_ELBO``, ``num_particles`` draws of z per class. Drawn from a
    stream of its own (``seed``), so that scoring leaves the training's random numbers as they
    were."""
    loss = m2.loss(num_particles=num_particles)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        total = 0.0
        for chunk in x.split(CHUNK):
            hidden = torch.full((len(chunk),), UNLABELLED, dtype=torch.long, device=x.device)
            total -= loss.loss(m2.model, m2.guide, chunk, hidden)
    return total / len(x)


def write_figures(
    directory: Path,
    m2: M2,
    x_test: Tensor,
    data: pv.DataSplits,
    metrics: list[dict[str, Any]],
    seed: int,
) -> None:
    """accuracy.png, samples.png and style_transfer.png (see the module's docstring); the
    draws of z come from ``seed``, so that the figures of a run are always the same."""
    plots.plot_accuracy(metrics, m2.num_labels, directory / ACCURACY)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(SAMPLE_COLUMNS, m2.latent_dim, generator=generator).to(m2.device, m2.dtype)
    classes = torch.arange(m2.num_labels, device=m2.device)
    # Row k: class k under each column's z.
    y = classes.repeat_interleave(SAMPLE_COLUMNS)
    samples = m2.decode(z.repeat(m2.num_labels, 1), y)
    plots.plot_class_samples(samples, data.image_shape, data.class_names, directory / SAMPLES)
    inputs = x_test[:STYLE_ROWS]
    guessed = m2.classify(inputs)
    z_inputs, _ = m2.encode(inputs, guessed)
    # Row i: input i, then its z decoded under every class.
    decoded = m2.decode(
        z_inputs.repeat_interleave(m2.num_labels, 0), classes.repeat(len(inputs))
    ).reshape(len(inputs), m2.num_labels, -1)
    grid = torch.cat([inputs.unsqueeze(1), decoded], dim=1).reshape(-1, inputs.shape[1])
    plots.plot_style_transfer(
        grid,
        len(inputs),
        data.image_shape,
        data.class_names,
        directory / STYLE_TRANSFER,
    )


@torch.no_grad()
def evaluate(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """scripts/evaluate.py's numbers: the test accuracy of q(y|x) (binarized and grayscale),
    its confusion matrix and entropy, and the ELBO of log p(x) with y summed out."""
    m2, data = run.model, run.data
    assert isinstance(m2, M2)
    x_test, x_grey, labels = run.x_test, data.x_test.to(m2.dtype), data.y_test
    if args.max_examples is not None:
        n = args.max_examples
        x_test, x_grey, labels = x_test[:n], x_grey[:n], labels[:n]
    pyro.set_rng_seed(args.seed)
    stage = cli.stage_printer()
    num_labels = m2.num_labels
    result = provenance(run, describe(run.config), args.seed)
    result.update(
        num_examples=len(x_test),
        num_labels=num_labels,
        class_names=list(data.class_names),
        num_particles=args.num_particles,
    )
    stage(f"accuracy of q(y|x) on {len(x_test)} test examples, binarized and grayscale")
    result["test_accuracy"] = m2.accuracy(x_test, labels, batch_size=args.chunk_size)
    result["test_accuracy_grayscale"] = m2.accuracy(x_grey, labels, batch_size=args.chunk_size)
    stage("confusion matrix and entropy of q(y|x)")
    guessed = torch.cat([m2.classify(chunk) for chunk in x_test.split(args.chunk_size)])
    entropy = torch.cat(
        [m2.label_posterior(chunk).entropy() for chunk in x_test.split(args.chunk_size)]
    )
    # Row: the label; column: argmax q(y|x).
    confusion = torch.bincount(labels * num_labels + guessed, minlength=num_labels**2)
    result["confusion_matrix"] = confusion.reshape(num_labels, num_labels).tolist()
    result["test_label_entropy"] = entropy.mean().item()
    stage(f"ELBO of log p(x) with y summed out, {args.num_particles} particles")
    result["test_elbo"] = unlabelled_elbo(m2, x_test, args.seed, num_particles=args.num_particles)
    result["per_class"] = per_class(
        labels,
        data.class_names,
        accuracy=(guessed == labels).double(),
        label_entropy=entropy,
    )
    stage("done")
    return result


def describe(config: dict[str, Any]) -> str:
    return (
        f"M2, latent {config['latent_dim']}, hidden {config['hidden_dims']}, "
        f"{'conv' if config.get('image_shape') else 'MLP'}, alpha {config['alpha']:.3g}"
    )


def table(result: dict[str, Any]) -> str:
    names = result["class_names"]
    lines = [
        f"{result['run']} (epoch {result['epoch']}, {result['selected_by']}; {result['model']}), "
        f"{result['num_examples']} test examples",
        f"  accuracy of argmax q(y|x): {result['test_accuracy']:.4f} binarized, "
        f"{result['test_accuracy_grayscale']:.4f} grayscale (chance {1 / len(names):.3f})",
        f"  mean entropy of q(y|x) {result['test_label_entropy']:.3f} nats "
        f"(log {len(names)} = {math.log(len(names)):.3f})",
        f"  ELBO of log p(x), y summed out: {result['test_elbo']:.2f} nats "
        f"({result['num_particles']} particles)",
        "  confusion matrix (rows: label, columns: argmax q(y|x))",
        "  " + " " * 10 + "".join(f"{name[:6]:>7}" for name in names),
    ]
    for name, row in zip(names, result["confusion_matrix"], strict=True):
        lines.append(f"  {name[:10]:<10}" + "".join(f"{v:>7}" for v in row))
    lines.append(f"  {'class':<14}{'count':>7}{'accuracy':>10}{'H(q(y|x))':>11}")
    for name, row in result["per_class"].items():
        lines.append(
            f"  {name:<14}{row['count']:>7}{row['accuracy']:>10.4f}{row['label_entropy']:>11.3f}"
        )
    return "\n".join(lines)


def explain(run: Run, out_dir: Path, num_particles: int) -> Path:
    """The report of q(y|x) and of μ and σ of q(z|x,y) at the most probable y (no draws to
    set: ``num_particles`` is the VAE's and the CVAE's)."""
    return explain_on(run, run.x_test, out_dir)
