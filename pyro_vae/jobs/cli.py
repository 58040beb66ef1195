"""What the scripts in scripts/ share on the command line: argument types that refuse nonsense
with one line, and output that can never cost training state.

The scripts are thin on purpose (arguments, data, model, fit, evaluate, write); these pieces
are the same in all of them, so they live here once.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

# The largest seed every generator takes: numpy's global seed (set by pyro.set_rng_seed) must
# fit in 32 bits, and a larger one would fail only after the data were loaded.
MAX_SEED = 2**32 - 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line on stderr (no usage block) and exit code 2,
    "(default: …)" is shown only for arguments that have a real default, and abbreviated
    flags are refused (``--no-prog`` for ``--no-progress`` would slip past the check of which
    flags a resumed run may change)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _DefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to the help of arguments whose default is a value: a default of
    None means "decided later" and its help text says how, and a flag's False is no news."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    if text.strip() == "0":
        return 0
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**32 - 1, got {text!r}")
    return value


# The scripts' models are float32 (torch's default dtype), and every number flag meets their
# parameters: a learning rate or a clip norm below float32's smallest normal number rounds to
# nothing there (the run would train nothing), and one above its largest is infinite.
FLOAT32 = torch.finfo(torch.float32)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    if not FLOAT32.tiny <= value <= FLOAT32.max:
        raise argparse.ArgumentTypeError(
            f"expected a number from {FLOAT32.tiny:.3g} to {FLOAT32.max:.3g} (a normal float32, "
            f"the models' dtype), got {text!r}"
        )
    return value


def widths(text: str) -> list[int]:
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive widths such as 512,256, got {text!r}"
        ) from None


def dataset(text: str) -> str:
    """A dataset's name as it is, or a path made absolute, so that a run read back from
    another directory finds its data (a folder named like a dataset: write ./digits)."""
    from pyro_vae.data import DATASET_NAMES

    if text in DATASET_NAMES:
        return text
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a dataset's name or a path, got ''")
    return os.path.abspath(os.path.expanduser(text))


def image_size(text: str) -> list[int]:
    try:
        height, width = (positive_int(part) for part in text.split(","))
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected a height and a width such as 28,28, got {text!r}"
        ) from None
    return [height, width]


def likelihood_scale(text: str) -> float | str:
    if text in ("learned", "learned-per-feature"):
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a number > 0, learned or learned-per-feature, got {text!r}"
        ) from None


def device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected auto, cpu, cuda or cuda:N, got {text!r}"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available here")
    return str(parsed)


def num_threads(text: str) -> int:
    """A thread count no larger than the CPU cores this process may use: more threads than
    cores only compete with each other (and an absurd count makes OpenMP abort)."""
    value = positive_int(text)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if value > (cores or 1):
        raise argparse.ArgumentTypeError(
            f"expected at most the {cores} CPU cores this process may use, got {text!r}"
        )
    return value


def set_num_threads(num_threads: int | None) -> None:
    """Use ``num_threads`` CPU threads for torch's operations (``None``: torch's default, one
    per core). The small networks here gain little from threads, and threads that compete
    with other work for the same cores can make a step several times slower than one thread:
    on a shared machine, 1 is the safe choice."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def say(text: str) -> None:
    """Print a line of progress, beside any progress bar.

    A closed stdout (``train.py | head``) must never stop training before its checkpoint:
    the first failed write sends the rest of the output to os.devnull and training goes on.
    A stdout closed from the start (``train.py >&-``: Python then has no ``sys.stdout``) is
    no stdout at all: the output goes nowhere. (File descriptor 1 is left alone then: a file
    the run opened since, its lock say, may have been given that number.) On many processes
    (torchrun) only rank 0 speaks.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    if sys.stdout is None:
        return
    try:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a replaced sys.stdout without a fd
            sys.stdout = open(os.devnull, "w")  # lives as long as the process
        finally:
            os.close(devnull)


def one_line_warnings(prog: str) -> None:
    """A script's warnings (a data_dir holding its files twice, a KL that falls back to Monte
    Carlo) as one line on stderr each, ``PROG: warning: ...``, instead of Python's two (the
    file and line, then the line of source). For a script run from the shell only: it sets
    the process's way of showing warnings."""

    def one_line(message: Warning | str, *args: object, **kwargs: object) -> str:
        return f"{prog}: warning: {message}\n"

    warnings.formatwarning = one_line


class _SayHandler(logging.Handler):
    """A ``pyro_vae`` log record as a script's line: INFO (a long estimate's progress) on
    stdout through :func:`say`, a warning or worse on stderr as ``PROG: warning: ...``."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            say(record.getMessage())
        else:
            level = "warning" if record.levelno == logging.WARNING else "error"
            print(f"{self.prog}: {level}: {record.getMessage()}", file=sys.stderr)


def configure_logging(prog: str) -> None:
    """What a script shows of the ``pyro_vae`` loggers: warnings (one line each, on stderr)
    and ``pyro_vae.progress`` (a long evaluation's line at least every 10 s when no progress
    bar shows, on stdout). ``fit``'s line per epoch (``pyro_vae.infer.fit``, INFO) is left
    out: the scripts print their own, richer, epoch rows. For a script run from the shell:
    it sets the process's handlers."""
    package = logging.getLogger("pyro_vae")
    package.handlers = [h for h in package.handlers if not isinstance(h, _SayHandler)]
    package.addHandler(_SayHandler(prog))
    package.setLevel(logging.WARNING)
    package.propagate = False
    logging.getLogger("pyro_vae.progress").setLevel(logging.INFO)


def wall_seconds() -> float:
    """Seconds since this process started, imports included (from /proc on Linux; elsewhere
    since this module was imported)."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def stage_printer() -> Callable[[str], None]:
    """A line per stage of a long evaluation, with the seconds since the start: some stages
    take minutes on big data."""
    started = time.perf_counter()

    def stage(text: str) -> None:
        say(f"[{time.perf_counter() - started:6.1f}s] {text}")

    return stage


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """scripts/train.py's flags that say what data a run trains on: a dataset's name or your
    own data's path, its test set, an image size, the directory of the IDX files, and the
    workers that read a streamed .npy."""
    from pyro_vae.data import DATASET_NAMES
    from pyro_vae.user_data import TEST_FRACTION

    parser.add_argument(
        "--dataset",
        type=dataset,
        default="digits",
        metavar="NAME_OR_PATH",
        help=f"{', '.join(DATASET_NAMES)} (digits is always offline), or your own data: a "
        ".npy file (images (N, H, W) or (N, C, H, W), C 1 or 3, or rows (N, D); "
        "memory-mapped), a .npz file or a .pt file (a tensor, or a dict of tensors) with arrays "
        "named x or x_train, optional y or y_train (integer labels), optional x_test and y_test; "
        "or a folder of PNG/JPEG images, one subfolder per class (none: unlabelled). uint8 "
        "values are scaled to [0, 1], others kept: values outside [0, 1] need --likelihood "
        "normal or laplace",
    )
    parser.add_argument(
        "--test-dataset",
        type=dataset,
        metavar="PATH",
        help="the test set of a --dataset PATH, in the same forms (default: the file's x_test, "
        f"else {100 * TEST_FRACTION:.0f}%% of its rows, drawn with --seed)",
    )
    parser.add_argument(
        "--image-size",
        type=image_size,
        metavar="H,W",
        help="resize a folder's images to this height and width (default: images of unequal "
        "size are refused)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="directory with the dataset's IDX files (default: Debian's files, then the cache "
        "~/.cache/pyro_vae)",
    )
    parser.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=0,
        help="DataLoader worker processes that read a --model vae's batches from a .npy, "
        "which streams from its memory map (default 0: read in the training process; the "
        "numbers are the same either way). Other data are in memory",
    )
