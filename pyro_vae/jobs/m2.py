"""The main job of scripts/train.py for ``--model m2``: the semi-supervised VAE M2 (Kingma et
al. 2014, :mod:`pyro_vae.models.m2`) trained on a few labels and the rest of the training
images unlabelled.

    python scripts/train.py --model m2 --num-labelled 100 --num-epochs 2

The steps are the VAE's (arguments, data, model, fit, evaluate, write) and the run directory
is pyro_vae.jobs.runs' format. The labelled rows are ``labelled_subset(y_train, n, seed)``: fixed,
class-balanced and seeded; every other training label is hidden (:data:`UNLABELLED`), and fit
trains on (x, y) with M2's ``TraceEnum_ELBO``, which sums y out where it is hidden. The run
directory gets

- ``checkpoint.pt``: M2 (config ``"model": "m2"``, rebuilt by :func:`build_m2`), written by fit
  after each epoch and every ``--checkpoint-every`` steps, with the labelled indices
  (``labelled_indices``, rows of the training set): a resume restores them, after checking
  that they are the rows the seed gives;
- ``metrics.json`` / ``metrics.csv``: per epoch, the training objective, the test accuracy of
  q(y|x) on the binarized test set (what M2 trains on) and on the grayscale one, the mean
  entropy of q(y|x) on the test set, and the test ELBO of log p(x) with y summed out;
- ``final_metrics.json``: the last epoch's row, the label counts, α and the timings;
- ``accuracy.png`` (test accuracy per epoch), ``samples.png`` (a row per class: y fixed, z
  varied, the same z in every row), ``style_transfer.png`` (z of a few test inputs, at their
  most probable class, decoded under every class).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyro
import torch
from torch import Tensor

import pyro_vae as pv
from pyro_vae import plots
from pyro_vae.checkpoint import build_model
from pyro_vae.infer import distributed
from pyro_vae.jobs import cli
from pyro_vae.jobs.runs import RunDirectory, claim_run_directory
from pyro_vae.models.labels import UNLABELLED, hide_labels, labelled_subset, paper_alpha
from pyro_vae.models.m2 import M2

OWN_FLAGS: tuple[str, ...] = ("num_labelled", "num_unlabelled", "alpha")
DEFAULT_NUM_LABELLED = 100
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
FIGURES = ("accuracy.png", "samples.png", "style_transfer.png")
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
        "the paper's 0.1 * N / N_labelled, N the training rows)",
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
    args.num_particles = args.num_particles or 1
    args.num_labelled = args.num_labelled or DEFAULT_NUM_LABELLED
    if args.network == "mlp":
        args.hidden_dims = args.hidden_dims or [400]
    else:
        args.hidden_dims = []  # the conv networks' layers are fixed


@dataclass(frozen=True)
class Setup:
    """What a run trains on and scores, new or resumed."""

    data: pv.DataSplits
    labelled: Tensor
    """Rows of the training set whose label M2 sees, sorted (CPU, long)."""
    x: Tensor
    """The training rows M2 fits: the labelled ones and the unlabelled ones, in data order."""
    y: Tensor
    """Their labels, :data:`UNLABELLED` where hidden."""
    x_test: Tensor
    """The test set as the run scores it: binarized once from the seed."""
    config: dict[str, Any]


@dataclass(frozen=True)
class Run:
    """An M2 run read back by :func:`load_run` (:class:`pyro_vae.Run` is the VAE's)."""

    m2: M2
    """The model, on the CPU."""
    config: dict[str, Any]
    """The keyword arguments of build_m2, with ``"model": "m2"``."""
    args: dict[str, Any]
    """The arguments of scripts/train.py that made it."""
    checkpoint: dict[str, Any]
    """The whole checkpoint: epoch, step, metrics, training state, labelled indices."""
    setup: Setup
    """The rows it trained on and the test set it scored, checked as a resume checks them."""

    @property
    def data(self) -> pv.DataSplits:
        return self.setup.data

    @property
    def x_test(self) -> Tensor:
        """The test set exactly as the run scored it (binarized once from the seed), on the
        CPU in the model's dtype."""
        return self.setup.x_test


def load_run(directory: str | os.PathLike) -> Run:
    """The M2 run in ``directory``, as :func:`pyro_vae.load_run` reads a VAE's: the model, its
    arguments and checkpoint, the data, the labelled rows and the very test set it scored,
    checked as a resume checks them (the labelled subset, the test set's digest).

    :raises ValueError: when ``directory`` holds no M2 run, its checkpoint was not written by
        scripts/train.py, or the labelled rows or test set rebuilt from the data are not the
        ones the run used.
    """
    directory = Path(directory)
    path = pv.jobs.runs.checkpoint_path(directory)
    m2, checkpoint = pv.load_checkpoint(path)
    if not isinstance(m2, M2):
        raise ValueError(f"{path}: not a run of --model m2")
    for key in ("args", "config", "training", "labelled_indices", "evaluation_digest"):
        if key not in checkpoint:
            raise ValueError(f"{path}: holds no {key!r}; it was not written by scripts/train.py")
    saved = checkpoint["args"]
    # prepare reads the run's directory (for its messages) and puts everything on the CPU.
    args = argparse.Namespace(**{**saved, "out_dir": directory, "device": "cpu"})
    data = pv.load_dataset(saved["dataset"], saved["data_dir"])
    setup = prepare(args, data, m2, checkpoint)
    return Run(m2, checkpoint["config"], saved, checkpoint, setup)


def main(args: argparse.Namespace, prog: str) -> int:
    """Train M2, evaluate and write; return the exit code. Bad input (the label counts, data,
    labels) fails before the output directory is claimed; a resumed run holds its directory
    first, as the VAE's does."""
    if args.resume is not None:
        with claim_run_directory(args.resume, mode="existing") as run_dir:
            path = pv.jobs.runs.checkpoint_path(Path(args.resume))
            m2, checkpoint = pv.load_checkpoint(path)
            for key in ("args", "training", "labelled_indices", "evaluation_digest"):
                if key not in checkpoint:
                    raise ValueError(f"{path}: holds no {key!r}; it was not written by train.py")
            # scripts/train.py's parser has refused every flag a resume may not change.
            overrides = sorted(args.given - {"--resume"})
            args = pv.jobs.runs.resumed_args(
                checkpoint["args"], args, checkpoint["training"], overrides
            )
            pyro.set_rng_seed(args.seed)
            assert isinstance(m2, M2)  # config["model"] == "m2": train.py dispatched here
            model: M2 = m2.to(args.device)
            data = pv.load_dataset(args.dataset, args.data_dir, device=args.device)
            setup = prepare(args, data, model, checkpoint)
            return run_dir.guarded(prog, lambda: train(args, run_dir, model, setup, checkpoint))
    pyro.set_rng_seed(args.seed)  # seeds torch, numpy and random
    data = pv.load_dataset(args.dataset, args.data_dir, device=args.device)
    labelled, rows = choose_rows(data, args.num_labelled, args.num_unlabelled, args.seed)
    if args.alpha is None:
        args.alpha = paper_alpha(len(rows), len(labelled))
    config = model_config(args, data)
    pv.jobs.runs.check_model_size(config)
    m2 = cast(M2, build_model(config)).to(args.device)
    setup = prepare(args, data, m2, {})
    with claim_run_directory(
        args.out_dir, mode="overwrite" if args.overwrite else "new"
    ) as run_dir:
        return run_dir.guarded(prog, lambda: train(args, run_dir, m2, setup, {}))


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


def model_config(args: argparse.Namespace, data: pv.DataSplits) -> dict[str, Any]:
    """The checkpoint's config of M2 (the keyword arguments of :func:`build_m2`)."""
    return {
        "model": "m2",
        "data_dim": data.data_dim,
        "num_labels": len(data.class_names),
        "latent_dim": args.latent_dim,
        "alpha": float(args.alpha),
        "hidden_dims": list(args.hidden_dims),
        "image_shape": list(data.image_shape) if args.network == "conv" else None,
    }


def prepare(
    args: argparse.Namespace, data: pv.DataSplits, m2: M2, checkpoint: dict[str, Any]
) -> Setup:
    """The training rows, labels and test set of a run, checked; for a resumed run
    (``checkpoint`` given), also that they are the ones it trained on and scored."""
    labelled, rows = choose_rows(data, args.num_labelled, args.num_unlabelled, args.seed)
    if checkpoint:
        path = Path(args.out_dir) / pv.jobs.runs.CHECKPOINT
        recorded = checkpoint["labelled_indices"]
        if not isinstance(recorded, Tensor):
            raise ValueError(f"{path}: its labelled_indices is no tensor")
        if not torch.equal(recorded.cpu(), labelled):
            raise ValueError(
                f"{path}: its labelled subset is not the one labelled_subset draws from "
                f"{args.dataset} with seed {args.seed} now (have the data or the code changed?)"
            )
        labelled = recorded.cpu()
    x_test, _ = pv.jobs.runs.evaluation_sets(m2, data, args.seed)  # type: ignore[arg-type]
    if checkpoint and pv.jobs.runs.digest(x_test) != checkpoint.get("evaluation_digest"):
        raise ValueError(
            f"{Path(args.out_dir) / pv.jobs.runs.CHECKPOINT}: the test set rebuilt from "
            f"{args.dataset} is not the one this run scored (have the data files changed?)"
        )
    y_all = hide_labels(data.y_train.cpu(), labelled)
    x, y = data.x_train[rows.to(data.x_train.device)], y_all[rows].to(args.device)
    x_test = x_test.to(args.device, m2.dtype)
    # Data outside what M2 trains on, and labels it cannot take, are refused here, before
    # any file is written.
    m2.validate_data(x_test, "test data")
    m2.validate_data(x.to(m2.dtype), "training data", probabilities=True)
    m2.check_labels(data.y_test, len(data.y_test))
    m2.check_labels(y, len(x))
    # A resumed run goes on saving the config it was loaded from.
    config = checkpoint["config"] if checkpoint else model_config(args, data)
    return Setup(data, labelled, x, y, x_test, config)


def train(
    args: argparse.Namespace,
    run_dir: RunDirectory,
    m2: M2,
    setup: Setup,
    checkpoint: dict[str, Any],
) -> int:
    started = time.perf_counter()
    main_rank = distributed.ranks().is_main  # under torchrun, rank 0 alone shows and writes
    progress = False if args.no_progress or not main_rank else None
    data, x_test = setup.data, setup.x_test
    y_test = data.y_test.to(args.device)
    x_grey = data.x_test.to(args.device, m2.dtype)
    metrics, state = run_dir.resume_state(checkpoint)
    num_labelled = len(setup.labelled)
    network = "conv" if args.network == "conv" else f"MLP {args.hidden_dims}"
    cli.say(
        f"{args.dataset}: {num_labelled} labelled + {len(setup.x) - num_labelled} unlabelled "
        f"train / {len(x_test)} test examples of {data.data_dim} features, {m2.num_labels} "
        f"classes; M2 ({network}, latent {args.latent_dim}, alpha {m2.alpha:.3g}); "
        f"TraceEnum_ELBO with {args.num_particles} particle(s); device {args.device}; "
        f"writing to {run_dir.path}" + pv.jobs.runs.start_details(args.batch_size, state)
    )

    def after_epoch(epoch: int, history: pv.History) -> None:
        row: dict[str, Any] = {"epoch": epoch, "train_loss": history.loss[-1]}
        row["test_accuracy"] = m2.accuracy(x_test, y_test, batch_size=CHUNK)
        row["test_accuracy_grayscale"] = m2.accuracy(x_grey, y_test, batch_size=CHUNK)
        row["test_label_entropy"] = label_entropy(m2, x_test)
        row["test_elbo"] = unlabelled_elbo(m2, x_test, args.seed + epoch)
        row["seconds"] = history.epoch_seconds[-1]
        metrics.append(row)
        cli.say(
            f"epoch {epoch:>3}/{args.num_epochs}  loss {row['train_loss']:8.2f}  test accuracy "
            f"{row['test_accuracy']:.4f} (grayscale {row['test_accuracy_grayscale']:.4f})  "
            f"H(q(y|x)) {row['test_label_entropy']:.3f}  test ELBO {row['test_elbo']:8.2f}  "
            f"{row['seconds']:.2f}s"
        )

    distributed.seed_noise(args.seed)  # each rank its own z, from the model built alike
    pv.fit(
        m2,
        (setup.x, setup.y),
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        loss=m2.loss(num_particles=args.num_particles),
        clip_norm=args.clip_norm,
        callback=after_epoch,
        checkpoint=run_dir.checkpointer(
            m2,
            setup.config,
            metrics,
            args=pv.jobs.runs.run_arguments(args),
            evaluation_digest=pv.jobs.runs.digest(x_test),
            labelled_indices=setup.labelled,
        ),
        checkpoint_every=args.checkpoint_every,
        resume=state,
        progress=progress,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    )
    trained = time.perf_counter() - started

    if main_rank:
        write_figures(run_dir.path, m2, x_test, data, metrics, args.seed)
    final: dict[str, Any] = dict(metrics[-1])
    final["num_labelled"] = num_labelled
    final["num_unlabelled"] = len(setup.x) - num_labelled
    final["alpha"] = m2.alpha
    final["train_seconds"] = trained
    final["total_seconds"] = time.perf_counter() - started
    run_dir.write_json("final_metrics.json", final)
    cli.say(
        f"done in {final['total_seconds']:.0f}s ({trained:.0f}s training): test accuracy of "
        f"q(y|x) {final['test_accuracy']:.4f} with {num_labelled} labels; results in "
        f"{run_dir.path}"
    )
    return 0


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
    plots.plot_accuracy(metrics, m2.num_labels, directory / "accuracy.png")
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(SAMPLE_COLUMNS, m2.latent_dim, generator=generator).to(m2.device, m2.dtype)
    classes = torch.arange(m2.num_labels, device=m2.device)
    # Row k: class k under each column's z.
    y = classes.repeat_interleave(SAMPLE_COLUMNS)
    samples = m2.decode(z.repeat(m2.num_labels, 1), y)
    plots.plot_class_samples(samples, data.image_shape, data.class_names, directory / "samples.png")
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
        directory / "style_transfer.png",
    )
