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
# A latent dimension carrying less KL than this (nats) carries little information, active or not.
LITTLE_KL = 0.1

try:  # torch and Pyro take a second or so to import: a Ctrl-C then is one line too
    import argparse
    from pathlib import Path
    from typing import Any

    from pyro_vae import data as datasets
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
            cli.say(f"{args.run_dir}: a {loaded.kind} run of {data_source(loaded.args)}")
            result = job.evaluate(loaded, args)
            run_dir.write_json("evaluation.json", result)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    cli.say(job.table(result))
    for note in notes(result):
        cli.say(note)
    cli.say(f"written to {args.run_dir / 'evaluation.json'}")
    wall = cli.wall_seconds()
    cli.say(f"done in {wall:.0f}s of wall time (the process's whole life: imports, data)")
    return 0


def data_source(run_args: dict[str, Any]) -> str:
    """The run's dataset and the directory (or file) its data were read from."""
    name, data_dir = run_args["dataset"], run_args.get("data_dir")
    if name not in datasets.DATASET_NAMES:
        return f"{name} (your own data; read from that path)"
    if name == "digits":
        return "digits (scikit-learn's bundled copy)"
    if data_dir is not None:
        return f"{name} from {data_dir}"
    # Where pyro_vae.data looks when no --data-dir is given: Debian's files, then the cache.
    class_name, system_dir = datasets._TORCHVISION_SOURCES[name]
    search = [*([] if system_dir is None else [system_dir])]
    search.append(datasets._cache_dir() / class_name / "raw")
    found = datasets._find_idx_files(search)
    return f"{name} from {Path(next(iter(found.values()))).parent if found else search[-1]}"


def notes(result: dict[str, Any]) -> list[str]:
    """What a VAE evaluation's numbers mean where readers asked: the two KL values, and what
    "active" does and does not say."""
    lines = []
    per_dim = result.get("kl_per_dimension")
    if "kl_decomposition_average_kl" in result:
        exact = (
            f"; the KL per dimension is in closed form, and its sum, {sum(per_dim):.2f}, is "
            "the value both estimate"
            if per_dim is not None
            else ""
        )
        lines.append(
            f"note: the ELBO's KL {result['test_kl']:.2f} and the average KL "
            f"{result['kl_decomposition_average_kl']:.2f} are two Monte-Carlo estimates of one "
            "number, the mean of KL(q(z|x) || p(z)) over the test set, from independent draws "
            f"({result['num_particles']} per example each): they differ by noise (standard "
            f"error of the second {result['kl_decomposition_average_kl_se']:.2f}){exact}"
        )
    if per_dim is not None and "active_units" in result:
        little = [f"z_{i + 1}" for i, kl in enumerate(per_dim) if kl < LITTLE_KL]
        carry = "carries" if len(little) == 1 else "carry"
        lines.append(
            "note: 'active' (Cov_x E_q[z_i] > 0.01) counts the dimensions whose mean moves with "
            "x at all; it says nothing of how much a dimension carries, which its KL bounds: "
            + (
                f"{len(little)} of {result['latent_dim']} {carry} under {LITTLE_KL} nats each "
                f"({', '.join(little)})"
                if little
                else f"here each carries at least {LITTLE_KL} nats"
            )
        )
    return lines


if __name__ == "__main__":
    cli.one_line_warnings(PROG)
    cli.configure_logging(PROG)
    sys.exit(run())
