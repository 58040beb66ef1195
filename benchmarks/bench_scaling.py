"""Throughput of ``pyro_vae.fit`` on one process and, under ``torchrun``, on several: examples per
second over the Fashion-MNIST training set, to compute the scaling efficiency.

    python benchmarks/bench_scaling.py --threads 1      # 1 process x 1 thread
    python benchmarks/bench_scaling.py --threads 2      # 1 process x 2 threads
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_scaling.py               # 2 x 1
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_scaling.py --batch-size 64

The model is the 784-400-50 VAE (Bernoulli likelihood, ``Trace_ELBO``, dynamic binarization as
``fit`` does by default), trained on the 60,000 training images of Fashion-MNIST (offline:
``pv.load_dataset("fashion-mnist")``). ``--batch-size`` is per process, as ``scripts/train.py``'s
is under torchrun: the global batch is processes x batch size. Every rank builds the model from
the same seed (DDP hands rank 0's weights to all anyway), then reseeds its own noise
(``distributed.noise_seed``), and all ranks shuffle with the same generator seed, as ``fit``
requires.

Only the last epoch is timed (``History.epoch_seconds[-1]``), so that the first step's costs
(Pyro's first trace, the data checks, DDP's first bucket) are out of it. With several processes
the epoch time taken is the slowest rank's; the ranks wait for each other at every step's
gradient all-reduce, so they differ little. Examples per second = 60,000 / that epoch time: every
rank sees its shard, 30,000 examples each on two processes. ``torchrun`` sets OMP_NUM_THREADS=1
in every process unless told otherwise, so each rank uses one thread; ``--threads`` sets
``torch.set_num_threads`` explicitly. Rank 0 alone prints.
"""

from __future__ import annotations

import argparse

import pyro
import torch

import pyro_vae as pv
from pyro_vae.infer import distributed

HIDDEN, LATENT = 400, 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch-size", type=int, default=128, help="examples per step on each process"
    )
    parser.add_argument(
        "--num-epochs", type=int, default=2, help="epochs; the last one alone is timed"
    )
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads(THREADS) (default: torch's own)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    group, device = distributed.join("cpu")
    try:
        data = pv.load_dataset("fashion-mnist")
        # The same model on every rank, then each rank's own noise (fit refuses equal states).
        pyro.set_rng_seed(0)
        vae = pv.build_vae(data.data_dim, LATENT, hidden_dims=[HIDDEN]).to(device)
        pyro.set_rng_seed(distributed.noise_seed(0, group.rank))
        history = pv.fit(
            vae,
            data.x_train,
            num_epochs=args.num_epochs,
            batch_size=args.batch_size,
            progress=False,
            generator=torch.Generator().manual_seed(0),
        )
        seconds = max(distributed.all_gather(history.epoch_seconds[-1]))
        if group.is_main:
            examples = len(data.x_train)
            print(
                f"processes {group.world_size}  threads/process {torch.get_num_threads()}  "
                f"batch/process {args.batch_size}  global batch "
                f"{group.world_size * args.batch_size}  epoch {args.num_epochs} "
                f"{seconds:.2f} s  examples/s {examples / seconds:.0f}  "
                f"(epoch seconds on rank 0: {', '.join(f'{s:.2f}' for s in history.epoch_seconds)})"
            )
    finally:
        distributed.leave()


if __name__ == "__main__":
    main()
