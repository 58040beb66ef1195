#!/usr/bin/env python
"""Evaluate a trained run: the test-set metrics behind "what do μ and σ do", as JSON and a table.

    python scripts/evaluate.py runs/digits                    # K = 1000 importance samples
    python scripts/evaluate.py runs/fashion-mnist --num-iw-particles 5000

Reads the run with pv.load_run (the model and the very test set the run scored) and writes
RUN_DIR/evaluation.json:

- the test ELBO with its reconstruction and KL terms (nats per example);
- the importance-weighted bound on log p(x) with K samples, in chunks of bounded memory;
- the KL per latent dimension and the active units (Cov_x E_q[z_i] > 0.01);
- the average KL split into I(x; z) and KL(q(z) ‖ p(z)) (Hoffman & Johnson 2016);
- all of it per class as well, from the dataset's labels;
- where it came from: the checkpoint's epoch and step, the seed and K.

An M2 run (--model m2) gets instead the test accuracy of q(y|x) on the binarized test set
(what M2 trains on) and on the grayscale one, the confusion matrix of its most probable class
against the labels, the mean entropy of q(y|x) (per class too) and the test ELBO of log p(x)
with y summed out. A CVAE run (--model cvae) gets the test negative log-likelihood of the
missing pixels, -log p(x | c), importance-sampled with K draws for the CVAE and exact for its
baseline (baseline.pt), their standard errors and the paired difference, and how much the
CVAE's completions vary per condition (the spread of the likelihood's mean over draws of z).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from torch import Tensor

import pyro_vae as pv
from pyro_vae.infer import distributed
from pyro_vae.jobs import cli
from pyro_vae.jobs import cvae as conditional_job
from pyro_vae.jobs import m2 as semisupervised_job
from pyro_vae.jobs.runs import RunDirectory
from pyro_vae.models.cvae import ConditionalBaseline
from pyro_vae.models.cvae_estimators import conditional_log_likelihood, sample_spread
from pyro_vae.models.masks import quadrant_mask

PROG = "evaluate.py"
# Draws of z per condition for the spread of a CVAE's completions, and conditions per pass.
SPREAD_SAMPLES, SPREAD_CHUNK = 100, 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog=PROG, description="Evaluate a run of scripts/train.py.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--num-iw-particles", type=cli.positive_int, default=1000, help="K for log p(x)"
    )
    parser.add_argument(
        "--num-particles", type=cli.positive_int, default=10, help="draws of z for the ELBO"
    )
    parser.add_argument(
        "--chunk-size",
        type=cli.positive_int,
        default=4096,
        help="(example, particle) rows per pass of log p(x): bounds memory",
    )
    parser.add_argument(
        "--max-examples", type=cli.positive_int, help="evaluate the first N test examples only"
    )
    parser.add_argument("--seed", type=cli.seed, default=0, help="seeds the Monte-Carlo draws")
    parser.add_argument("--num-threads", type=cli.num_threads, help="CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def stage_printer() -> Callable[[str], None]:
    """A line per stage, with the seconds since the start: some take minutes on big data."""
    started = time.perf_counter()

    def stage(text: str) -> None:
        cli.say(f"[{time.perf_counter() - started:6.1f}s] {text}")

    return stage


def provenance(
    directory: Path, run_args: dict, checkpoint: dict, model: str, args: argparse.Namespace
) -> dict:
    """Where the numbers came from: the run, its dataset, the checkpoint's bytes and the test
    set's digest (the numbers belong to these exactly), the epoch and step, and the seed."""
    return {
        "run": str(directory),
        "dataset": run_args["dataset"],
        "checkpoint_sha256": hashlib.sha256(
            (directory / pv.jobs.runs.CHECKPOINT).read_bytes()
        ).hexdigest(),
        "test_set_sha256": checkpoint["evaluation_digest"],
        "epoch": checkpoint["epoch"],
        "step": checkpoint["step"],
        "model": model,
        "seed": args.seed,
    }


def evaluate(run: pv.Run, args: argparse.Namespace) -> dict:
    vae, x_test, labels = run.vae, run.x_test, run.data.y_test
    if args.max_examples is not None:
        x_test, labels = x_test[: args.max_examples], labels[: args.max_examples]
    pyro.set_rng_seed(args.seed)
    progress = False if args.no_progress else None
    stage = stage_printer()

    stage(f"ELBO of {len(x_test)} test examples, {args.num_particles} particles")
    terms = pv.elbo_terms(vae, x_test, num_particles=args.num_particles)
    stage(f"log p(x), K={args.num_iw_particles}")
    log_px = pv.log_likelihood(
        vae, x_test, args.num_iw_particles, chunk_size=args.chunk_size, progress=progress
    )
    result: dict = {
        "run": str(run.directory),
        "dataset": run.args["dataset"],
        # Which checkpoint and which test set, exactly: the numbers belong to these bytes.
        "checkpoint_sha256": hashlib.sha256(
            (run.directory / pv.jobs.runs.CHECKPOINT).read_bytes()
        ).hexdigest(),
        "test_set_sha256": run.checkpoint["evaluation_digest"],
        "epoch": run.checkpoint["epoch"],
        "step": run.checkpoint["step"],
        "model": pv.models.build.describe(run.config),
        "seed": args.seed,
        "num_examples": len(x_test),
        "num_particles": args.num_particles,
        "num_iw_particles": args.num_iw_particles,
        "test_elbo": terms.elbo.mean().item(),
        "test_reconstruction": terms.reconstruction.mean().item(),
        "test_kl": terms.kl.mean().item(),
        "test_log_likelihood": log_px.mean().item(),
    }
    stage("active units and KL per dimension")
    units = pv.active_units(vae, x_test)
    result["active_units"] = units.num_active
    result["latent_dim"] = vae.latent_dim
    result["mean_variance_per_dimension"] = units.variance.tolist()
    try:
        result["kl_per_dimension"] = pv.kl_per_dimension(vae, x_test).mean(0).tolist()
    except ValueError as error:
        result["kl_per_dimension"] = None
        result["kl_per_dimension_note"] = str(error)
    stage("KL decomposition")
    try:
        decomposition = pv.kl_decomposition(
            vae, x_test, num_particles=args.num_particles, progress=progress
        )
        result.update({f"kl_decomposition_{k}": v for k, v in decomposition._asdict().items()})
    except ValueError as error:
        result["kl_decomposition_note"] = str(error)
    result["per_class"] = {
        run.data.class_names[int(label)]: {
            "count": int(mask.sum()),
            "elbo": terms.elbo[mask].mean().item(),
            "kl": terms.kl[mask].mean().item(),
            "log_likelihood": log_px[mask].mean().item(),
        }
        for label in labels.unique()
        for mask in [labels == label]
    }
    stage("done")
    return result


def table(result: dict) -> str:
    lines = [
        f"{result['run']} (epoch {result['epoch']}; {result['model']}), "
        f"{result['num_examples']} test examples, nats per example",
        f"  ELBO {result['test_elbo']:.2f} = reconstruction {result['test_reconstruction']:.2f}"
        f" - KL {result['test_kl']:.2f}",
        f"  log p(x) >= {result['test_log_likelihood']:.2f} (K={result['num_iw_particles']})",
        f"  active units {result['active_units']} of {result['latent_dim']} "
        "(Cov_x E_q[z_i] > 0.01: the mean moves with x)",
    ]
    if result.get("kl_per_dimension") is not None:
        per_dim = ", ".join(f"{v:.2f}" for v in result["kl_per_dimension"])
        lines.append(f"  KL per dimension: {per_dim}")
    if "kl_decomposition_mutual_information" in result:
        lines.append(
            f"  average KL {result['kl_decomposition_average_kl']:.2f} = I(x;z) "
            f"{result['kl_decomposition_mutual_information']:.2f} + KL(q(z)||p(z)) "
            f"{result['kl_decomposition_marginal_kl']:.2f}"
        )
    lines.append(f"  {'class':<14}{'count':>7}{'ELBO':>10}{'KL':>8}{'log p(x)':>10}")
    for name, row in result["per_class"].items():
        lines.append(
            f"  {name:<14}{row['count']:>7}{row['elbo']:>10.2f}{row['kl']:>8.2f}"
            f"{row['log_likelihood']:>10.2f}"
        )
    return "\n".join(lines)


@torch.no_grad()
def evaluate_m2(run: semisupervised_job.Run, directory: Path, args: argparse.Namespace) -> dict:
    m2, data = run.m2, run.data
    x_test, x_grey, labels = run.x_test, data.x_test.to(m2.dtype), data.y_test
    if args.max_examples is not None:
        n = args.max_examples
        x_test, x_grey, labels = x_test[:n], x_grey[:n], labels[:n]
    pyro.set_rng_seed(args.seed)
    stage = stage_printer()
    num_labels = m2.num_labels
    result = provenance(directory, run.args, run.checkpoint, describe_m2(run.config), args)
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
    result["test_elbo"] = semisupervised_job.unlabelled_elbo(
        m2, x_test, args.seed, num_particles=args.num_particles
    )
    result["per_class"] = {
        data.class_names[int(label)]: {
            "count": int(mask.sum()),
            "accuracy": (guessed[mask] == label).double().mean().item(),
            "label_entropy": entropy[mask].mean().item(),
        }
        for label in labels.unique()
        for mask in [labels == label]
    }
    stage("done")
    return result


@torch.no_grad()
def evaluate_cvae(run: conditional_job.Run, directory: Path, args: argparse.Namespace) -> dict:
    cvae, data = run.cvae, run.data
    if not (directory / conditional_job.BASELINE).is_file():
        raise ValueError(
            f"{directory}: no {conditional_job.BASELINE} there: the run stopped before its "
            "baseline was trained (finish it with scripts/train.py --resume)"
        )
    baseline, _ = pv.load_checkpoint(directory / conditional_job.BASELINE)
    if not isinstance(baseline, ConditionalBaseline):
        raise ValueError(f"{directory / conditional_job.BASELINE}: not the CVAE's baseline")
    mask = quadrant_mask(data.image_shape, run.args["given_quadrants"])
    x, c = conditional_job._split(cvae, run.x_test, data.x_test, mask, "test data")
    labels = data.y_test
    if args.max_examples is not None:
        x, c, labels = x[: args.max_examples], c[: args.max_examples], labels[: args.max_examples]
    pyro.set_rng_seed(args.seed)
    progress = False if args.no_progress else None
    stage = stage_printer()
    result = provenance(directory, run.args, run.checkpoint, describe_cvae(run.config), args)
    result.update(
        baseline_sha256=hashlib.sha256(
            (directory / conditional_job.BASELINE).read_bytes()
        ).hexdigest(),
        given_quadrants=run.args["given_quadrants"],
        num_examples=len(x),
        num_missing_pixels=x.shape[1],
        num_iw_particles=args.num_iw_particles,
    )
    stage(f"-log p(missing | given) of {len(x)} test images, CVAE with K={args.num_iw_particles}")
    cvae_nll = -conditional_log_likelihood(
        cvae, x, c, args.num_iw_particles, chunk_size=args.chunk_size, progress=progress
    )
    stage("-log p(missing | given), baseline (exact)")
    baseline_nll = -conditional_log_likelihood(baseline, x, c, 1, chunk_size=args.chunk_size)
    for name, values in (
        ("test_nll", cvae_nll),
        ("baseline_test_nll", baseline_nll),
        # Paired: the same images, so the images' own difficulty cancels.
        ("test_nll_difference", baseline_nll - cvae_nll),
    ):
        result[name] = values.mean().item()
        result[f"{name}_se"] = (values.std() / math.sqrt(len(values))).item()
    stage(f"spread of CVAE completions, {SPREAD_SAMPLES} draws of z per condition")
    spread = torch.cat(
        [sample_spread(cvae, chunk, SPREAD_SAMPLES) for chunk in c.split(SPREAD_CHUNK)]
    )
    result["spread_num_samples"] = SPREAD_SAMPLES
    result["sample_spread"] = summary(spread)
    result["per_class"] = {
        data.class_names[int(label)]: {
            "count": int(mask.sum()),
            "nll": cvae_nll[mask].mean().item(),
            "baseline_nll": baseline_nll[mask].mean().item(),
            "sample_spread": spread[mask].mean().item(),
        }
        for label in labels.unique()
        for mask in [labels == label]
    }
    stage("done")
    return result


def summary(values: Tensor) -> dict[str, float]:
    """The mean, standard deviation and quartiles of per-condition values."""
    values = values.double()
    quartiles = torch.quantile(values, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).double())
    return {
        "mean": values.mean().item(),
        "std": values.std().item() if len(values) > 1 else 0.0,
        **dict(zip(("min", "q25", "median", "q75", "max"), quartiles.tolist(), strict=True)),
    }


def describe_m2(config: dict) -> str:
    return (
        f"M2, latent {config['latent_dim']}, hidden {config['hidden_dims']}, "
        f"{'conv' if config.get('image_shape') else 'MLP'}, alpha {config['alpha']:.3g}"
    )


def describe_cvae(config: dict) -> str:
    return f"CVAE, latent {config['latent_dim']}, hidden {config['hidden_dims']}"


def table_m2(result: dict) -> str:
    names = result["class_names"]
    lines = [
        f"{result['run']} (epoch {result['epoch']}; {result['model']}), "
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


def table_cvae(result: dict) -> str:
    spread = result["sample_spread"]
    lines = [
        f"{result['run']} (epoch {result['epoch']}; {result['model']}; "
        f"{result['given_quadrants']} quadrant(s) given), {result['num_examples']} test images, "
        f"-log p(missing | given) in nats per image",
        f"  CVAE     {result['test_nll']:8.2f} ± {result['test_nll_se']:.2f} "
        f"(K={result['num_iw_particles']})",
        f"  baseline {result['baseline_test_nll']:8.2f} ± {result['baseline_test_nll_se']:.2f} "
        "(exact)",
        f"  baseline - CVAE {result['test_nll_difference']:.2f} ± "
        f"{result['test_nll_difference_se']:.2f} (paired)",
        f"  spread of CVAE completions per condition ({result['spread_num_samples']} draws): "
        f"mean {spread['mean']:.4f}, median {spread['median']:.4f}, "
        f"range {spread['min']:.4f}-{spread['max']:.4f}",
        f"  {'class':<14}{'count':>7}{'CVAE':>10}{'baseline':>10}{'spread':>9}",
    ]
    for name, row in result["per_class"].items():
        lines.append(
            f"  {name:<14}{row['count']:>7}{row['nll']:>10.2f}{row['baseline_nll']:>10.2f}"
            f"{row['sample_spread']:>9.4f}"
        )
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.set_num_threads(args.num_threads)
    if distributed.launched_by_torchrun():
        # Its ranks would compete for the run directory's lock, and the work is small.
        print(f"{PROG}: error: it runs on one process; start it without torchrun", file=sys.stderr)
        return 2
    try:
        with RunDirectory.claim(args.run_dir, mode="existing") as run_dir:
            loaded = pv.load_run(args.run_dir)
            if isinstance(loaded, semisupervised_job.Run):
                result, show = evaluate_m2(loaded, args.run_dir, args), table_m2
            elif isinstance(loaded, conditional_job.Run):
                result, show = evaluate_cvae(loaded, args.run_dir, args), table_cvae
            else:
                result, show = evaluate(loaded, args), table
            run_dir.write_json("evaluation.json", result)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    cli.say(show(result))
    cli.say(f"written to {args.run_dir / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
