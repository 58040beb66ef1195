#!/usr/bin/env python
"""Train a model, evaluate it, and write its results: the main job of pyro_vae.

    python scripts/train.py                       # a VAE on digits, offline, about a minute
    python scripts/train.py --dataset fashion-mnist --num-epochs 20 --latent-dim 50
    python scripts/train.py --prior vamp --encoder full-covariance --elbo iwae --out-dir runs/v
    python scripts/train.py --model m2 --num-labelled 100      # semi-supervised (M2)
    python scripts/train.py --model cvae --given-quadrants 2   # conditional completion (CVAE)

It reads like Pyro's examples: arguments, data, model, fit, evaluate, write. This file holds
the arguments; pyro_vae.jobs.runner runs every model kind through the same steps, and the
job module of each kind (pyro_vae.jobs.vae, .m2, .cvae) adds its own flags, scores and
figures. The run directory (--out-dir) holds checkpoint.pt (weights, the arguments that
rebuild the model, and the state that resumes it exactly), metrics.json and metrics.csv (a
row per epoch), final_metrics.json, and figures.
"""

from __future__ import annotations

import sys

PROG = "train.py"

try:  # torch and Pyro take a second or so to import: a Ctrl-C then is one line too
    import argparse
    from pathlib import Path

    import pyro_vae as pv
    from pyro_vae.infer import distributed
    from pyro_vae.jobs import JOBS, cli, tensorboard_log
    from pyro_vae.jobs.runner import train_main
    from pyro_vae.jobs.runs import ELBOS, RESUME_OVERRIDES
except KeyboardInterrupt:
    print(f"{PROG}: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Train a VAE, M2 or CVAE (a Pyro model and guide, by SVI) and write its "
        "checkpoint, metrics and figures.",
    )
    add = parser.add_argument
    add(
        "--model",
        choices=tuple(JOBS),
        default="vae",
        help="vae; m2: semi-supervised with enumerated labels; cvae: conditional, completes "
        "missing quadrants",
    )
    for name, job in JOBS.items():
        title = "model" if name == "vae" else f"--model {name}"
        job.add_arguments(parser.add_argument_group(title))
    cli.add_data_arguments(parser)
    add("--num-epochs", type=cli.positive_int, help="default: 200 for digits, 20 for the others")
    add(
        "--val-size",
        type=cli.non_negative_int,
        help="training rows held out, with --seed, to choose the epoch kept; the test set is "
        "scored once, at the end (default: 10000 for mnist and fashion-mnist, a tenth of the "
        "training rows otherwise; 0: no validation set, the last epoch is kept)",
    )
    add(
        "--patience",
        type=cli.positive_int,
        help="stop after this many epochs without a better validation score (default: train "
        "every epoch)",
    )
    add("--batch-size", type=cli.positive_int, default=128, help="examples per step")
    add("--learning-rate", type=cli.positive_float, default=1e-3, help="Adam's step size")
    add("--latent-dim", type=cli.positive_int, default=10, help="dimensions of z")
    add("--hidden-dims", type=cli.widths, help="MLP widths, comma-separated (default: 400)")
    add(
        "--num-iw-particles",
        type=cli.non_negative_int,
        default=100,
        help="K, importance samples of the final test log p(x) bound (0: skip it)",
    )
    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--elbo",
        choices=tuple(ELBOS),
        default="trace",
        help="trace: Trace_ELBO; meanfield: TraceMeanField_ELBO (closed-form KL where "
        "registered); iwae: RenyiELBO(alpha=0)",
    )
    objective.add_argument(
        "--num-particles", type=cli.positive_int, help="z per example and step (default 1; iwae 5)"
    )
    objective.add_argument("--beta", type=cli.positive_float, default=1.0, help="KL weight")
    objective.add_argument(
        "--kl-warmup-epochs",
        type=cli.non_negative_int,
        default=0,
        help="beta rises linearly from 0 to --beta over this many epochs",
    )
    add("--seed", type=cli.seed, default=0, help="seeds every random draw of the run")
    add("--out-dir", type=Path, help="where results go (default: runs/<dataset>)")
    add("--device", type=cli.device, default="auto", help="auto picks CUDA when present")
    add(
        "--num-threads",
        type=cli.num_threads,
        help="CPU threads (default: the faster of 1 and one per core, timed on a few steps "
        "of the run; a resumed run keeps its own)",
    )
    add(
        "--compile",
        nargs="?",
        choices=("auto", "on", "off"),
        const="on",
        default="auto",
        help="trace the training step once and compile it (torch.compile); auto: only when "
        "the run's steps pay back the compile, timed on its first eager steps (--compile "
        "alone: on); --elbo trace and meanfield, iwae runs eager",
    )
    add("--no-progress", action="store_true", help="hide the progress bars")
    tensorboard_log.add_argument(parser)
    faults = parser.add_argument_group("checkpoints and faults")
    faults.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help=f"continue the run in RUN_DIR (only {', '.join(RESUME_OVERRIDES)} may change)",
    )
    faults.add_argument("--overwrite", action="store_true", help="replace the run in --out-dir")
    faults.add_argument(
        "--checkpoint-every",
        type=cli.positive_int,
        metavar="STEPS",
        help="also checkpoint every this many steps (default: after each epoch)",
    )
    faults.add_argument("--clip-norm", type=cli.positive_float, help="clip the gradient norm")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if "--no-tensorboard" in args.given:  # the flag's other spelling sets the same argument
        args.given = (args.given - {"--no-tensorboard"}) | {"--tensorboard"}
    if args.resume is not None:
        fixed = sorted(args.given - {"--resume", *RESUME_OVERRIDES})
        if fixed:
            parser.error(
                f"--resume continues a run with its own arguments; {', '.join(fixed)} cannot "
                f"change (only {', '.join(RESUME_OVERRIDES)} can)"
            )
        if args.overwrite:
            parser.error("--resume and --overwrite exclude each other")
        return args
    # The defaults that depend on other arguments, and what the model refuses; then the flags
    # of another model's own group.
    job = JOBS[args.model]
    job.check_arguments(args, parser)
    for name, other in JOBS.items():
        theirs = sorted(args.given & set(other.OWN_FLAGS))
        if name != args.model and theirs:
            parser.error(f"{', '.join(theirs)} is for --model {name}")
    user_data = args.dataset not in pv.DATASET_NAMES
    if not user_data:
        for flag in sorted(args.given & {"--test-dataset", "--image-size", "--num-workers"}):
            parser.error(f"{flag} is for a --dataset given as a path, not {args.dataset}")
    # A path's run is named by its file or folder (runs/<name>), never by the path itself.
    data_name = Path(args.dataset).stem if user_data else args.dataset
    run_name = data_name if args.model == "vae" else f"{data_name}-{args.model}"
    args.out_dir = args.out_dir or Path("runs") / run_name
    args.num_epochs = args.num_epochs or (200 if args.dataset == "digits" else 20)
    return args


def run(argv: list[str] | None = None) -> int:
    """The command line: parse ``argv``, run, and turn bad input into one line and exit 2."""
    args = parse_args(argv)
    code = 1  # an error that escapes: under torchrun, this rank leaves the group at once
    try:
        code = train_main(args, PROG)
    except (ValueError, FileNotFoundError) as error:
        # On many processes each rank that fails says so (the error may be its own), and says
        # which it is.
        rank = distributed.process_rank()
        print(f"{PROG}: {f'rank {rank}: ' if rank else ''}error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # before training started: train() handles it after
        print(f"{PROG}: interrupted before training started; nothing was written", file=sys.stderr)
        code = 130
    finally:
        distributed.leave(finished=code == 0)
    return code


if __name__ == "__main__":
    cli.one_line_warnings(PROG)
    cli.configure_logging(PROG)
    sys.exit(run())
