#!/usr/bin/env python
"""What `scripts/train.py`'s speed defaults cost and gain (issue 24, items 1-3): its thread
choice against fixed counts, `--compile auto` against `off`, and the final evaluation's
throughput against a training epoch's.

    python benchmarks/bench_defaults.py threads            # README main command, 3 thread settings
    python benchmarks/bench_defaults.py compile-digits     # digits default, auto vs off
    python benchmarks/bench_defaults.py compile-fashion    # Fashion-MNIST 20 epochs, auto vs off
    python benchmarks/bench_defaults.py flops              # GFLOP/s: training epoch vs log p(x)
    python benchmarks/bench_defaults.py threads --only default "--num-threads 1" --repeats 5

The first three run `scripts/train.py` as a user does, each run a process of its own, the
settings taking turns (`--repeats` rounds) so that a change of the machine's load weighs on
all; each run's process wall time (imports, data, the thread probe and the final evaluation
included) and its training time (`final_metrics.json`'s train_seconds: fit's epochs with the
compile, without the probe) are kept with the 1-minute load average before and after it.
OMP_NUM_THREADS is removed from the runs' environment (where set it decides the thread count,
and no probe runs). Every run reads and writes pyro_vae's cache (compile records, Inductor's
kernels) in one fresh directory (XDG_CACHE_HOME) per invocation: the first compiling run
meets a cold cache as a new user does, the later ones a warm cache, and each row says which.
Results go to benchmarks/results/defaults-<part>.json.

`flops` runs in this process, on one thread: one epoch of fit and the K=100 importance-weighted
log p(x) on Fashion-MNIST-sized data (784-400-10, the README's default VAE), with the FLOPs
counted from the networks' matrix products (comment at :func:`flops_per_row`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Each part: (name, extra train.py arguments) per setting; a part's common arguments follow.
PARTS: dict[str, tuple[list[tuple[str, list[str]]], list[str]]] = {
    "threads": (
        [
            ("default", []),
            ("--num-threads 1", ["--num-threads", "1"]),
            ("--num-threads 2", ["--num-threads", "2"]),
        ],
        [],
    ),
    "compile-digits": (
        [("--compile auto", []), ("--compile off", ["--compile", "off"])],
        [],
    ),
    "compile-fashion": (
        [
            ("--compile auto", []),
            ("--compile off", ["--compile", "off"]),
            ("--compile on", ["--compile", "on"]),
        ],
        # --num-iw-particles 0: the final evaluation is no part of what compiling changes, and
        # at K=100 it costs as much as several epochs here.
        ["--dataset", "fashion-mnist", "--num-epochs", "20", "--num-iw-particles", "0"],
    ),
}


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def one_run(extra: list[str], out_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """One `scripts/train.py` process: its wall time, training time, decisions and loads."""
    before = loadavg()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "scripts/train.py", "--no-progress", "--out-dir", str(out_dir), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"train.py {' '.join(extra)} failed:\n{done.stdout}\n{done.stderr}")
    first = done.stdout.splitlines()[0]
    final = json.loads((out_dir / "final_metrics.json").read_text())
    threads = re.search(r"threads: ([^;]*\))|threads: (\d+[^;]*)", first)
    compiled = re.search(r"compile: (.*)$", first)
    return {
        "wall_seconds": wall,
        "train_seconds": final["train_seconds"],
        "load_before": before,
        "load_after": loadavg(),
        "threads": threads.group(0) if threads else None,
        "compile": compiled.group(1) if compiled else None,
    }


def run_part(part: str, repeats: int, out: Path, only: list[str] | None = None) -> dict[str, Any]:
    """The part's settings taking turns, ``repeats`` rounds; ``out`` is rewritten after every
    run, so that a part stopped early keeps what it measured. ``only`` keeps the settings so
    named (more rounds of a pair, without the slow ones)."""
    settings, common = PARTS[part]
    if only:
        unknown = set(only) - {name for name, _ in settings}
        if unknown:
            raise SystemExit(f"--only: no setting {sorted(unknown)} in {part}")
        settings = [(name, flags) for name, flags in settings if name in only]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in settings}
    result: dict[str, Any] = {
        "part": part,
        "command": ["python", "scripts/train.py", *common],
        "cores": os.cpu_count(),
        "repeats": repeats,
        "runs": rows,
    }
    with tempfile.TemporaryDirectory(prefix="bench_defaults_") as scratch:
        env["XDG_CACHE_HOME"] = str(Path(scratch) / "cache")
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        for round_ in range(repeats):
            for name, extra in settings:
                out_dir = Path(scratch) / f"run{round_}-{len(rows[name])}-{name.replace(' ', '')}"
                row = one_run([*common, *extra], out_dir, env)
                row["round"] = round_
                rows[name].append(row)
                print(
                    f"{part} round {round_}: {name:>16}  wall {row['wall_seconds']:6.1f}s  "
                    f"training {row['train_seconds']:6.1f}s  load {row['load_before']:.2f}"
                    f"->{row['load_after']:.2f}  {row['threads'] or ''}  compile: {row['compile']}",
                    flush=True,
                )
                out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {
        name: {
            "median_wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
            "median_train_seconds": statistics.median(r["train_seconds"] for r in runs),
        }
        for name, runs in rows.items()
    }
    for name, medians in summary.items():
        print(
            f"{part}: {name:>16}  median wall {medians['median_wall_seconds']:6.1f}s  "
            f"median training {medians['median_train_seconds']:6.1f}s"
        )
    result["summary"] = summary
    return result


def flops_per_row(dims: list[int]) -> int:
    """FLOPs of one row's forward pass through an MLP of widths ``dims``: a Linear(a, b) is
    a·b multiply-adds, 2·a·b FLOPs (biases, activations and the log-densities are O(a + b),
    under 1% here, and not counted)."""
    return sum(2 * a * b for a, b in itertools.pairwise(dims))


def run_flops(num_test: int, num_particles: int) -> dict[str, Any]:
    import pyro
    import torch

    import pyro_vae as pv
    from pyro_vae.data import load_dataset

    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    splits = load_dataset("fashion-mnist")
    x_train, x_test = splits.x_train, torch.bernoulli(splits.x_test[:num_test])
    assert isinstance(x_train, torch.Tensor)  # the named datasets load into memory
    data_dim, hidden, latent = x_train.shape[1], 400, 10
    vae = pv.VAE(data_dim, latent, hidden_dims=(hidden,))
    # Per row, forward: the encoder 784-400-20 (location and scale of q(z|x)) and the decoder
    # 10-400-784, 1.28 MFLOP. A training step is the forward pass and a backward pass of
    # about twice its FLOPs (the gradients of both the inputs and the weights of each
    # product): 3x. log p(x) runs the forward pass alone, once per (example, particle) row:
    # the encoder too is run on each of the K copies of a row (estimators.log_likelihood
    # repeats the batch), so its FLOPs are counted as done, though one encoder pass per
    # example would do.
    forward = flops_per_row([data_dim, hidden, 2 * latent]) + flops_per_row(
        [latent, hidden, data_dim]
    )
    started = time.perf_counter()
    pv.fit(vae, x_train, num_epochs=1, batch_size=128, progress=False)
    epoch = time.perf_counter() - started
    train_flops = 3 * forward * len(x_train)
    started = time.perf_counter()
    pv.log_likelihood(vae, x_test, num_particles=num_particles, progress=False)
    evaluation = time.perf_counter() - started
    eval_flops = forward * num_test * num_particles
    result = {
        "part": "flops",
        "threads": 1,
        "forward_flops_per_row": forward,
        "train_examples": len(x_train),
        "epoch_seconds": epoch,
        "epoch_gflops_per_second": train_flops / epoch / 1e9,
        "test_examples": num_test,
        "num_particles": num_particles,
        "log_likelihood_seconds": evaluation,
        "log_likelihood_gflops_per_second": eval_flops / evaluation / 1e9,
        "load": loadavg(),
    }
    print(
        f"training epoch ({len(x_train)} rows, B=128): {epoch:.1f}s, "
        f"{result['epoch_gflops_per_second']:.2f} GFLOP/s; log p(x) ({num_test} rows, "
        f"K={num_particles}): {evaluation:.1f}s, "
        f"{result['log_likelihood_gflops_per_second']:.2f} GFLOP/s; load {result['load']:.2f}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=[*PARTS, "flops"])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of turns")
    parser.add_argument("--num-test", type=int, default=10_000, help="flops: test rows")
    parser.add_argument("--num-particles", type=int, default=100, help="flops: K")
    parser.add_argument("--out", type=Path, help="JSON results (default under results/)")
    parser.add_argument("--only", nargs="+", help="run only the settings so named")
    args = parser.parse_args()
    out = args.out or RESULTS / f"defaults-{args.part}.json"
    result = (
        run_flops(args.num_test, args.num_particles)
        if args.part == "flops"
        else run_part(args.part, args.repeats, out, args.only)
    )
    result["loadavg_at_end"] = Path("/proc/loadavg").read_text().strip()
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
