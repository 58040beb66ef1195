"""The run directory: one process holds it (a kernel lock) while it writes there, and every
file goes in atomically.

A run directory holds

- ``checkpoint.pt``: the weights, the config that rebuilds the model (its ``"model"`` names
  the kind: ``vae``, ``m2`` or ``cvae``), the script's arguments, the metrics so far and the
  training state that resumes it exactly;
- ``metrics.json`` / ``metrics.csv`` (a row per epoch), ``final_metrics.json``, the figures;
- ``evaluation.json`` (scripts/evaluate.py) and ``explain/`` (scripts/explain.py), later;
- ``.pyro_vae.lock``: held by whichever process writes into the directory, and the mark that
  the directory belongs to a run.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pyro_vae._files import atomic_write
from pyro_vae.checkpoint import save_checkpoint
from pyro_vae.infer import distributed
from pyro_vae.infer.state import TrainingDivergedError, TrainingState, describe_position
from pyro_vae.jobs.cli import say

CHECKPOINT = "checkpoint.pt"
# The weights of the best epoch by validation (the last epoch's without a validation set):
# what evaluate.py and explain.py read.
BEST = "best.pt"
LOCK = ".pyro_vae.lock"
EXPLAIN_DIR = "explain"
# The files every run writes (and evaluate.py's); each job module names its own (FILES), and
# pyro_vae.jobs.RUN_FILES is the whole list a directory is claimed with.
COMMON_FILES = (
    CHECKPOINT,
    BEST,
    "metrics.json",
    "metrics.csv",
    "final_metrics.json",
    "evaluation.json",
)


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

    def __init__(self, path: Path, lock_fd: int | None, files: Sequence[str]) -> None:
        self.path = path
        self.files = tuple(files)
        """The names of the run's files: what --overwrite removes and links are refused for."""
        self._lock_fd = lock_fd
        self.writes = lock_fd is not None
        """False for :meth:`follow`'s directory: the other ranks of a run write nothing."""
        self.last_checkpoint: tuple[int, int] | None = None
        """(epochs done, steps into the next) of the newest checkpoint, if there is one."""
        self.leftovers: list[str] = []
        """Temporary files of an interrupted write, removed when the directory was claimed."""

    @classmethod
    @contextlib.contextmanager
    def claim(
        cls, path: str | os.PathLike, *, mode: str, files: Sequence[str]
    ) -> Iterator[RunDirectory]:
        """Hold ``path`` for the duration of the ``with`` block.

        :param mode: ``"new"``: a fresh run; the directory must be empty or absent.
            ``"overwrite"``: a fresh run that first removes every file of the run there.
            ``"existing"``: the run there, to resume, evaluate or explain it.
        :param files: the names of the run's files (``pyro_vae.jobs.RUN_FILES``).
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
        _refuse_links(path, files)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create output directory {path}: {error}") from error
        if not os.access(path, os.W_OK):
            what = "run directory" if mode == "existing" else "output directory"
            raise ValueError(f"{what} {path} is not writable")
        held_before = _holds_a_run(path)  # before our lock file makes it look like a run
        lock_fd = _lock(path)
        try:
            directory = cls(path, lock_fd, files)
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
    def follow(
        cls, path: str | os.PathLike, *, mode: str, files: Sequence[str]
    ) -> Iterator[RunDirectory]:
        """The run directory as a rank other than 0 of a run on many processes sees it: rank 0
        holds it (:meth:`claim`, with ``mode``), and every write here does nothing."""
        del mode  # rank 0's business
        yield cls(Path(path), None, files)

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
        for name in self.files:
            for leftover in self.path.glob(f".{name}.*"):
                leftover.unlink(missing_ok=True)
                removed.append(leftover.name)
        return removed

    def _remove_run_files(self) -> None:
        for name in self.files:
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

    def save_checkpoint(self, module: Any, config: dict[str, Any], **extra: Any) -> None:
        """Write ``checkpoint.pt`` (see :func:`save_checkpoint`); ``extra`` must hold the
        ``epoch`` and ``step`` it was taken at."""
        if self.writes:
            save_checkpoint(self.path / CHECKPOINT, module, config, **extra)
        self.last_checkpoint = (extra["epoch"], extra["step"])

    def save_best(
        self,
        module: Any,
        config: dict[str, Any],
        selection: dict[str, Any],
        args: dict[str, Any] | None = None,
    ) -> None:
        """Write ``best.pt``: the weights of the epoch ``selection`` names (its ``"epoch"``,
        the validation ``"metric"`` and its ``"value"``), which evaluate.py and explain.py
        read, with the run's ``args``, so that a copy from another run is told apart."""
        if self.writes:
            extra = {} if args is None else {"args": args}
            save_checkpoint(self.path / BEST, module, config, selection=selection, **extra)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def claim_run_directory(
    path: str | os.PathLike, *, mode: str, files: Sequence[str]
) -> contextlib.AbstractContextManager[RunDirectory]:
    """The run directory as this process holds it: :meth:`RunDirectory.claim` (``mode``) on
    one process and on rank 0 of many; :meth:`RunDirectory.follow` (no lock, no writes) on the
    other ranks of a torchrun run."""
    # Before the group is joined (a resume claims its directory before it reads the checkpoint
    # that says which device to join on), torchrun's RANK says which process this is.
    if distributed.process_rank() == 0:
        return RunDirectory.claim(path, mode=mode, files=files)
    return RunDirectory.follow(path, mode=mode, files=files)


def _refuse_links(path: Path, files: Sequence[str]) -> None:
    """A symbolic link in place of a run's file or of the report's directory would make the
    run read or write outside its directory (and --overwrite delete there): refuse it."""
    for name in (LOCK, *files, EXPLAIN_DIR):
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
