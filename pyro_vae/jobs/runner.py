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
import contextlib
import math
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pyro
import torch
from torch import Tensor, nn

import pyro_vae as pv
from pyro_vae.checkpoint import build_model
from pyro_vae.data import is_binary
from pyro_vae.infer import distributed
from pyro_vae.infer.state import TrainingState
from pyro_vae.jobs import JOBS, RUN_FILES, cli, load_run, threads
from pyro_vae.jobs.run_directory import BEST, RunDirectory, claim_run_directory
from pyro_vae.jobs.runs import (
    RESUME_OVERRIDES,
    Run,
    Setup,
    carry_random_states,
    check_model_size,
    default_val_size,
    digest,
    evaluation_sets,
    load_companion,
    resume_device,
    resumed_args,
    run_arguments,
    validation_indices,
)
from pyro_vae.jobs.tensorboard_log import EpochBoard


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
    data = pv.load_dataset(
        args.dataset,
        args.data_dir,
        device=args.device,
        test_dataset=args.test_dataset,
        image_size=args.image_size,
        seed=args.seed,
        # A .npy's training rows stay in the file, memory-mapped, and fit reads them batch
        # by batch (a job that trains on tensors alone reads them whole in its prepare).
        stream=True,
    )
    # The validation rows go before anything else is drawn from the training set (M2's
    # labelled rows come from what is left).
    if args.val_size is None:
        args.val_size = default_val_size(args.dataset, len(data.x_train))
    held_out = validation_indices(len(data.x_train), args.val_size, args.seed)
    data = data.hold_out(held_out)
    config = job.new_config(args, data)
    check_model_size(config)
    model = build_model(config).to(args.device)
    dtype = next(model.parameters()).dtype
    with _naming_the_file(args):
        check_user_data(model, data, args)
        x_test, x_train_eval, x_val = evaluation_sets(model, data, args.seed)
    run = Run(
        args.out_dir,
        args.model,
        model,
        config,
        {},
        {},
        data,
        x_test.to(dtype),
        x_train_eval.to(dtype),
        x_val=None if x_val is None else x_val.to(dtype),
        validation_indices=held_out,
    )
    # Data outside what the model takes are refused here, before any file is written.
    with _naming_the_file(args):
        setup = job.prepare(run, args)
    # The thread count and --compile auto, from a few timed steps (pyro_vae.jobs.threads).
    speed = threads.choose_speed(job, run, setup, args, threads_given="--num-threads" in args.given)
    setup.description += f"; {speed}"
    mode = "overwrite" if args.overwrite else "new"
    with claim_run_directory(args.out_dir, mode=mode, files=RUN_FILES) as run_dir:
        return run_dir.guarded(prog, lambda: train(job, args, run_dir, run, setup))


def check_user_data(model: nn.Module, data: pv.DataSplits, args: argparse.Namespace) -> None:
    """A user's data (``--dataset PATH``) checked whole against the likelihood by the model's
    own ``validate_data``, each split naming its file: values in [0, 1] for a likelihood that
    binarizes them (Bernoulli), its support otherwise. Models whose data are not the rows
    (the CVAE models the missing pixels) are checked by their job's ``prepare``."""
    validate = getattr(model, "validate_data", None)
    if args.dataset in pv.DATASET_NAMES or validate is None:
        return
    if getattr(model, "data_dim", None) != data.data_dim:
        return
    binary = getattr(getattr(model, "likelihood", None), "binary_data", False)
    dtype = next(model.parameters()).dtype
    # Streamed training rows are checked a chunk at a time (never held whole), and judged
    # binary or not on all of them, as rows in memory are.
    train_binary = data.train_rows_binary()
    what = f"{args.dataset} (training rows)"
    for start, chunk in data.train_chunks():
        validate(chunk.to(dtype), what, probabilities=binary and not train_binary, first_row=start)
    splits = [
        (args.dataset, "validation rows", data.x_val),
        (args.test_dataset or args.dataset, "test rows", data.x_test),
    ]
    for file, split, x in splits:
        if x is not None:
            validate(x.to(dtype), f"{file} ({split})", probabilities=binary and not is_binary(x))


@contextlib.contextmanager
def _naming_the_file(args: argparse.Namespace) -> Iterator[None]:
    """A refusal of a user's data names the file (``--dataset PATH``) when it does not yet,
    and says which likelihoods take values outside [0, 1]."""
    try:
        yield
    except ValueError as error:
        if args.dataset in pv.DATASET_NAMES:
            raise
        message = str(error)
        named = message.startswith((args.dataset, str(args.test_dataset)))
        if "[0, 1]" in message:
            message += (
                "; values outside [0, 1] need --likelihood normal or laplace"
                if args.model == "vae"
                else f"; --model {args.model} takes values in [0, 1] only"
            )
        raise ValueError(message if named else f"{args.dataset}: {message}") from error


def _resume(given: argparse.Namespace, prog: str) -> int:
    # Rank 0 holds the run directory before it reads the checkpoint; the other ranks write
    # nothing.
    with claim_run_directory(given.resume, mode="existing", files=RUN_FILES) as run_dir:
        run = load_run(given.resume, best=False)
        # A resumed run on the device it was trained on, or --device's; under torchrun each
        # rank its own device of that kind, not the one rank 0 saved.
        wanted = resume_device(run.args, given)
        if distributed.launched_by_torchrun():
            wanted = torch.device(wanted).type
        group, device = distributed.join(wanted)
        args = resumed_args(run.args, given, run.checkpoint["training"], RESUME_OVERRIDES)
        # The run's own thread count, unless the command gave one: a resume after Ctrl-C goes
        # on at the speed the run had.
        cli.set_num_threads(args.num_threads)
        args.device = device if group.distributed else wanted
        run.checkpoint["training"], moved = carry_random_states(
            run.checkpoint["training"], run.args["device"], args.device, args.seed
        )
        pyro.set_rng_seed(args.seed)
        job = JOBS[run.kind]
        setup = job.prepare(run, args)
        # A run saved without a thread count (before they were chosen) has one chosen now.
        speed = threads.choose_speed(
            job, run, setup, args, threads_given="--num-threads" in given.given, resumed=True
        )
        setup.description += f"; {speed}"
        setup.notes = (*setup.notes, *([] if moved is None else [moved]))
        return run_dir.guarded(prog, lambda: train(job, args, run_dir, run, setup))


def start_details(batch_size: int, state: TrainingState | None) -> str:
    """The end of a run's first line: how many processes train (under torchrun) and, for a
    resumed run, where it goes on from."""
    resuming = "" if state is None else f"; resuming from {state.position()}"
    return distributed.describe(batch_size) + resuming


class Selection:
    """The best epoch by the job's validation metric (``job.SELECTED_BY``: its name in the
    epoch rows, higher is better), its weights kept in ``best.pt`` and in memory, and early
    stopping after ``patience`` epochs without a better one. Without a validation set the
    last epoch is the one kept, and nothing stops early."""

    def __init__(self, job: ModuleType, run: Run, metrics: list[dict[str, Any]]) -> None:
        self.metric: str | None = job.SELECTED_BY if run.x_val is not None else None
        self.epoch, self.value = 0, -math.inf
        self.weights: dict[str, Tensor] | None = None
        # A resumed run: the best epoch so far, from the rows it kept; its weights are in
        # best.pt.
        for row in metrics:
            self.consider(row)

    def consider(self, row: dict[str, Any]) -> bool:
        """Whether ``row``'s epoch is the best so far."""
        value = row[self.metric] if self.metric is not None else math.inf
        if self.metric is not None and not value > self.value:
            return False
        self.epoch, self.value = row["epoch"], value
        return True

    @property
    def words(self) -> str:
        """The metric as a message names it: ``val_elbo`` is the validation ELBO."""
        return str(self.metric).replace("val_", "validation ").replace("elbo", "ELBO")

    def describe(self) -> dict[str, Any]:
        """``best.pt``'s ``"selection"`` and the final metrics' account of the choice."""
        if self.metric is None:
            return {"epoch": self.epoch, "metric": None, "how": "the last epoch (no validation)"}
        return {
            "epoch": self.epoch,
            "metric": self.metric,
            "value": self.value,
            "how": f"the best {self.words}",
        }


def train(
    job: ModuleType, args: argparse.Namespace, run_dir: RunDirectory, run: Run, setup: Setup
) -> int:
    """Fit the prepared model with checkpoints and a row of validation metrics per epoch,
    keep the best epoch's weights (and stop early after ``--patience`` epochs without a better
    one), then score the best epoch on the test set once: the job's final score and figures,
    and ``final_metrics.json``."""
    started = time.perf_counter()
    group = distributed.ranks()
    progress = False if args.no_progress or not group.is_main else None
    # A new run's checkpoint is empty; a resumed one goes on from its own.
    metrics, state = run_dir.resume_state(run.checkpoint)
    cli.say(setup.description + start_details(args.batch_size, state))
    for note in setup.notes:
        cli.say(note)
    if run.x_val is None:
        cli.say(
            "note: no validation set (--val-size 0): the last epoch is kept, and the test set "
            "scores it without having chosen anything"
        )
    selection = Selection(job, run, metrics)
    # TensorBoard's scalars and images (rank 0, where the package is installed).
    board = EpochBoard.open(args, run_dir.path, setup, run.data.image_shape, len(metrics))

    def after_epoch(epoch: int, history: pv.History) -> bool:
        row: dict[str, Any] = {"epoch": epoch, "train_loss": history.loss[-1]}
        row.update(job.epoch_row(setup, args, epoch))
        row["seconds"] = history.epoch_seconds[-1]
        metrics.append(row)
        board.log(row, args.num_epochs)
        best = selection.consider(row)
        if best:
            selection.weights = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
            run_dir.save_best(setup.model, run.config, selection.describe(), run_arguments(args))
        marked = "  *" if best and selection.metric else ""  # a new best epoch
        cli.say(
            f"epoch {epoch:>3}/{args.num_epochs}  loss {row['train_loss']:8.2f}  "
            f"{job.epoch_line(row)}  {row['seconds']:.2f}s{marked}"
        )
        waited = epoch - selection.epoch
        patient = args.patience is None or selection.metric is None or waited < args.patience
        if patient or epoch == args.num_epochs:
            return False
        cli.say(
            f"stopping early: {waited} epoch(s) without a better {selection.words} than epoch "
            f"{selection.epoch}'s (--patience {args.patience})"
        )
        return True

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
        binarize=setup.binarize,
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
            validation_indices=run.validation_indices,
            **setup.checkpoint_extra,
        ),
        checkpoint_every=args.checkpoint_every,
        resume=state,
        progress=progress,
        generator=torch.Generator(args.device).manual_seed(args.seed),
        compile=args.compile,
        # Used by a streamed .npy only (the VAE's): rows in memory are indexed in place.
        num_workers=args.num_workers,
    )
    trained = time.perf_counter() - started
    board.close()

    # The test set is scored once, here, on the best epoch's weights.
    if metrics and selection.epoch != metrics[-1]["epoch"]:
        weights = selection.weights
        if weights is None:  # chosen before this process resumed the run: its best.pt
            weights = load_companion(run_dir.path, BEST, run.checkpoint, run.args)[0].state_dict()
        setup.model.load_state_dict(weights)
    chosen = selection.describe()
    setup.kept_epoch = chosen["epoch"]
    cli.say(f"scoring epoch {chosen['epoch']}, {chosen['how']}, on the test set")
    final: dict[str, Any] = {
        "epochs_trained": metrics[-1]["epoch"] if metrics else 0,
        "best_epoch": chosen["epoch"],
        "selected_by": chosen["how"],
    }
    if selection.metric is not None:
        final[f"best_{selection.metric}"] = selection.value
    final.update(job.finish(setup, run, args, run_dir, metrics, progress))
    final["num_processes"] = group.world_size
    final["train_seconds"] = trained
    final["total_seconds"] = time.perf_counter() - started
    run_dir.write_json("final_metrics.json", final)
    cli.say(
        f"done in {cli.wall_seconds():.0f}s of wall time, imports and data included "
        f"({trained:.0f}s {setup.trained}): epoch "
        f"{chosen['epoch']} kept; {job.summary(final, args)}; results in {run_dir.path}"
    )
    return 0
