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
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import pyro

import pyro_vae as pv
from pyro_vae import cli
from pyro_vae.runs import RunDirectory

PROG = "evaluate.py"


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


def evaluate(run: pv.Run, args: argparse.Namespace) -> dict:
    vae, x_test, labels = run.vae, run.x_test, run.data.y_test
    if args.max_examples is not None:
        x_test, labels = x_test[: args.max_examples], labels[: args.max_examples]
    pyro.set_rng_seed(args.seed)
    progress = False if args.no_progress else None
    started = time.perf_counter()

    def stage(text: str) -> None:  # a line per stage: some take minutes on big data
        cli.say(f"[{time.perf_counter() - started:6.1f}s] {text}")

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
            (run.directory / pv.runs.CHECKPOINT).read_bytes()
        ).hexdigest(),
        "test_set_sha256": run.checkpoint["evaluation_digest"],
        "epoch": run.checkpoint["epoch"],
        "step": run.checkpoint["step"],
        "model": pv.build.describe(run.config),
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


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.set_num_threads(args.num_threads)
    try:
        with RunDirectory.claim(args.run_dir, mode="existing") as run_dir:
            result = evaluate(pv.load_run(args.run_dir), args)
            run_dir.write_json("evaluation.json", result)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    cli.say(table(result))
    cli.say(f"written to {args.run_dir / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
