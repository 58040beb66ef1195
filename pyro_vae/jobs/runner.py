"""One runner for every model kind: a new or resumed run, seeding, the claimed run directory,
fit with checkpoints, the epoch rows, the timings and the final metrics. What differs between
the kinds (their data, model, scores and figures) is their job module's
(:data:`pyro_vae.jobs.JOBS`).

Everything that can fail on bad input (arguments, data, model) fails before the output
directory is touched. A resumed run holds its directory first, so that no other process can
write a checkpoint between our reading it and going on from it; it reads ``checkpoint.pt``
once.
"""

from __future__ import annotations

import argparse
import time
from types import ModuleType
from typing import Any

import pyro
import torch

import pyro_vae as pv
from pyro_vae.checkpoint import build_model
from pyro_vae.infer import distributed
from pyro_vae.infer.state import TrainingState
from pyro_vae.jobs import JOBS, RUN_FILES, cli, load_run
from pyro_vae.jobs.run_directory import RunDirectory, claim_run_directory
from pyro_vae.jobs.runs import (
    RESUME_OVERRIDES,
    Run,
    Setup,
    check_model_size,
    digest,
    evaluation_sets,
    resumed_args,
    run_arguments,
)


def train_main(args: argparse.Namespace, prog: str) -> int:
    """scripts/train.py's work once its arguments are parsed: train, evaluate and write;
    return the exit code."""
    cli.set_num_threads(args.num_threads)
    if args.resume is not None:
        return _resume(args, prog)
    # Under torchrun: join the process group, on this rank's device (pyro_vae.infer.distributed).
    _, args.device = distributed.join(args.device)
    job = JOBS[args.model]
    pyro.set_rng_seed(args.seed)  # seeds torch, numpy and random
    data = pv.load_dataset(args.dataset, args.data_dir, device=args.device)
    config = job.new_config(args, data)
    check_model_size(config)
    model = build_model(config).to(args.device)
    dtype = next(model.parameters()).dtype
    x_test, x_train_eval = (x.to(dtype) for x in evaluation_sets(model, data, args.seed))
    run = Run(args.out_dir, args.model, model, config, {}, {}, data, x_test, x_train_eval)
    # Data outside what the model takes are refused here, before any file is written.
    setup = job.prepare(run, args)
    mode = "overwrite" if args.overwrite else "new"
    with claim_run_directory(args.out_dir, mode=mode, files=RUN_FILES) as run_dir:
        return run_dir.guarded(prog, lambda: train(job, args, run_dir, run, setup))


def _resume(given: argparse.Namespace, prog: str) -> int:
    # Rank 0 holds the run directory before it reads the checkpoint; the other ranks write
    # nothing.
    with claim_run_directory(given.resume, mode="existing", files=RUN_FILES) as run_dir:
        run = load_run(given.resume)
        # A resumed run on the kind of device it was trained on; under torchrun each rank its
        # own device of that kind, not the one rank 0 saved.
        wanted = given.device
        if distributed.launched_by_torchrun():
            wanted = torch.device(run.args["device"]).type
        group, device = distributed.join(wanted)
        args = resumed_args(run.args, given, run.checkpoint["training"], RESUME_OVERRIDES)
        if group.distributed:
            args.device = device
        pyro.set_rng_seed(args.seed)
        job = JOBS[run.kind]
        setup = job.prepare(run, args)
        return run_dir.guarded(prog, lambda: train(job, args, run_dir, run, setup))


def start_details(batch_size: int, state: TrainingState | None) -> str:
    """The end of a run's first line: how many processes train (under torchrun) and, for a
    resumed run, where it goes on from."""
    resuming = "" if state is None else f"; resuming from {state.position()}"
    return distributed.describe(batch_size) + resuming


def train(
    job: ModuleType, args: argparse.Namespace, run_dir: RunDirectory, run: Run, setup: Setup
) -> int:
    """Fit the prepared model with checkpoints and a row of metrics per epoch, then the job's
    final score and figures, and ``final_metrics.json``."""
    started = time.perf_counter()
    group = distributed.ranks()
    progress = False if args.no_progress or not group.is_main else None
    # A new run's checkpoint is empty; a resumed one goes on from its own.
    metrics, state = run_dir.resume_state(run.checkpoint)
    cli.say(setup.description + start_details(args.batch_size, state))
    for note in setup.notes:
        cli.say(note)

    def after_epoch(epoch: int, history: pv.History) -> None:
        row: dict[str, Any] = {"epoch": epoch, "train_loss": history.loss[-1]}
        row.update(job.epoch_row(setup, args, epoch))
        row["seconds"] = history.epoch_seconds[-1]
        metrics.append(row)
        cli.say(
            f"epoch {epoch:>3}/{args.num_epochs}  loss {row['train_loss']:8.2f}  "
            f"{job.epoch_line(row)}  {row['seconds']:.2f}s"
        )

    # The model was built alike on every rank (and DDP hands rank 0's weights to all); from
    # here each rank draws its own z.
    distributed.seed_noise(args.seed)
    pv.fit(
        setup.model,
        setup.training_data,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        loss=setup.loss,
        kl_warmup_epochs=args.kl_warmup_epochs,
        clip_norm=args.clip_norm,
        callback=after_epoch,
        # The digest lets load_run check that it rebuilds this very test set.
        checkpoint=run_dir.checkpointer(
            setup.model,
            run.config,
            metrics,
            args=run_arguments(args),
            evaluation_digest=digest(run.x_test),
            **setup.checkpoint_extra,
        ),
        checkpoint_every=args.checkpoint_every,
        resume=state,
        progress=progress,
        generator=torch.Generator(args.device).manual_seed(args.seed),
        compile=args.compile,
    )
    trained = time.perf_counter() - started

    final = dict(metrics[-1])
    final.update(job.finish(setup, run, args, run_dir, metrics, progress))
    final["num_processes"] = group.world_size
    final["train_seconds"] = trained
    final["total_seconds"] = time.perf_counter() - started
    run_dir.write_json("final_metrics.json", final)
    cli.say(
        f"done in {final['total_seconds']:.0f}s ({trained:.0f}s {setup.trained}): "
        f"{job.summary(final, args)}; results in {run_dir.path}"
    )
    return 0
