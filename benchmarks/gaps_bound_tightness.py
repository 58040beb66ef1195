#!/usr/bin/env python
"""How far below log p(x) the inference gaps' bound is, on a trained run of scripts/train.py.

    python benchmarks/gaps_bound_tightness.py RUN [--num-inputs 100]     # RUN: a VAE run

Fits q* to the last ``--num-inputs`` test inputs of RUN (`inference_gaps`, its defaults), then
compares importance-weighted bounds on log p(x) from several proposals and K against a
reference: K = 50 000 draws of a proposal 1.2 times as wide as q* (wider than the posterior,
so that its weights have lighter tails). Prints, per proposal and K, the mean over the inputs of
(bound − reference) and its paired standard error. The default bound of `inference_gaps` is q*
with K = 1000 (benchmarks/README.md, "How tight is the K = 1000 bound?").
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import pyro
import torch

from pyro_vae.infer.estimators import log_likelihood
from pyro_vae.infer.gaps import inference_gaps
from pyro_vae.infer.local_gaussian import FixedWeights, LocalGaussian
from pyro_vae.jobs import load_run

REFERENCE = (1.2, 50_000)
COMPARED = [(1.0, 50_000), (1.0, 5000), (1.0, 1000), (1.2, 1000), (1.2, 300), (1.3, 1000)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a directory written by scripts/train.py")
    parser.add_argument("--num-inputs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    if run.kind != "vae":
        parser.error(f"{args.run} is a {run.kind} run; this script reads VAE runs")
    model: Any = run.model  # a VAE (M2 and the CVAE need the explain report's views)
    x = run.x_test[-args.num_inputs :].float()
    pyro.set_rng_seed(0)
    gaps = inference_gaps(model, x, iw_particles=1, progress=False)
    tril = gaps.optimized_scale_tril
    scale = tril if tril is not None else gaps.optimized_scale
    names = (getattr(model, "latent_site", "z"), getattr(model, "latent_plate", "data"))

    def bound(widen: float, num_particles: int) -> torch.Tensor:
        proposal = LocalGaussian(
            x, lambda: (gaps.optimized_loc, scale * widen), gaps.full_covariance, names
        )
        with torch.no_grad(), pyro.validation_enabled(False):
            return log_likelihood(FixedWeights(model, proposal), x, num_particles, progress=False)

    reference = bound(*REFERENCE)
    gap = float((reference - gaps.optimized_elbo).mean())
    print(f"{args.run}: approximation gap against the reference bound {gap:.4f} nats")
    for widen, num_particles in COMPARED:
        difference = bound(widen, num_particles) - reference
        se = float(difference.std()) / math.sqrt(len(x))
        print(
            f"proposal {widen} x q*, K = {num_particles}: bound - reference "
            f"{float(difference.mean()):+.4f} ± {se:.4f}"
        )


if __name__ == "__main__":
    main()
