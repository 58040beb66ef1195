#!/usr/bin/env python
"""Train a model, evaluate it, and write its results: the main job of pyro_vae.

    python scripts/train.py                       # a VAE on digits, offline, about a minute
    python scripts/train.py --dataset fashion-mnist --num-epochs 20 --latent-dim 50
    python scripts/train.py --prior vamp --encoder full-covariance --elbo iwae --out-dir runs/v
    python scripts/train.py --model m2 --num-labelled 100      # semi-supervised (M2)
    python scripts/train.py --model cvae --given-quadrants 2   # conditional completion (CVAE)

It reads like Pyro's examples: arguments, data, model, fit, evaluate, write. --model m2 and cvae
run their own jobs (pyro_vae.jobs.m2, pyro_vae.jobs.cvae) through the same
steps. The run directory (--out-dir) and its format are pyro_vae.jobs.runs': checkpoint.pt (weights,
the arguments that rebuild the model, and the state that resumes it exactly), metrics.json and
metrics.csv (a row per epoch), final_metrics.json, and figures: for a VAE reconstructions.png,
samples.png, latent_space.png, loss_curves.png (and weight_uncertainty.png for a Bayesian
decoder); for M2 accuracy.png, samples.png, style_transfer.png; for the CVAE completions.png,
with the baseline's weights in baseline.pt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import torch

import pyro_vae as pv
from pyro_vae import plots
from pyro_vae.infer import distributed
from pyro_vae.jobs import cli
from pyro_vae.jobs import cvae as conditional_job
from pyro_vae.jobs import m2 as semisupervised_job
from pyro_vae.jobs.runs import ELBOS, RunDirectory, claim_run_directory

PROG = "train.py"
# The models other than the VAE, each with its flags and its main job.
JOBS = {"m2": semisupervised_job, "cvae": conditional_job}
# What a resumed run may change: nothing that alters the model or the maths.
RESUME_OVERRIDES = ("--num-epochs", "--no-progress", "--checkpoint-every", "--num-threads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Train a VAE, M2 or CVAE (a Pyro model and guide, by SVI) and write its "
        "checkpoint, metrics and figures.",
    )
    add = parser.add_argument
    add(
        "--model",
        choices=("vae", *JOBS),
        default="vae",
        help="vae; m2: semi-supervised with enumerated labels; cvae: conditional, completes "
        "missing quadrants",
    )
    for name, job in JOBS.items():
        job.add_arguments(parser.add_argument_group(f"--model {name}"))
    add("--dataset", choices=pv.DATASET_NAMES, default="digits", help="digits is always offline")
    add(
        "--data-dir",
        type=Path,
        help="directory with the dataset's IDX files (default: Debian's files, then the cache "
        "~/.cache/pyro_vae)",
    )
    add("--num-epochs", type=cli.positive_int, help="default: 200 for digits, 20 for the others")
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
    parts = parser.add_argument_group("model", "each part is one flag (pv.build_vae)")
    parts.add_argument("--prior", choices=pv.PRIOR_NAMES, default="standard-normal", help="p(z)")
    parts.add_argument("--encoder", choices=pv.ENCODER_NAMES, default="diagonal", help="q(z|x)")
    parts.add_argument(
        "--likelihood", choices=pv.LIKELIHOOD_NAMES, default="bernoulli", help="p(x|z)"
    )
    parts.add_argument(
        "--network",
        choices=pv.NETWORK_NAMES,
        default="mlp",
        help="the architecture of encoder and decoder alike (conv: fixed layers, no --hidden-dims)",
    )
    parts.add_argument(
        "--decoder",
        choices=pv.DECODER_NAMES,
        default="deterministic",
        help="bayesian: a Normal prior on the decoder's weights, fitted by a mean-field guide",
    )
    parts.add_argument(
        "--prior-scale", type=cli.positive_float, help="weight prior's std (bayesian; default 1)"
    )
    parts.add_argument(
        "--num-components",
        type=cli.positive_int,
        help="mixture components (default 10) or VampPrior pseudo-inputs (default 100)",
    )
    parts.add_argument("--flow-depth", type=cli.positive_int, default=2, help="flow/IAF layers")
    parts.add_argument(
        "--likelihood-scale",
        type=cli.likelihood_scale,
        default="learned",
        help="normal / laplace: a number, learned (shared) or learned-per-feature",
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
        help="CPU threads (default: one per core; on a busy machine 1 is often faster)",
    )
    add(
        "--compile",
        action="store_true",
        help="trace the training step once and compile it (torch.compile); --elbo trace and "
        "meanfield, iwae runs eager with a warning",
    )
    add("--no-progress", action="store_true", help="hide the progress bars")
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
    # Each model takes the flags of its own group, and of the VAE's those it says it uses.
    for name, job in JOBS.items():
        theirs = {a.option_strings[0] for a in parser._actions if a.dest in job.OWN_FLAGS}
        if args.model != name and args.given & theirs:
            parser.error(f"{', '.join(sorted(args.given & theirs))} is for --model {name}")
    # The defaults that depend on other arguments, for every model.
    run_name = args.dataset if args.model == "vae" else f"{args.dataset}-{args.model}"
    args.out_dir = args.out_dir or Path("runs") / run_name
    args.num_epochs = args.num_epochs or (200 if args.dataset == "digits" else 20)
    if args.model != "vae":
        JOBS[args.model].check_arguments(args, parser)
        return args
    args.num_particles = args.num_particles or (5 if args.elbo == "iwae" else 1)
    if args.hidden_dims is None and args.network == "mlp":
        args.hidden_dims = [400]
    elif args.hidden_dims is not None and args.network == "conv":
        parser.error("--hidden-dims sets MLP widths; --network conv has fixed layers")
    if args.num_components is not None and args.prior not in ("mixture", "vamp"):
        parser.error(f"--num-components is for --prior mixture or vamp, not {args.prior}")
    if args.prior_scale is not None and args.decoder != "bayesian":
        parser.error(f"--prior-scale is for --decoder bayesian, not {args.decoder}")
    if args.elbo == "iwae" and args.decoder == "bayesian":
        parser.error(
            "--elbo iwae cannot train --decoder bayesian: its N/B scale sits outside the "
            "log-sum-exp, which would count the weights' KL N/B times per step; use trace or "
            "meanfield"
        )
    return args


def main(args: argparse.Namespace) -> int:
    """Train, evaluate and write results; return the exit code.

    Everything that can fail on bad input (arguments, data, model) fails before the output
    directory is touched. A resumed run holds its directory first, so that no other process
    can write a checkpoint between our reading it and going on from it.
    """
    cli.set_num_threads(args.num_threads)
    # Under torchrun: join the process group, on this rank's device (pyro_vae.infer.distributed); a
    # resumed run on the kind of device it was trained on.
    wanted = args.device
    if args.resume is not None and distributed.launched_by_torchrun():
        wanted = torch.device(pv.jobs.runs.saved_device(args.resume)).type
    group, device = distributed.join(wanted)
    args.device = device
    kind = args.model if args.resume is None else pv.jobs.runs.saved_model(args.resume)
    if kind != "vae":
        return JOBS[kind].main(args, PROG)
    # Rank 0 holds the run directory and writes; the other ranks write nothing.
    if args.resume is not None:
        with claim_run_directory(args.resume, mode="existing") as run_dir:
            run = pv.load_run(args.resume)
            args = _resumed_args(run.args, args, run.checkpoint["training"])
            if group.distributed:
                args.device = device  # this rank's own, not the one rank 0 saved
            pyro.set_rng_seed(args.seed)
            return run_dir.guarded(PROG, lambda: train(args, run_dir, run))
    pyro.set_rng_seed(args.seed)  # seeds torch, numpy and random
    data = pv.load_dataset(args.dataset, args.data_dir, device=args.device)
    config = pv.jobs.runs.model_config(vars(args), data)
    pv.jobs.runs.check_model_size(config)
    vae = pv.build_vae(**config).to(args.device)
    x_test, x_train_eval = pv.jobs.runs.evaluation_sets(vae, data, args.seed)
    # Data outside the likelihood's support are refused here, before any file is written.
    vae.validate_data(x_test, "test data")
    vae.validate_data(x_train_eval, "training data")
    run = pv.Run(args.out_dir, vae, config, {}, {}, data, x_test, x_train_eval)
    with claim_run_directory(
        args.out_dir, mode="overwrite" if args.overwrite else "new"
    ) as run_dir:
        return run_dir.guarded(PROG, lambda: train(args, run_dir, run))


def _resumed_args(saved: dict, given: argparse.Namespace, training: dict) -> argparse.Namespace:
    """The saved run's arguments, with those a resume may change taken from the command."""
    return pv.jobs.runs.resumed_args(saved, given, training, RESUME_OVERRIDES)


def train(args: argparse.Namespace, run_dir: RunDirectory, run: pv.Run) -> int:
    started = time.perf_counter()
    group = distributed.ranks()
    progress = False if args.no_progress or not group.is_main else None
    vae, config, data = run.vae.to(args.device), run.config, run.data.to(args.device)
    x_test, x_train_eval = (x.to(args.device, vae.dtype) for x in (run.x_test, run.x_train_eval))
    loss = pv.jobs.runs.make_loss(args.elbo, args.num_particles)
    # A new run's checkpoint is empty; a resumed one goes on from its own.
    metrics, state = run_dir.resume_state(run.checkpoint)
    kl_kind = "closed form" if args.elbo == "meanfield" and pv.has_closed_form_kl(vae) else "MC"
    cli.say(
        f"{args.dataset}: {len(data.x_train)} train / {len(data.x_test)} test examples of "
        f"{data.data_dim} features; {pv.models.build.describe(config)}; latent {args.latent_dim}; "
        f"{type(loss).__name__} with {args.num_particles} particle(s), KL by {kl_kind}, "
        f"beta {args.beta}; device {args.device}; writing to {run_dir.path}"
        + pv.jobs.runs.start_details(args.batch_size, state)
    )
    if args.kl_warmup_epochs > args.num_epochs:
        reached = args.beta * args.num_epochs / args.kl_warmup_epochs
        cli.say(f"note: the KL warm-up outlasts training: beta reaches only {reached:.3g}")

    def after_epoch(epoch: int, history: pv.History) -> None:
        row = {"epoch": epoch, "train_loss": history.loss[-1]}
        row.update(pv.jobs.runs.epoch_metrics(vae, x_train_eval, "train", len(data.x_train)))
        row.update(pv.jobs.runs.epoch_metrics(vae, x_test, "test", len(data.x_train)))
        row["seconds"] = history.epoch_seconds[-1]
        metrics.append(row)
        weight_kl = f", weight KL {row['test_weight_kl']:.0f}" if "test_weight_kl" in row else ""
        cli.say(
            f"epoch {epoch:>3}/{args.num_epochs}  loss {row['train_loss']:8.2f}  train ELBO "
            f"{row['train_elbo']:8.2f}  test ELBO {row['test_elbo']:8.2f} (reconstruction "
            f"{row['test_reconstruction']:8.2f}, KL {row['test_kl']:6.2f}{weight_kl})  "
            f"{row['seconds']:.2f}s"
        )

    # The model was built alike on every rank (and DDP hands rank 0's weights to all); from
    # here each rank draws its own z.
    distributed.seed_noise(args.seed)
    pv.fit(
        vae,
        data.x_train,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        loss=loss,
        kl_warmup_epochs=args.kl_warmup_epochs,
        clip_norm=args.clip_norm,
        callback=after_epoch,
        # The digest lets load_run check that it rebuilds this very test set.
        checkpoint=run_dir.checkpointer(
            vae,
            config,
            metrics,
            args=pv.jobs.runs.run_arguments(args),
            evaluation_digest=pv.jobs.runs.digest(x_test),
        ),
        checkpoint_every=args.checkpoint_every,
        resume=state,
        progress=progress,
        generator=torch.Generator(args.device).manual_seed(args.seed),
        # Runs saved before --compile existed trained eager.
        compile=getattr(args, "compile", False),
    )
    trained = time.perf_counter() - started

    final = dict(metrics[-1])
    if args.num_iw_particles and args.encoder == "delta":
        cli.say("no importance-weighted log p(x) for the delta encoder: q(z|x) has no density")
    elif args.num_iw_particles:
        cli.say(f"scoring log p(x) with K={args.num_iw_particles} importance samples")
        final["test_log_likelihood"] = pv.jobs.runs.test_log_likelihood(
            vae, x_test, args.num_iw_particles, progress
        )
        final["num_iw_particles"] = args.num_iw_particles
        if vae.weight_guide is not None:
            final["test_log_likelihood_given"] = "posterior-mean decoder weights"
    if group.is_main:
        write_figures(run_dir, vae, x_test, data, metrics)
    final["num_processes"] = group.world_size
    final["train_seconds"] = trained
    final["total_seconds"] = time.perf_counter() - started
    run_dir.write_json("final_metrics.json", final)

    summary = f"test ELBO {final['test_elbo']:.2f} nats"
    if "test_log_likelihood" in final:
        given = ", posterior-mean weights" if vae.weight_guide is not None else ""
        summary += (
            f", test log p(x) >= {final['test_log_likelihood']:.2f} nats "
            f"(K={args.num_iw_particles}{given})"
        )
    cli.say(
        f"done in {final['total_seconds']:.0f}s ({trained:.0f}s training): {summary}; "
        f"results in {run_dir.path}"
    )
    return 0


def write_figures(
    run_dir: RunDirectory, vae: pv.VAE, x_test: torch.Tensor, data: pv.DataSplits, metrics: list
) -> None:
    shown = x_test[:10]
    binarized = "" if torch.equal(x_test, data.x_test.to(x_test)) else "binarized "
    with torch.no_grad():
        plots.plot_reconstructions(
            shown,
            vae.reconstruct(shown),
            data.image_shape,
            run_dir.path / "reconstructions.png",
            input_label=f"{binarized}test inputs",
        )
        plots.plot_samples(vae.sample(64), data.image_shape, run_dir.path / "samples.png")
        loc, _ = vae.encode(x_test)
        plots.plot_latent_space(
            loc, data.y_test, data.class_names, run_dir.path / "latent_space.png"
        )
        if vae.weight_guide is not None:
            mean, std = pv.weight_spread(vae, shown)
            plots.plot_weight_spread(
                shown, mean, std, data.image_shape, run_dir.path / "weight_uncertainty.png"
            )
    plots.plot_loss_curves(metrics, run_dir.path / "loss_curves.png")


def run(argv: list[str] | None = None) -> int:
    """The command line: parse ``argv``, run, and turn bad input into one line and exit 2."""
    args = parse_args(argv)
    code = 1  # an error that escapes: under torchrun, this rank leaves the group at once
    try:
        code = main(args)
    except (ValueError, FileNotFoundError) as error:
        # On many processes each rank that fails says so (the error may be its own), and says
        # which it is.
        rank = distributed.ranks().rank
        print(f"{PROG}: {f'rank {rank}: ' if rank else ''}error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # before training started: train() handles it after
        print(f"{PROG}: interrupted before training started; nothing was written", file=sys.stderr)
        code = 130
    finally:
        distributed.leave(finished=code == 0)
    return code


if __name__ == "__main__":
    sys.exit(run())
