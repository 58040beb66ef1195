"""How many CPU threads a run trains with, chosen for the work: a few steps timed with one
thread and with every core, and the faster kept (issue 24, item 1).

torch's default, one thread per core, is slow for this project's small networks on a shared
machine: threads that compete with other work for the same cores made digits epochs several
times slower than one thread. Which is faster depends on the model's size and on the machine's
load at the time, so a new run times :data:`PROBE_STEPS` steps of its own training, on a copy
of its model, at each count, and keeps the fastest. The probe takes turns between the counts
(:data:`PROBE_ROUNDS` rounds), so that a change of load in the middle weighs on both, and
keeps more threads only when they are clearly faster (:data:`MARGIN`): on a shared machine the
fewer threads are the safer bet.

The probe changes nothing of the run: it trains a deep copy of the model, on a fork of every
random state (torch's, numpy's, Python's), and removes what its copy put in Pyro's param
store. The count is saved with the run's arguments, so a resume goes on with it unless
``--num-threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import random
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch

from pyro_vae.infer import distributed
from pyro_vae.infer.compiled import record_compile_times
from pyro_vae.infer.fit import fit
from pyro_vae.infer.state import TrainingDivergedError
from pyro_vae.jobs.runs import Setup

PROBE_STEPS = 5
"""Steps timed at each thread count, in each round (after one untimed step)."""
PROBE_ROUNDS = 2
"""Rounds of turns between the thread counts."""
MARGIN = 1.2
"""More threads are kept only when their median step is this many times faster than the
fewest's. The costs are lopsided: one thread where two were faster loses at most this factor,
while two threads that meet a neighbour after the probe ran 4-13x slower (benchmarks/README.md,
"Threads and compile by default"); 1.1 kept 2 threads on digits at 7.8 against 7.1 ms a step,
and that run then trained 4x slower beside a CI run. 1.2 is the issue's own bound on what the
default may lose to the best fixed count."""


@dataclass(frozen=True)
class Choice:
    """A run's thread count and why, with the eager step's time at that count where it was
    timed (the fastest step: the compile decision reads it)."""

    threads: int
    reason: str
    step_seconds: float | None = None

    def line(self) -> str:
        """The choice as the run's first line says it."""
        return f"threads: {self.threads} ({self.reason})"


def available_cores() -> int:
    """The CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _milliseconds(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms/step"


def choose(timings: dict[int, list[float]], margin: float = MARGIN) -> tuple[int, str]:
    """The thread count to keep from ``timings`` (seconds of each timed step, by count): the
    fewest threads whose median step is within ``margin`` of the fastest median; and the
    reason, naming each count's median."""
    if not timings or any(not times for times in timings.values()):
        raise ValueError("choose needs at least one timed step for every thread count")
    medians = {count: statistics.median(times) for count, times in sorted(timings.items())}
    fastest = min(medians.values())
    chosen = min(count for count, median in medians.items() if median <= fastest * margin)
    steps = max(len(times) for times in timings.values())
    measured = ", ".join(
        f"{count} thread{'s' if count > 1 else ''} {_milliseconds(median)}"
        for count, median in medians.items()
    )
    return chosen, f"timed {steps} steps each: {measured}"


class _Enough(Exception):
    """Ends a probe's fit once its steps are timed."""


@contextlib.contextmanager
def _forked_random_states() -> Iterator[None]:
    """Every random state as it was before, whatever the block draws."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def time_steps(setup: Setup, args: argparse.Namespace, num_threads: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` training steps of ``setup`` (after one untimed step) at
    ``num_threads`` threads, on a copy of its model; leaves torch at ``num_threads``."""
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    store = pyro.get_param_store()
    before = set(store.keys())
    marks: list[float] = []

    def mark(_: Any) -> None:
        marks.append(time.perf_counter())
        if len(marks) > steps:
            raise _Enough

    model = copy.deepcopy(setup.model)
    device = next(iter(model.parameters())).device
    try:
        with _forked_random_states(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the run's own fit says what there is to say
            fit(  # fit's own module: a test that watches pv.fit sees the run's fit alone
                model,
                setup.training_data,
                # Enough epochs for the steps, however few steps an epoch has.
                num_epochs=steps + 2,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                loss=copy.deepcopy(setup.loss),
                # As the run's fit will: a streamed set's binarization is decided on all its
                # rows by the job (fit alone would judge the first batch), and its workers.
                binarize=setup.binarize,
                num_workers=getattr(args, "num_workers", 0),
                checkpoint=mark,
                checkpoint_every=1,
                progress=False,
                generator=torch.Generator(device).manual_seed(0),
            )
    except _Enough:
        pass
    except TrainingDivergedError:
        # The model diverges within its first steps: the run's own fit meets it and says
        # where, with its checkpoint; the probe keeps what it timed, perhaps nothing.
        pass
    finally:
        for name in set(store.keys()) - before:
            del store[name]
    return [later - earlier for earlier, later in itertools.pairwise(marks)]


def probe(setup: Setup, args: argparse.Namespace, counts: list[int]) -> dict[int, list[float]]:
    """Steps timed at each of ``counts`` threads, taking turns (:data:`PROBE_ROUNDS`)."""
    timings: dict[int, list[float]] = {count: [] for count in counts}
    for _ in range(PROBE_ROUNDS):
        for count in counts:
            timings[count] += time_steps(setup, args, count, PROBE_STEPS)
    return timings


def choose_threads(
    setup: Setup, args: argparse.Namespace, *, given: bool, resumed: bool = False
) -> Choice:
    """The run's thread count, set in torch and in ``args.num_threads`` (saved with the run):
    ``--num-threads`` where ``given``; a resumed run's own; the environment's
    ``OMP_NUM_THREADS``; torch's default on a GPU or under torchrun (which sets
    ``OMP_NUM_THREADS`` itself); else the faster of one thread and every core, timed."""
    if given or (resumed and args.num_threads is not None):
        # Set already, before the data were read (cli.set_num_threads).
        return Choice(args.num_threads, "--num-threads" if given else "the run's own")
    choice = _default_choice(setup, args)
    torch.set_num_threads(choice.threads)
    args.num_threads = choice.threads
    return choice


def _default_choice(setup: Setup, args: argparse.Namespace) -> Choice:
    current = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return Choice(current, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    if torch.device(args.device).type != "cpu":
        return Choice(current, f"torch's default; training on {args.device}")
    if distributed.launched_by_torchrun():
        return Choice(current, "torch's default under torchrun")
    cores = available_cores()
    if cores == 1:
        return Choice(1, "one core")
    timings = probe(setup, args, [1, cores])
    if not all(timings.values()):
        return Choice(1, UNTIMED)
    chosen, reason = choose(timings)
    return Choice(chosen, reason, min(timings[chosen]))


def step_seconds(setup: Setup, args: argparse.Namespace, choice: Choice) -> float:
    """The eager step's time at the run's thread count, the fastest of the steps timed (the
    probe's, else timed now): what compiling shortens is the step's own work, which the
    fastest step measures best; a neighbour's burst of load slows eager and compiled steps
    alike."""
    if choice.step_seconds is not None:
        return choice.step_seconds
    if choice.reason == UNTIMED:  # the probe's steps diverged already: not run again
        raise Untimed
    times = time_steps(setup, args, choice.threads, PROBE_STEPS)
    if not times:
        raise Untimed
    return min(times)


class Untimed(Exception):
    """No step could be timed: the model's first training steps diverged."""


UNTIMED = "untimed: the first training steps diverged"
"""What the first line says of a choice made without a timed step."""


def choose_speed(
    job: Any,
    run: Any,
    setup: Setup,
    args: argparse.Namespace,
    *,
    threads_given: bool,
    resumed: bool = False,
) -> str:
    """A run's thread count (:func:`choose_threads`) and, for a job that can compile (its
    ``decide_compile``), whether it compiles: ``--compile auto`` decided from the run's own
    eager steps, then saved as ``on`` or ``off`` (``args.compile`` becomes a bool, as a
    resumed run's already is). Returns what the run's first line says of both.
    ``threads_given``: the command gave ``--num-threads``."""
    choice = choose_threads(setup, args, given=threads_given, resumed=resumed)
    line = choice.line()
    decide = getattr(job, "decide_compile", None)
    if decide is None:  # only the VAE compiles; its flag is refused for the others
        args.compile = args.compile is True or args.compile == "on"
        return line
    if isinstance(args.compile, bool):  # a resumed run's own choice
        wanted, said = ("on" if args.compile else "off"), "the run's own"
    else:
        wanted, args.compile = args.compile, args.compile == "on"
        said = f"--compile {wanted}"
    if wanted == "auto":
        steps = args.num_epochs * -(-len(setup.training_data[0]) // args.batch_size)
        try:
            args.compile, why = decide(
                run, setup, args, steps, lambda: step_seconds(setup, args, choice)
            )
        except Untimed:
            args.compile, why = False, UNTIMED
        said = f"auto: {why}"
    # Each compile's seconds, noted for a later run's estimate (compiled.compile_estimate).
    record_compile_times(job.compile_key(run, setup, args) if args.compile else None)
    return f"{line}; compile: {'on' if args.compile else 'off'} ({said})"
