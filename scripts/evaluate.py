#!/usr/bin/env python
"""Evaluate a trained run: the test-set metrics behind "what do μ and σ do", as JSON and a table.

    python scripts/evaluate.py runs/digits                    # K = 1000 importance samples
    python scripts/evaluate.py runs/fashion-mnist --num-iw-samples 5000

Reads RUN_DIR/checkpoint.pt (written by scripts/train.py), rebuilds the test set exactly as the
run saw it, and writes RUN_DIR/evaluation.json:

- the test ELBO with its reconstruction and KL terms (nats per example);
- the importance-weighted bound on log p(x) with K samples, in chunks of bounded memory;
- the KL per latent dimension and the active units (Cov_x E_q[z_i] > 0.01);
- the average KL split into I(x; z) and KL(q(z) ‖ p(z)) (Hoffman & Johnson 2016);
- all of it per class as well, from the dataset's labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyro

import pyro_vae as pv
from pyro_vae._files import atomic_write

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import _OneLineParser, _positive_int, load_run_test_set  # scripts/ is not a package

PROG = "evaluate.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog=PROG,
        description="Evaluate a run of scripts/train.py on its test set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--num-iw-samples", type=_positive_int, default=1000, help="K for log p(x)")
    parser.add_argument(
        "--num-particles", type=_positive_int, default=10, help="draws of z for the ELBO"
    )
    parser.add_argument(
        "--max-examples", type=_positive_int, default=None, help="evaluate the first N only"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the Monte-Carlo draws")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    vae, payload, data, x_test = load_run_test_set(args.run_dir)
    vae.eval()
    labels = data.y_test
    if args.max_examples is not None:
        x_test, labels = x_test[: args.max_examples], labels[: args.max_examples]
    vae.validate_data(x_test, "test data")
    pyro.set_rng_seed(args.seed)
    progress = False if args.no_progress else None

    terms = pv.elbo_terms(vae, x_test, num_particles=args.num_particles)
    log_px = pv.log_likelihood(vae, x_test, args.num_iw_samples, progress=progress)
    result: dict = {
        "run": str(args.run_dir),
        "epoch": payload.get("epoch"),
        "model": pv.build.describe(payload["config"]),
        "num_examples": len(x_test),
        "num_iw_samples": args.num_iw_samples,
        "test_elbo": terms.elbo.mean().item(),
        "test_reconstruction": terms.reconstruction.mean().item(),
        "test_kl": terms.kl.mean().item(),
        "test_log_likelihood": log_px.mean().item(),
    }
    units = pv.active_units(vae, x_test)
    result["active_units"] = units.count
    result["latent_dim"] = vae.latent_dim
    result["mean_variance_per_dimension"] = units.variance.tolist()
    try:
        result["kl_per_dimension"] = pv.kl_per_dimension(vae, x_test).mean(0).tolist()
    except ValueError as error:
        result["kl_per_dimension"] = None
        result["kl_per_dimension_note"] = str(error)
    try:
        decomposition = pv.kl_decomposition(
            vae, x_test, num_samples=args.num_particles, progress=progress
        )
        result.update({f"kl_decomposition_{k}": v for k, v in decomposition._asdict().items()})
    except ValueError as error:
        result["kl_decomposition_note"] = str(error)
    result["per_class"] = {
        data.class_names[int(label)]: {
            "count": int(mask.sum()),
            "elbo": terms.elbo[mask].mean().item(),
            "kl": terms.kl[mask].mean().item(),
            "log_likelihood": log_px[mask].mean().item(),
        }
        for label in labels.unique()
        for mask in [labels == label]
    }
    return result


def table(result: dict) -> str:
    lines = [
        f"{result['run']} (epoch {result['epoch']}; {result['model']}), "
        f"{result['num_examples']} test examples, nats per example",
        f"  ELBO {result['test_elbo']:.2f} = reconstruction {result['test_reconstruction']:.2f}"
        f" - KL {result['test_kl']:.2f}",
        f"  log p(x) >= {result['test_log_likelihood']:.2f} (K={result['num_iw_samples']})",
        f"  active units {result['active_units']} of {result['latent_dim']}",
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


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    with atomic_write(args.run_dir / "evaluation.json", "w") as file:
        file.write(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"written to {args.run_dir / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
