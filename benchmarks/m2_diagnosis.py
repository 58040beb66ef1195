"""Why M2's accuracy fell, measured (issue 22; docs/design.md, "M2"): the issue's clusters
problem, with α and the batch composition switched one at a time.

Three well-separated clusters of 24-bit vectors (each class sets its own block of 8 bits, then
10% of all bits flip), 600 training rows of which one per class is labelled, 300 validation
and 600 test rows; M2 with latent 2, hidden 32, 40 epochs of batch 60, Adam 1e-3. Each
configuration runs on ``--seeds`` seeds (data, labelled rows, initialization). Per run:

- the test accuracy of the epoch best on validation, and of the last epoch;
- how long q(y|x) stays uniform: the first epoch its mean entropy on the test rows falls
  below 0.95 · log 3;
- whether the decoder uses y: at z = μ(x, y) of each test row's true y, log p(x | z, y)
  minus the best log p(x | z, y') over the other classes (mean over rows). Near 0: the
  decoder ignores y (z carries the class, or nothing does); negative: the classes the
  generative model formed are not the labels' (a swap).

Configurations: α the paper's (0.1·N/N_l = 20) or the default (N/N_l = 200); batches a plain
shuffle (a labelled row in about a quarter of them) or the default, labelled rows in every
batch. Both use the scales of each part's count (N_l/B_l, N_u/B_u).

    OMP_NUM_THREADS=1 python benchmarks/m2_diagnosis.py --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import pyro
import torch

import pyro_vae as pv
from pyro_vae.infer.batches import Shuffled
from pyro_vae.models.labels import default_alpha, hide_labels, labelled_subset, paper_alpha
from pyro_vae.models.m2 import M2

NUM_CLASSES, BITS, FLIP = 3, 24, 0.1


def clusters(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(num) % NUM_CLASSES)[torch.randperm(num, generator=generator)]
    blocks = torch.arange(BITS) // (BITS // NUM_CLASSES)
    x = (blocks == labels[:, None]).float()
    flips = torch.rand(num, BITS, generator=generator) < FLIP
    return torch.where(flips, 1 - x, x), labels


class ShuffledM2(M2):
    """M2 with fit's plain shuffle instead of labelled rows in every batch."""

    def epoch_order(self, x, y, *, batch_size):
        return Shuffled(len(y))


@torch.no_grad()
def decoder_use_of_y(m2: M2, x: torch.Tensor, y: torch.Tensor) -> float:
    mu, _ = m2.encode(x, y)
    log_lik = torch.stack(
        [
            m2.likelihood(m2.decoder(m2._decoder_input(mu, torch.full_like(y, k)))).log_prob(x)
            for k in range(m2.num_labels)
        ],
        -1,
    )
    true = log_lik.gather(-1, y[:, None]).squeeze(-1)
    others = log_lik.scatter(-1, y[:, None], -math.inf).max(-1).values
    return float((true - others).mean())


def run(alpha_rule: str, batches: str, seed: int, epochs: int) -> dict:
    x, labels = clusters(600, seed)
    x_test, y_test = clusters(600, seed + 100)
    x_val, y_val = clusters(300, seed + 200)
    y = hide_labels(labels, labelled_subset(labels, NUM_CLASSES, seed=seed))
    rule = paper_alpha if alpha_rule == "paper" else default_alpha
    pyro.set_rng_seed(seed)
    cls = ShuffledM2 if batches == "shuffle" else M2
    m2 = cls.from_data(x, y, 2, alpha=rule(600, NUM_CLASSES), hidden_dims=(32,))
    curve: list[dict] = []

    def record(epoch: int, history: pv.History) -> None:
        curve.append(
            {
                "val": m2.accuracy(x_val, y_val),
                "test": m2.accuracy(x_test, y_test),
                "entropy": float(m2.label_posterior(x_test).entropy().mean().detach()),
                "decoder_use_of_y": decoder_use_of_y(m2, x_test, y_test),
            }
        )

    pv.fit(
        m2,
        (x, y),
        loss=m2.loss(),
        num_epochs=epochs,
        batch_size=60,
        callback=record,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    kept = max(range(len(curve)), key=lambda i: (curve[i]["val"], -i))
    uniform = 0.95 * math.log(NUM_CLASSES)
    formed = next((i + 1 for i, c in enumerate(curve) if c["entropy"] < uniform), None)
    return {
        "alpha": m2.alpha,
        "batches": batches,
        "seed": seed,
        "kept_epoch": kept + 1,
        "kept_test": curve[kept]["test"],
        "last_test": curve[-1]["test"],
        "epoch_q_leaves_uniform": formed,
        "decoder_use_of_y_last": curve[-1]["decoder_use_of_y"],
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "m2-diagnosis.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        run(alpha_rule, batches, seed, args.epochs)
        for alpha_rule in ("paper", "default")
        for batches in ("shuffle", "every batch")
        for seed in args.seeds
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}))
    print(
        "| α | batches | test, epoch kept on validation | test, last epoch | "
        "epoch q(y|x) leaves uniform | decoder's use of y, last |"
    )
    print("|---|---|---|---|---|---|")
    for alpha in sorted({r["alpha"] for r in rows}):
        for batches in ("shuffle", "every batch"):
            mine = [r for r in rows if r["alpha"] == alpha and r["batches"] == batches]
            print(
                f"| {alpha:g} | {batches} | {cell(mine, 'kept_test')} | "
                f"{cell(mine, 'last_test')} | {cell(mine, 'epoch_q_leaves_uniform', 0)} | "
                f"{cell(mine, 'decoder_use_of_y_last', 2)} |"
            )


def cell(rows: list[dict], key: str, digits: int = 3) -> str:
    """The mean over seeds, then each seed's value in brackets (— where there is none)."""
    values = [r[key] for r in rows]
    shown = " ".join("—" if v is None else f"{v:.{digits}f}" for v in values)
    known = [v for v in values if v is not None]
    return f"{statistics.fmean(known):.{digits}f} ({shown})" if known else shown


if __name__ == "__main__":
    main()
