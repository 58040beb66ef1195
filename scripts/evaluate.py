#!/usr/bin/env python
"""Evaluate a trained run: the test-set metrics behind "what do μ and σ do", as JSON and a table.

    python scripts/evaluate.py runs/digits                    # K = 1000 importance samples
    python scripts/evaluate.py runs/fashion-mnist --num-iw-particles 5000

Reads the run with pyro_vae.jobs.load_run (the model and the very test set the run scored),
hands it to its model kind's job (pyro_vae.jobs.vae, .m2, .cvae) and writes
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

import sys

PROG = "evaluate.py"

try:  # torch and Pyro take a second or so to import: a Ctrl-C then is one line too
    import argparse
    from pathlib import Path

    from pyro_vae.infer import distributed
    from pyro_vae.jobs import JOBS, RUN_FILES, cli, load_run
    from pyro_vae.jobs.run_directory import RunDirectory
except KeyboardInterrupt:
    print(f"{PROG}: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


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


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.set_num_threads(args.num_threads)
    if distributed.launched_by_torchrun():
        # Its ranks would compete for the run directory's lock, and the work is small.
        print(f"{PROG}: error: it runs on one process; start it without torchrun", file=sys.stderr)
        return 2
    try:
        with RunDirectory.claim(args.run_dir, mode="existing", files=RUN_FILES) as run_dir:
            loaded = load_run(args.run_dir)
            job = JOBS[loaded.kind]
            result = job.evaluate(loaded, args)
            run_dir.write_json("evaluation.json", result)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    cli.say(job.table(result))
    cli.say(f"written to {args.run_dir / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    cli.one_line_warnings(PROG)
    sys.exit(run())
