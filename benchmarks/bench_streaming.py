"""One epoch of fit streamed from a memory-mapped .npy through the DataLoader against the same
epoch in memory, side by side in one process, taking turns; and the peak memory of a run on a
memory-mapped file larger than the memory it is allowed.

    python benchmarks/bench_streaming.py                      # Fashion-MNIST, B=128 and 1024
    python benchmarks/bench_streaming.py --rss-gib 2          # + peak RSS on a 2 GiB .npy

The epoch is Fashion-MNIST's 60000 training images (Debian's dataset-fashion-mnist), written
once as float32 rows to a .npy in a temporary directory; the VAE is the README's default
(784-400-10, Bernoulli, dynamically binarized). Each variant trains the same model from the
same seed, so both do the very same arithmetic: only where the rows come from differs.
The RSS part runs in a child process (ru_maxrss of that process alone): a float32 .npy of
``--rss-gib`` GiB of random rows, one epoch's first ``--rss-steps`` steps at B=1024.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyro
import torch

import pyro_vae as pv


def epoch_seconds(data, batch_size: int, num_workers: int = 0) -> float:
    pyro.set_rng_seed(0)
    vae = pv.VAE(784, 10)
    started = time.perf_counter()
    pv.fit(
        vae,
        data,
        num_epochs=1,
        batch_size=batch_size,
        progress=False,
        generator=torch.Generator().manual_seed(1),
        num_workers=num_workers,
    )
    return time.perf_counter() - started


def rss_child(path: str, steps: int) -> None:
    """Train ``steps`` steps of B=1024 on the memory-mapped ``path``; print the peak RSS."""
    torch.set_num_threads(1)
    dataset = pv.ArrayDataset(path)
    subset = torch.utils.data.Subset(dataset, range(steps * 1024))
    vae = pv.VAE(dataset.array.shape[1], 10)
    pv.fit(vae, subset, num_epochs=1, batch_size=1024, progress=False)
    # VmHWM, this process's own peak: getrusage's ru_maxrss would count the parent's peak
    # (it survives fork and exec), and the parent wrote the file through its own map.
    status = Path("/proc/self/status").read_text()
    peak_kib = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")
    )
    print(peak_kib / 2**20)  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="128,1024")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--rss-gib", type=float, default=0.0)
    parser.add_argument("--rss-steps", type=int, default=20)
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]))
        return
    torch.set_num_threads(1)
    data = pv.load_dataset("fashion-mnist")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.npy"
        np.save(path, data.x_train.numpy())
        streamed = pv.ArrayDataset(path)
        print(f"torch {torch.__version__}, pyro {pyro.__version__}, 1 thread, "
              f"{args.repeats} alternating pairs")  # fmt: skip
        print("| batch | in memory (s/epoch) | streamed from .npy (s/epoch) | ratio |")
        print("|---|---|---|---|")
        for batch_size in map(int, args.batch_sizes.split(",")):
            memory, stream = [], []
            for repeat in range(args.repeats):
                # Each pair in the other order: the first of a pair may pay for warming up.
                for which in ("memory", "stream") if repeat % 2 == 0 else ("stream", "memory"):
                    if which == "memory":
                        memory.append(epoch_seconds(data.x_train, batch_size))
                    else:
                        stream.append(epoch_seconds(streamed, batch_size, args.num_workers))
            m, s = statistics.median(memory), statistics.median(stream)
            print(f"| {batch_size} | {m:.2f} | {s:.2f} | {s / m:.3f} |")
        if args.rss_gib:
            rows = int(args.rss_gib * 2**30 / (784 * 4))
            big = Path(tmp) / "big.npy"
            array = np.lib.format.open_memmap(big, mode="w+", dtype=np.float32, shape=(rows, 784))
            for start in range(0, rows, 65536):  # written in pieces: never whole in memory
                stop = min(rows, start + 65536)
                array[start:stop] = np.random.default_rng(start).random((stop - start, 784))
            array.flush()
            del array
            child = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(big), str(args.rss_steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            size = big.stat().st_size / 2**30
            peak = float(child.stdout.split()[-1])
            print(f"peak RSS of {args.rss_steps} steps of B=1024 on a {size:.2f} GiB memory-"
                  f"mapped .npy ({rows} rows): {peak:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
