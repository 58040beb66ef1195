#!/usr/bin/env python
"""Explain a trained run: what its μ(x) and σ(x) are, measured on its own test set.

    python scripts/explain.py runs/digits        # writes runs/digits/explain/report.md

One section per question (per-example μ and σ; what each μ_i reads out; the reparameterization
cloud; the KL term three ways, with one wrong formula and one wrong reparameterization; the
aggregate posterior against N(0, I); active units), with its figures beside the report.
A run of --model m2 gets q(y|x)'s confusion matrix and entropy, with μ and σ of q(z|x,y) at the
most probable y; a run of --model cvae the spread of its completions per condition, with μ and
σ of q(z|x,c) (pyro_vae.explain.explain_m2, explain_cvae).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
from torch import Tensor

import pyro_vae as pv
from pyro_vae.explain import OUTPUT_FILES
from pyro_vae.infer import distributed
from pyro_vae.jobs import cli
from pyro_vae.jobs import cvae as conditional_job
from pyro_vae.jobs import m2 as semisupervised_job
from pyro_vae.jobs.runs import EXPLAIN_DIR, RunDirectory
from pyro_vae.models.masks import quadrant_mask, split_by_mask

PROG = "explain.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog=PROG, description="Write RUN_DIR/explain/report.md for a run of scripts/train.py."
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out-dir", type=Path, help=f"default: RUN_DIR/{EXPLAIN_DIR}")
    parser.add_argument(
        "--num-particles",
        type=cli.positive_int,
        default=2000,
        help="draws per input: of z for a VAE, of completions for a CVAE (M2: none)",
    )
    parser.add_argument("--seed", type=cli.seed, default=0, help="seeds the draws of z")
    parser.add_argument("--num-threads", type=cli.num_threads, help="CPU threads")
    return parser.parse_args(argv)


def check_out_dir(out_dir: Path) -> None:
    """The report may replace an earlier report, whole or interrupted, never someone else's
    files; the temporary files of an interrupted write go."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a directory for the report")
    if not out_dir.is_dir():
        return
    ours = set(OUTPUT_FILES)
    leftovers = [p for p in out_dir.iterdir() if p.name.startswith(".") and
                 p.name[1:].rsplit(".", 1)[0] in ours]  # fmt: skip
    theirs = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and p not in leftovers)
    if theirs:
        raise ValueError(
            f"{out_dir} holds files that explain.py did not write ({', '.join(theirs[:3])}"
            f"{', ...' if len(theirs) > 3 else ''}); choose an empty or new directory"
        )
    for leftover in leftovers:
        leftover.unlink()


def write_report(run_dir: Path, out_dir: Path, num_particles: int, seed: int) -> Path:
    """The report of the run in ``run_dir``: the run object load_run gives tells the model."""
    loaded = pv.load_run(run_dir)
    data = loaded.data
    if isinstance(loaded, semisupervised_job.Run):
        pyro.set_rng_seed(seed)
        return pv.explain(
            loaded.m2, loaded.x_test, data.y_test, data.image_shape, data.class_names, out_dir
        )
    if isinstance(loaded, conditional_job.Run):
        x, c = cvae_parts(loaded)
        pyro.set_rng_seed(seed)
        return pv.explain(
            loaded.cvae,
            x,
            data.y_test,
            data.image_shape,
            data.class_names,
            out_dir,
            num_particles=num_particles,
            condition=c,
        )
    pyro.set_rng_seed(seed)
    return pv.explain(
        loaded.vae,
        loaded.x_test,
        data.y_test,
        data.image_shape,
        data.class_names,
        out_dir,
        num_particles=num_particles,
    )


def cvae_parts(cvae_run: conditional_job.Run) -> tuple[Tensor, Tensor]:
    """(x, c) of the test set as the CVAE run scores them: the missing pixels of its
    evaluation images, the given pixels of the grayscale images."""
    cvae = cvae_run.cvae
    mask = quadrant_mask(cvae_run.data.image_shape, cvae_run.args["given_quadrants"])
    x, _ = split_by_mask(cvae_run.x_test.to(cvae.dtype), mask)
    _, c = split_by_mask(cvae_run.data.x_test.to(cvae.dtype), mask)
    return x, c


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.set_num_threads(args.num_threads)
    if distributed.launched_by_torchrun():
        # Its ranks would compete for the run directory's lock, and the work is small.
        print(f"{PROG}: error: it runs on one process; start it without torchrun", file=sys.stderr)
        return 2
    out_dir = args.out_dir or args.run_dir / EXPLAIN_DIR
    try:
        check_out_dir(out_dir)
        with RunDirectory.claim(args.run_dir, mode="existing"):
            report = write_report(args.run_dir, out_dir, args.num_particles, args.seed)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    cli.say(f"report written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
