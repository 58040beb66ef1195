"""What the scripts run: one job module per model kind, one runner, and the runs they write.

Nothing in the library imports this package: it sits on top of the library (docs/design.md,
"Layers"). Each job module (:mod:`~pyro_vae.jobs.vae`, :mod:`~pyro_vae.jobs.m2`,
:mod:`~pyro_vae.jobs.cvae`) has the same few functions: its flags (``add_arguments``,
``OWN_FLAGS``), its checks (``check_arguments``, ``check_run``), its config (``new_config``),
what it trains (``prepare``), its epoch row (``epoch_row``, ``epoch_line``), its final score
and figures (``finish``, ``summary``), and its evaluation and report (``evaluate``, ``table``,
``explain``). :data:`JOBS` finds the one a run's kind names.
"""

from __future__ import annotations

import os
from types import ModuleType

from pyro_vae.jobs import cvae, m2, vae
from pyro_vae.jobs.run_directory import COMMON_FILES
from pyro_vae.jobs.runs import Run, read_run

# One line per model kind: the config's "model" to the job that trains, scores and shows it.
JOBS: dict[str, ModuleType] = {"vae": vae, "m2": m2, "cvae": cvae}
# Every file a run of any kind, its evaluation and its report write into the run directory.
RUN_FILES = tuple(
    dict.fromkeys([*COMMON_FILES, *(name for job in JOBS.values() for name in job.FILES)])
)


def load_run(directory: str | os.PathLike, *, best: bool = True) -> Run:
    """Read back a run of scripts/train.py, of any model kind: its model, arguments, data and
    the very test set it scored, from its ``checkpoint.pt``, checked as a resume checks it
    (the test set's digest, the validation rows, M2's labelled rows).

    :param best: the weights of the epoch the run kept and scored on the test set (``best.pt``:
        the best by validation, ``run.selection`` says which), where the run kept them; else
        (and for runs from before there was a validation set) the newest, ``checkpoint.pt``'s
        alone (one read, as a resume needs).

    :raises ValueError: when ``directory`` holds no run, its checkpoint is damaged or was not
        written by scripts/train.py, or what the run trained on or scored cannot be rebuilt
        from the data as it was (the data files changed since).
    :raises FileNotFoundError: when the run's dataset cannot be found any more.
    """
    run = read_run(directory, kinds={kind: job.FILES for kind, job in JOBS.items()}, best=best)
    JOBS[run.kind].check_run(run)
    return run


__all__ = ["JOBS", "RUN_FILES", "Run", "load_run"]
