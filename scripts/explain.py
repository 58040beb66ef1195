#!/usr/bin/env python
"""Explain a trained run: what its μ(x) and σ(x) are, measured on its own test set.

    python scripts/explain.py runs/digits        # writes runs/digits/explain/report.md

One section per question (per-example μ and σ; what each μ_i reads out; the reparameterization
cloud; the KL term three ways, with one wrong formula and one wrong reparameterization; the
aggregate posterior against N(0, I); active units), with its figures beside the report.
A run of --model m2 gets q(y|x)'s confusion matrix and entropy, with μ and σ of q(z|x,y) at the
most probable y; a run of --model cvae the spread of its completions per condition, with μ and
σ of q(z|x,c) (pyro_vae.explain.explain_m2, explain_cvae). The run's model kind chooses its
job (pyro_vae.jobs.vae, .m2, .cvae), which writes the report.
"""

from __future__ import annotations

import sys

PROG = "explain.py"

try:  # torch and Pyro take a second or so to import: a Ctrl-C then is one line too
    import argparse
    import contextlib
    import os
    from pathlib import Path

    import pyro

    from pyro_vae.explain import OUTPUT_FILES, REPORT_HEADING
    from pyro_vae.infer import distributed
    from pyro_vae.jobs import JOBS, RUN_FILES, cli, load_run
    from pyro_vae.jobs.run_directory import EXPLAIN_DIR, RunDirectory
except KeyboardInterrupt:
    print(f"{PROG}: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog=PROG, description="Write RUN_DIR/explain/report.md for a run of scripts/train.py."
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out-dir", type=Path, help=f"default: RUN_DIR/{EXPLAIN_DIR}")
    parser.add_argument(
        "--num-particles",
        type=cli.positive_int,
        default=2000,
        help="draws per input: of z for a VAE, of completions for a CVAE (M2: none)",
    )
    parser.add_argument("--seed", type=cli.seed, default=0, help="seeds the draws of z")
    parser.add_argument("--num-threads", type=cli.num_threads, help="CPU threads")
    return parser.parse_args(argv)


def check_out_dir(out_dir: Path) -> bool:
    """The report may replace an earlier report, whole or interrupted, never someone else's
    files (a report.md that explain.py did not write among them); the temporary files of an
    interrupted write go. Whether an earlier report is there."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a directory for the report")
    existing = out_dir if out_dir.is_dir() else _nearest_existing(out_dir)
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == out_dir else f" ({existing} is not writable)"
        raise ValueError(
            f"cannot write the report into {out_dir}{where}: give --out-dir a writable directory"
        )
    if not out_dir.is_dir():
        return False
    ours = set(OUTPUT_FILES)
    leftovers = [p for p in out_dir.iterdir() if p.name.startswith(".") and
                 p.name[1:].rsplit(".", 1)[0] in ours]  # fmt: skip
    theirs = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and p not in leftovers)
    report = out_dir / "report.md"
    if report.is_file() and not _written_by_explain(report):
        theirs.insert(0, "report.md, which explain.py did not write")
    if theirs:
        raise ValueError(
            f"{out_dir} holds files that explain.py did not write ({', '.join(theirs[:3])}"
            f"{', ...' if len(theirs) > 3 else ''}); choose an empty or new directory"
        )
    for leftover in leftovers:
        leftover.unlink()
    return report.is_file()


def _nearest_existing(path: Path) -> Path:
    """``path``'s nearest ancestor that exists: where the directories of the report would be
    made."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


def _written_by_explain(report: Path) -> bool:
    """Whether ``report`` begins as every report of explain.py does."""
    with open(report, "rb") as file:
        start = file.read(len(REPORT_HEADING.encode()))
    return start == REPORT_HEADING.encode()


def remove_report(out_dir: Path, made: bool) -> None:
    """After a write that failed (a full disk) or a Ctrl-C: no part of a report is left, and
    a directory this run made goes too (it held nothing of anyone else's: check_out_dir)."""
    for name in OUTPUT_FILES:
        with contextlib.suppress(OSError):
            (out_dir / name).unlink()
    if made:
        with contextlib.suppress(OSError):
            out_dir.rmdir()


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.set_num_threads(args.num_threads)
    if distributed.launched_by_torchrun():
        # Its ranks would compete for the run directory's lock, and the work is small.
        print(f"{PROG}: error: it runs on one process; start it without torchrun", file=sys.stderr)
        return 2
    out_dir = args.out_dir or args.run_dir / EXPLAIN_DIR
    made, earlier = not out_dir.exists(), False
    try:
        earlier = check_out_dir(out_dir)
        # A run no one can write into (read-only), explained into a directory elsewhere, is
        # read without its lock: no process can change it while it is read.
        read_only = args.run_dir.is_dir() and not os.access(args.run_dir, os.W_OK)
        claim = (
            contextlib.nullcontext()
            if read_only
            else RunDirectory.claim(args.run_dir, mode="existing", files=RUN_FILES)
        )
        with claim:
            loaded = load_run(args.run_dir)
            pyro.set_rng_seed(args.seed)
            report = JOBS[loaded.kind].explain(loaded, out_dir, args.num_particles)
    except (ValueError, FileNotFoundError) as error:
        if made:  # refused after the report's directory was made: it goes
            remove_report(out_dir, made)
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, OSError) as error:
        remove_report(out_dir, made)
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"error: {error}"
        gone = "; the earlier report there was removed with it" if earlier else ""
        print(f"{PROG}: {what}; no part of the report is left in {out_dir}{gone}", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 1
    chosen = loaded.selection
    epoch = (
        f"epoch {chosen['epoch']}, {chosen['how']}"
        if chosen is not None
        else f"epoch {loaded.checkpoint['epoch']}, the newest checkpoint"
    )
    cli.say(f"report of {epoch}, written to {report}")
    return 0


if __name__ == "__main__":
    cli.one_line_warnings(PROG)
    sys.exit(run())
