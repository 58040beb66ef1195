#!/usr/bin/env python
"""Explain a trained run: what its μ(x) and σ(x) are, measured on its own test set.

    python scripts/explain.py runs/digits        # writes runs/digits/explain/report.md

One section per question (per-example μ and σ; what each μ_i reads out; the reparameterization
cloud; the KL term three ways, with one wrong formula and one wrong reparameterization; the
aggregate posterior against N(0, I); active units), with its figures beside the report.
A run of --model m2 gets q(y|x)'s confusion matrix and entropy, with μ and σ of q(z|x,y) at the
most probable y; a run of --model cvae the spread of its completions per condition, with μ and
σ of q(z|x,c) (pyro_vae.explain.explain_m2, explain_cvae). The run's model kind chooses its
job (pyro_vae.jobs.vae, .m2, .cvae), which writes the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro

from pyro_vae.explain import OUTPUT_FILES
from pyro_vae.infer import distributed
from pyro_vae.jobs import JOBS, RUN_FILES, cli, load_run
from pyro_vae.jobs.run_directory import EXPLAIN_DIR, RunDirectory

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
        with RunDirectory.claim(args.run_dir, mode="existing", files=RUN_FILES):
            loaded = load_run(args.run_dir)
            pyro.set_rng_seed(args.seed)
            report = JOBS[loaded.kind].explain(loaded, out_dir, args.num_particles)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    chosen = loaded.selection
    epoch = (
        f"epoch {chosen['epoch']}, {chosen['how']}"
        if chosen is not None
        else f"epoch {loaded.checkpoint['epoch']}, the newest checkpoint"
    )
    cli.say(f"report of {epoch}, written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
