"""The run format: what scripts/train.py writes into a run directory, and how it is read back.

A run directory holds

- ``checkpoint.pt``: the weights, the config that rebuilds the model (its ``"model"`` names the
  builder: :func:`build_vae` by default, ``build_m2``, ``build_cvae``), the
  script's arguments, the metrics so far and the training state that resumes it exactly;
- ``metrics.json`` / ``metrics.csv`` (a row per epoch), ``final_metrics.json``, the figures;
- ``evaluation.json`` (scripts/evaluate.py) and ``explain/`` (scripts/explain.py), later;
- ``.pyro_vae.lock``: held by whichever process writes into the directory, and the mark that
  the directory belongs to a run.

:func:`load_run` gives back the model with the very test set the run scored: the dynamic
binarization of a Bernoulli run is drawn on the CPU from the run's seed, whatever the device,
and its digest is stored in the checkpoint, so that a rebuilt test set that differs (other
data files, other code) is refused instead of scored.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor

from pyro_vae._files import atomic_write
from pyro_vae.checkpoint import built_on_meta, load_checkpoint, save_checkpoint
from pyro_vae.components.likelihoods import BernoulliLikelihood
from pyro_vae.data import DataSplits, binarize, is_binary, load_dataset
from pyro_vae.infer import distributed
from pyro_vae.infer.estimators import elbo_terms, log_likelihood
from pyro_vae.infer.state import TrainingDivergedError, TrainingState, describe_position
from pyro_vae.jobs.cli import say
from pyro_vae.models.build import least_weights
from pyro_vae.models.vae import VAE

if TYPE_CHECKING:
    from pyro_vae.jobs import cvae as conditional_job
    from pyro_vae.jobs import m2 as semisupervised_job

CHECKPOINT = "checkpoint.pt"
LOCK = ".pyro_vae.lock"
EXPLAIN_DIR = "explain"
# Every file a run, its evaluation and its report write into the run directory.
RUN_FILES = (
    CHECKPOINT,
    "metrics.json",
    "metrics.csv",
    "final_metrics.json",
    "reconstructions.png",
    "samples.png",
    "latent_space.png",
    "loss_curves.png",
    "weight_uncertainty.png",
    "evaluation.json",
    # --model m2
    "accuracy.png",
    "style_transfer.png",
    # --model cvae
    "baseline.pt",
    "completions.png",
)
# Train-set metrics each epoch use a fixed subset, so that evaluation stays cheap on big data.
MAX_TRAIN_EVAL = 10000

# The objectives by name, given the number of particles.
ELBOS = {
    "trace": lambda k: Trace_ELBO(num_particles=k),
    "meanfield": lambda k: TraceMeanField_ELBO(num_particles=k),
    "iwae": lambda k: RenyiELBO(alpha=0, num_particles=k),
}


def make_loss(name: str, num_particles: int) -> ELBO:
    """Pyro's estimator called ``name`` (trace, meanfield or iwae) with ``num_particles``."""
    if name not in ELBOS:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(ELBOS)}")
    return ELBOS[name](num_particles)


def model_config(args: Mapping[str, Any], data: DataSplits) -> dict[str, Any]:
    """The keyword arguments of :func:`build_vae` for a run's arguments and data: plain
    values, saved in the checkpoint so that the run rebuilds exactly."""
    return {
        "data_dim": data.data_dim,
        "latent_dim": args["latent_dim"],
        # The conv networks have fixed layers: hidden widths are the MLP's.
        "hidden_dims": None if args["network"] == "conv" else list(args["hidden_dims"]),
        "prior": args["prior"],
        "encoder": args["encoder"],
        "likelihood": args["likelihood"],
        "network": args["network"],
        "decoder": args["decoder"],
        "image_shape": list(data.image_shape),
        "num_components": args["num_components"],
        "flow_depth": args["flow_depth"],
        "likelihood_scale": args["likelihood_scale"],
        "num_levels": data.num_levels,
        "beta": args["beta"],
        # Only a Bayesian decoder has a weight prior.
        **({"prior_scale": args["prior_scale"] or 1.0} if args["decoder"] == "bayesian" else {}),
    }


def check_model_size(config: dict[str, Any]) -> None:
    """Refuse, before building it, a model whose weights would not fit in this machine's
    memory with their gradients and Adam's two moments (four float32 copies). The count is
    the checkpoint loader's: a lower bound for a VAE, and for the other models the count of
    the config's model built on the meta device (which allocates nothing)."""
    if config.get("model", "vae") == "vae":
        weights = least_weights(config)
    else:
        try:
            weights = sum(t.numel() for t in built_on_meta(config).state_dict().values())
        except RuntimeError as error:
            if "overflow" not in str(error):
                raise
            raise ValueError(
                "the model would hold more weights than torch can address (a tensor over 2**63 "
                "bytes): more than this machine's memory"
            ) from None
    need = 16 * weights
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise ValueError(
            f"the model would hold {weights:,} weights or more, about {need / 2**30:,.1f} GiB "
            f"with their gradients and Adam's state: more than this machine's "
            f"{memory / 2**30:.1f} GiB of memory"
        )


def evaluation_sets(vae: VAE, data: DataSplits, seed: int) -> tuple[Tensor, Tensor]:
    """The test set and a training subset (the first :data:`MAX_TRAIN_EVAL` examples) as a
    run scores them, on the CPU in the data's dtype.

    A Bernoulli likelihood needs binary data: training binarizes afresh every step, and
    evaluation uses one fixed binarization. It is drawn on the CPU from a stream of its own,
    derived from ``seed``: CPU and CUDA generators give different numbers for one seed, so a
    binarization drawn on the run's device could not be rebuilt on another one, and a stream
    of its own keeps it apart from the training noise drawn from ``seed``.
    """
    x_test, x_train = data.x_test.cpu(), data.x_train[:MAX_TRAIN_EVAL].cpu()
    if not isinstance(vae.likelihood, BernoulliLikelihood) or is_binary(data.x_train):
        return x_test, x_train
    (state,) = np.random.SeedSequence(seed, spawn_key=(1,)).generate_state(1, np.uint64)
    generator = torch.Generator().manual_seed(int(state))
    return binarize(x_test, generator), binarize(x_train, generator)


def epoch_metrics(vae: VAE, x: Tensor, prefix: str, num_data: int) -> dict[str, float]:
    """Mean ELBO terms per example. A Bayesian decoder's weight KL is spread over the
    ``num_data`` training examples, as in the training loss, and also reported whole.
    On many processes each rank scores its share of ``x`` and the means are all-reduced."""
    terms = elbo_terms(vae, distributed.rows(x, distributed.ranks()), num_data=num_data)
    row = {
        f"{prefix}_elbo": distributed.mean_over_ranks(terms.elbo),
        f"{prefix}_reconstruction": distributed.mean_over_ranks(terms.reconstruction),
        f"{prefix}_kl": distributed.mean_over_ranks(terms.kl),
    }
    if vae.weight_guide is not None:
        row[f"{prefix}_weight_kl"] = distributed.mean_over_ranks(terms.global_kl[None])
    return row


def test_log_likelihood(vae: VAE, x: Tensor, num_particles: int, progress: bool | None) -> float:
    """The mean importance-weighted bound on log p(x) over ``x`` with ``num_particles``
    samples; on many processes each rank scores its share and the mean is all-reduced."""
    group = distributed.ranks()
    local = log_likelihood(vae, distributed.rows(x, group), num_particles, progress=progress)
    return distributed.mean_over_ranks(local)


def digest(x: Tensor) -> str:
    """A SHA-256 of a tensor's values, to tell whether two test sets are the same."""
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class Run:
    """A run read back by :func:`load_run`."""

    directory: Path
    vae: VAE
    """The model, on the CPU."""
    config: dict[str, Any]
    """The keyword arguments of :func:`build_vae` that rebuild it."""
    args: dict[str, Any]
    """The arguments of scripts/train.py that made it."""
    checkpoint: dict[str, Any]
    """The whole checkpoint: epoch, step, metrics, training state."""
    data: DataSplits
    x_test: Tensor
    """The test set exactly as the run scored it, in the model's dtype."""
    x_train_eval: Tensor
    """The training subset the run scored each epoch."""


def load_run(
    directory: str | os.PathLike,
) -> Run | semisupervised_job.Run | conditional_job.Run:
    """Read back a run of scripts/train.py: its model, arguments, data and the test set it
    scored.

    A VAE run (``--model vae``) comes back as a :class:`Run`; an M2 run (``--model m2``) as
    :class:`pyro_vae.jobs.m2.Run` and a CVAE run (``--model cvae``) as
    :class:`pyro_vae.jobs.cvae.Run`, each read by its job's ``load_run`` with the same
    checks (tell them apart with ``isinstance``).

    :raises ValueError: when ``directory`` holds no run, its checkpoint is damaged or was not
        written by scripts/train.py, or the test set rebuilt from the data is not the one the
        run scored (the data files changed since).
    :raises FileNotFoundError: when the run's dataset cannot be found any more.
    """
    directory = Path(directory)
    path = checkpoint_path(directory)
    vae, payload = load_checkpoint(path)
    if not isinstance(vae, VAE):
        # Imported here: the job modules import this one.
        from pyro_vae.jobs import cvae as conditional_job
        from pyro_vae.jobs import m2 as semisupervised_job

        kind = payload["config"].get("model")
        if kind == "m2":
            return semisupervised_job.load_run(directory)
        if kind == "cvae":
            return conditional_job.load_run(directory)
        raise ValueError(f"{path}: a {kind} model, not a run of scripts/train.py")
    for key in ("args", "config", "evaluation_digest", "training"):
        if key not in payload:
            raise ValueError(
                f"{path}: holds no {key!r}; it was not written by scripts/train.py of this "
                "version (runs from before 0.2 recorded no test set: train them again)"
            )
    args = payload["args"]
    data = load_dataset(args["dataset"], args["data_dir"])
    x_test, x_train_eval = evaluation_sets(vae, data, args["seed"])
    if digest(x_test) != payload["evaluation_digest"]:
        raise ValueError(
            f"{path}: the test set rebuilt from {args['dataset']} is not the one this run "
            "scored (have the data files changed?)"
        )
    return Run(
        directory=directory,
        vae=vae,
        config=payload["config"],
        args=args,
        checkpoint=payload,
        data=data,
        x_test=x_test.to(vae.dtype),
        x_train_eval=x_train_eval.to(vae.dtype),
    )


def saved_model(directory: str | os.PathLike) -> str:
    """Which model the run in ``directory`` trains: ``"vae"``, ``"m2"`` or ``"cvae"`` (the
    ``"model"`` entry of its checkpoint's config; runs without one are VAEs)."""
    path = checkpoint_path(Path(directory))
    _, payload = load_checkpoint(path)
    kind = str(payload["config"].get("model", "vae"))
    if kind not in ("vae", "m2", "cvae"):
        raise ValueError(f"{path} holds a {kind} model, not a run of scripts/train.py")
    return kind


def saved_device(directory: str | os.PathLike) -> str:
    """The ``--device`` the run in ``directory`` was trained on (``"cpu"`` for runs that
    saved none)."""
    _, payload = load_checkpoint(checkpoint_path(Path(directory)))
    return str(payload.get("args", {}).get("device", "cpu"))


def checkpoint_path(directory: Path) -> Path:
    """``directory``'s checkpoint, or a ValueError that says what was given instead."""
    if directory.is_file():
        raise ValueError(
            f"{directory} is a file; give the run's directory, {directory.parent}, instead"
        )
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such run directory")
    path = directory / CHECKPOINT
    if not path.is_file():
        raise ValueError(
            f"{directory}: no {CHECKPOINT} there, so no finished epoch to read (train with "
            "scripts/train.py)"
        )
    return path


class RunDirectoryBusyError(ValueError):
    """Another process holds the run directory."""


class RunDirectory:
    """A run directory, held by this process alone while it writes there.

    Open one with :meth:`claim`. Every file goes in atomically (a temporary file renamed into
    place), so a kill at any instant leaves each file whole: the old one or the new one.
    """

    def __init__(self, path: Path, lock_fd: int | None) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self.writes = lock_fd is not None
        """False for :meth:`follow`'s directory: the other ranks of a run write nothing."""
        self.last_checkpoint: tuple[int, int] | None = None
        """(epochs done, steps into the next) of the newest checkpoint, if there is one."""
        self.leftovers: list[str] = []
        """Temporary files of an interrupted write, removed when the directory was claimed."""

    @classmethod
    @contextlib.contextmanager
    def claim(cls, path: str | os.PathLike, *, mode: str) -> Iterator[RunDirectory]:
        """Hold ``path`` for the duration of the ``with`` block.

        :param mode: ``"new"``: a fresh run; the directory must be empty or absent.
            ``"overwrite"``: a fresh run that first removes every file of the run there.
            ``"existing"``: the run there, to resume, evaluate or explain it.
        :raises ValueError: before anything is written or removed, when the directory holds
            files that are no run's, holds a run and ``mode`` is ``"new"``, holds no run and
            ``mode`` is ``"existing"``, or cannot be created or written;
            :class:`RunDirectoryBusyError` when another process holds it.
        """
        if mode not in ("new", "overwrite", "existing"):
            raise ValueError(f"mode must be new, overwrite or existing, got {mode!r}")
        path = Path(path)
        if mode == "existing":
            checkpoint_path(path)
        elif path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file, not a directory")
        elif path.is_dir() and not _holds_a_run(path) and any(path.iterdir()):
            # --overwrite deletes by name: in someone else's directory it could hit their files.
            names = sorted(p.name for p in path.iterdir())
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ValueError(
                f"output directory {path} holds files that are not a pyro_vae run ({shown}); "
                "choose another --out-dir"
            )
        _refuse_links(path)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create output directory {path}: {error}") from error
        if not os.access(path, os.W_OK):
            raise ValueError(f"output directory {path} is not writable")
        held_before = _holds_a_run(path)  # before our lock file makes it look like a run
        lock_fd = _lock(path)
        try:
            directory = cls(path, lock_fd)
            if mode == "new" and held_before:
                raise ValueError(directory._occupied_message())
            directory.leftovers = directory._remove_temporary_files()
            if mode == "overwrite":
                directory._remove_run_files()
            yield directory
        finally:
            if mode != "existing" and [p.name for p in path.iterdir()] == [LOCK]:
                # A run stopped before it wrote anything leaves no trace, not even its lock.
                (path / LOCK).unlink()
                if created:
                    path.rmdir()
            os.close(lock_fd)  # releases the lock

    @classmethod
    @contextlib.contextmanager
    def follow(cls, path: str | os.PathLike, *, mode: str) -> Iterator[RunDirectory]:
        """The run directory as a rank other than 0 of a run on many processes sees it: rank 0
        holds it (:meth:`claim`, with ``mode``), and every write here does nothing."""
        del mode  # rank 0's business
        yield cls(Path(path), None)

    def _occupied_message(self) -> str:
        if (self.path / CHECKPOINT).is_file():
            how = f"continue it with --resume {self.path}, replace it with --overwrite"
        else:
            how = "it never finished an epoch: replace it with --overwrite"
        return (
            f"output directory {self.path} already holds a run; {how}, or choose another --out-dir"
        )

    def _remove_temporary_files(self) -> list[str]:
        # Left by a kill in the middle of a write; no one else writes here while we hold it.
        removed = []
        for name in RUN_FILES:
            for leftover in self.path.glob(f".{name}.*"):
                leftover.unlink(missing_ok=True)
                removed.append(leftover.name)
        return removed

    def _remove_run_files(self) -> None:
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / EXPLAIN_DIR, ignore_errors=True)

    def where_it_stands(self) -> str:
        """What the newest checkpoint holds, for a message after a stop: never a checkpoint
        this run did not write (or resume from)."""
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        return f"{CHECKPOINT} holds the run at {describe_position(*self.last_checkpoint)}"

    def write_text(self, name: str, text: str) -> None:
        if not self.writes:
            return
        with atomic_write(self.path / name, "w") as file:
            file.write(text)

    def write_json(self, name: str, value: Any) -> None:
        self.write_text(name, json.dumps(value, indent=2) + "\n")

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """``metrics.json`` and ``metrics.csv``: a row per epoch."""
        self.write_json("metrics.json", rows)
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        self.write_text("metrics.csv", table.getvalue())

    def resume_state(self, checkpoint: dict[str, Any]) -> tuple[list[dict], TrainingState | None]:
        """The metrics so far and the training state of a claimed run's ``checkpoint`` (empty
        and ``None`` for a new run). A kill between the checkpoint and ``metrics.json`` may
        have left the latter behind: it is rewritten from the checkpoint here."""
        metrics = list(checkpoint.get("metrics", []))
        saved = checkpoint.get("training")
        state = None if saved is None else TrainingState.from_dict(saved)
        if state is not None:
            # Before anything is said or written: a resume on another number of processes.
            state.check_world_size(distributed.ranks().world_size)
            self.last_checkpoint = (state.epoch, state.step)
            if metrics:
                self.write_metrics(metrics)
        if self.leftovers:
            say(f"removed {', '.join(self.leftovers)}: left by a write that was interrupted")
        return metrics, state

    def checkpointer(
        self, module: Any, config: dict[str, Any], metrics: list[dict], **extra: Any
    ) -> Callable[[TrainingState], None]:
        """fit's ``checkpoint`` callback: ``checkpoint.pt`` with the weights, ``config``, the
        metrics so far, the training state and ``extra``, then ``metrics.json`` (after, so
        that it is never ahead of what a resume restores)."""

        def checkpoint(training: TrainingState) -> None:
            self.save_checkpoint(
                module,
                config,
                epoch=training.epoch,
                step=training.step,
                metrics=metrics,
                training=training.to_dict(),
                **extra,
            )
            if metrics:
                self.write_metrics(metrics)

        return checkpoint

    def guarded(self, prog: str, work: Callable[[], int]) -> int:
        """Run the job's ``work`` (fit, evaluate, write); a stop (Ctrl-C, divergence, a failed
        write) becomes a one-line message of what it left, and an exit code."""
        try:
            return work()
        except (KeyboardInterrupt, TrainingDivergedError, OSError) as error:
            return self.stopped(prog, error)
        except RuntimeError as error:
            if not distributed.lost_contact(error):
                raise
            return self.stopped(prog, error)

    def stopped(self, prog: str, error: BaseException) -> int:
        """Say on stderr why training stopped and what it left on disk; the exit code."""
        group = distributed.ranks()
        # Under torchrun a run resumes under torchrun, with as many processes.
        resume = ""
        if self.last_checkpoint and group.distributed:
            resume = (
                f"; continue with torchrun --nproc-per-node {group.world_size} {prog} --resume "
                f"{self.path} ({group.world_size} processes in all)"
            )
        elif self.last_checkpoint:
            resume = f"; continue with --resume {self.path}"
        if not self.writes:
            # Rank 0 says what the run left; another rank only says why it stopped, when that
            # is its own news (a Ctrl-C and a divergence reach every rank at the same step,
            # and rank 0 reports them).
            if isinstance(error, KeyboardInterrupt):
                return 130
            if isinstance(error, TrainingDivergedError):
                return 1
            if isinstance(error, RuntimeError):  # guarded passes only lost_contact's
                print(
                    f"{prog}: rank {group.rank} stopped: it lost contact with the other "
                    "processes (another rank stopped or died: see its message)",
                    file=sys.stderr,
                )
            else:
                print(f"{prog}: rank {group.rank} stopped: {_first_line(error)}", file=sys.stderr)
            return 1
        left = self.where_it_stands()
        if isinstance(error, RuntimeError):  # guarded passes only distributed.lost_contact's
            # Another rank died or hangs: this one stops too, and says so.
            lost = (
                f"rank {group.rank} lost contact with the other processes of the run "
                f"({_first_line(error)})"
            )
            print(f"{prog}: {lost}; {left}{resume}", file=sys.stderr)
            return 1
        # Resuming a diverged run would diverge again at the same step: no hint to do so.
        if isinstance(error, KeyboardInterrupt):
            message, code = f"interrupted; {left}{resume}", 130
        elif isinstance(error, TrainingDivergedError):
            message, code = (
                f"training diverged: {error}; {left}; a resume keeps this run's settings, so "
                "start a new run to change them",
                1,
            )
        else:
            message, code = f"cannot write into {self.path}: {error}; {left}{resume}", 1
        print(f"{prog}: {message}", file=sys.stderr)
        return code

    def save_checkpoint(self, vae: VAE, config: dict[str, Any], **extra: Any) -> None:
        """Write ``checkpoint.pt`` (see :func:`save_checkpoint`); ``extra`` must hold the
        ``epoch`` and ``step`` it was taken at."""
        if self.writes:
            save_checkpoint(self.path / CHECKPOINT, vae, config, **extra)
        self.last_checkpoint = (extra["epoch"], extra["step"])


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def start_details(batch_size: int, state: TrainingState | None) -> str:
    """The end of a job's first line: how many processes train (under torchrun) and, for a
    resumed run, where it goes on from."""
    resuming = "" if state is None else f"; resuming from {state.position()}"
    return distributed.describe(batch_size) + resuming


def claim_run_directory(
    path: str | os.PathLike, *, mode: str
) -> contextlib.AbstractContextManager[RunDirectory]:
    """The run directory as this process holds it: :meth:`RunDirectory.claim` (``mode``) on
    one process and on rank 0 of many; :meth:`RunDirectory.follow` (no lock, no writes) on the
    other ranks of a torchrun run."""
    if distributed.ranks().is_main:
        return RunDirectory.claim(path, mode=mode)
    return RunDirectory.follow(path, mode=mode)


def run_arguments(args: Any) -> dict[str, Any]:
    """A script's parsed arguments as plain values for the checkpoint, without those that
    only steer this invocation (resume, overwrite)."""
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for key in ("resume", "overwrite", "given"):
        plain.pop(key, None)
    return plain


def resumed_args(
    saved: dict[str, Any],
    given: argparse.Namespace,
    training: dict[str, Any],
    overrides: Iterable[str],
) -> argparse.Namespace:
    """A resumed run's arguments: the ``saved`` ones (the checkpoint's ``"args"``), with the
    flags in ``overrides`` that the command (``given``, with its ``resume`` directory and the
    set ``given`` of flags typed) gave taken from it, and ``out_dir`` the run's directory.

    :raises ValueError: when ``--num-epochs`` is fewer than the epochs already begun
        (``training``, the checkpoint's training state).
    """
    args = argparse.Namespace(**saved)
    args.out_dir = given.resume  # the run's directory, wherever it is now
    for flag in overrides:
        name = flag.removeprefix("--").replace("-", "_")
        if flag in given.given:
            setattr(args, name, getattr(given, name))
    # An epoch under way (step > 0) must be finished too.
    done = training["epoch"] + (training["step"] > 0)
    if args.num_epochs < done:
        raise ValueError(
            f"--num-epochs {args.num_epochs}: the run in {given.resume} has already "
            f"{'started' if training['step'] else 'finished'} epoch {done}; give at least {done}"
        )
    return args


def _refuse_links(path: Path) -> None:
    """A symbolic link in place of a run's file or of the report's directory would make the
    run read or write outside its directory (and --overwrite delete there): refuse it."""
    for name in (LOCK, *RUN_FILES, EXPLAIN_DIR):
        if (path / name).is_symlink():
            raise ValueError(
                f"{path / name} is a symbolic link; a run directory holds its own files and "
                "follows no link out of it: remove the link"
            )


def _holds_a_run(path: Path) -> bool:
    return (path / LOCK).exists() or (path / CHECKPOINT).exists()


def _lock(path: Path) -> int:
    """Take the run directory's lock, or refuse naming the process that holds it. The lock is
    the kernel's (flock): it goes with its holder, even one killed by SIGKILL."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunDirectoryBusyError(
                f"run directory {path} is in use by process {holder} (a training, an "
                "evaluation or a report); wait for it to finish"
            ) from None
        raise ValueError(f"cannot lock run directory {path}: {error}") from error
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
