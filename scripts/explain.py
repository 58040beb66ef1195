#!/usr/bin/env python
"""Explain a trained run: what its μ(x) and σ(x) are, measured on its own test set.

    python scripts/explain.py runs/digits        # writes runs/digits/explain/report.md

One section per question (per-example μ and σ; what each μ_i reads out; the reparameterization
cloud; the KL term three ways and two wrong formulas; the aggregate posterior against N(0, I);
active units), with its figures beside the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro

import pyro_vae as pv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import _OneLineParser, _positive_int, load_run_test_set  # scripts/ is not a package

PROG = "explain.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog=PROG,
        description="Write RUN_DIR/explain/report.md for a run of scripts/train.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out-dir", type=Path, default=None, help="default RUN_DIR/explain")
    parser.add_argument("--num-draws", type=_positive_int, default=2000, help="z per input")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    vae, _, data, x_test = load_run_test_set(args.run_dir)
    pyro.set_rng_seed(args.seed)
    out_dir = args.out_dir or args.run_dir / "explain"
    return pv.explain(
        vae,
        x_test,
        data.y_test,
        data.image_shape,
        data.class_names,
        out_dir,
        num_draws=args.num_draws,
    )


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = main(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(f"report written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
