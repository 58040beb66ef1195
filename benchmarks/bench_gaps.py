#!/usr/bin/env python
"""How long the inference gaps take against a training epoch, at MNIST's size, on the CPU.

    python benchmarks/bench_gaps.py                  # 784 inputs, hidden 400, latent 10

Times one epoch of `pyro_vae.fit` over 60 000 examples (batch 128) and
`pyro_vae.infer.gaps.inference_gaps` on 500 of them (its defaults: 300 SVI steps of 2 draws,
ELBOs from 100 draws, log p(x) from 1000), on the same VAE, and the SVI steps alone (the same
call scoring with one draw). The data are random binary images of MNIST's size, not MNIST (not
installed here): the timing depends on the sizes, not on the pixels. Both are timed warm: a
small fit and a small inference_gaps run first, untimed, so that neither carries the process's
one-time costs (torch imports its compiler, about 1 s, when the first optimizer is made).
Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch

import pyro_vae as pv
from pyro_vae.infer.gaps import inference_gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-train", type=int, default=60_000)
    parser.add_argument("--num-examples", type=int, default=500, help="examples for the gaps")
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    # Images with some structure (a random mean image), so the encoder has something to read.
    mean = torch.rand(784)
    x = torch.bernoulli(mean.expand(args.num_train, -1))
    vae = pv.VAE(784, args.latent_dim)
    pv.fit(pv.VAE(784, args.latent_dim), x[:256], num_epochs=1, batch_size=128, progress=False)
    inference_gaps(vae, x[:10], num_steps=2, num_particles=2, iw_particles=2, progress=False)
    started = time.perf_counter()
    pv.fit(vae, x, num_epochs=1, batch_size=128, progress=False)
    epoch = time.perf_counter() - started
    print(f"one epoch of fit, {args.num_train} examples, batch 128: {epoch:.1f} s")
    gaps = inference_gaps(vae, x[: args.num_examples])
    print(
        f"inference_gaps, {args.num_examples} examples: {gaps.seconds:.1f} s "
        f"({gaps.seconds / epoch:.2f} epochs); amortization gap "
        "{:.3f} ± {:.3f}, approximation gap {:.3f} ± {:.3f} nats (random data)".format(
            *gaps.average(gaps.amortization_gap), *gaps.average(gaps.approximation_gap)
        )
    )
    steps = inference_gaps(vae, x[: args.num_examples], num_particles=1, iw_particles=1)
    print(
        f"of which the SVI steps (scoring with one draw): {steps.seconds:.1f} s "
        f"({steps.seconds / epoch:.2f} epochs)"
    )


if __name__ == "__main__":
    main()
