"""Test accuracy of M2 (pyro_vae.models.m2) on Fashion-MNIST with 100, 600, 1000 and 3000
labels, against a supervised-only classifier: the table in benchmarks/README.md.

For each label count, from one seed:

- the labelled rows are a fixed, class-balanced subset of the training images
  (``labelled_subset(y_train, n, seed)``); the unlabelled rows are the first
  ``--num-unlabelled`` of the other training images (all of them with 0);
- M2 (MLP parts of ``--hidden`` units, latent ``--latent-dim``, Bernoulli likelihood on
  dynamically binarized images, α = ``--alpha`` per labelled example: 50 by default, near the
  46 of Pyro's ``ss_vae_M2``; 0 gives the paper's 0.1·N/N_l) is trained by ``pv.fit`` with
  ``TraceEnum_ELBO`` for ``--epochs`` epochs, in batches that mix labelled and unlabelled
  rows;
- the baseline is ``SupervisedClassifier`` holding a copy of M2's q(y|x) network *as
  initialized* (same architecture, same starting weights), trained by ``pv.fit`` on the labelled
  rows alone for ``--baseline-steps`` steps of batch ``min(100, n)``, also on dynamically
  binarized images;
- both are scored on the 10000 test images, binarized once with a fixed seed (what they were
  trained on), and on the grayscale test images.

    OMP_NUM_THREADS=1 python benchmarks/m2_accuracy.py            # the README table
    python benchmarks/m2_accuracy.py --labels 100 --epochs 2      # a quick check

Results go to benchmarks/results/m2-fashion-mnist.json; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import pyro
import torch

import pyro_vae as pv
from pyro_vae.models.labels import hide_labels, labelled_subset
from pyro_vae.models.m2 import M2, SupervisedClassifier


def run_one(num_labelled: int, data: pv.DataSplits, tests: dict, args) -> dict:
    pyro.set_rng_seed(args.seed)
    labelled = labelled_subset(data.y_train, num_labelled, seed=args.seed)
    others = torch.ones(len(data.y_train), dtype=torch.bool)
    others[labelled] = False
    unlabelled = others.nonzero().squeeze(1)
    if args.num_unlabelled:
        unlabelled = unlabelled[: args.num_unlabelled]
    rows = torch.cat([labelled, unlabelled])
    x = data.x_train[rows]
    y = hide_labels(data.y_train[rows], torch.arange(num_labelled))

    alpha = args.alpha or None  # 0: M2.from_data's default, the paper's
    m2 = M2.from_data(x, y, args.latent_dim, alpha=alpha, hidden_dims=args.hidden)
    baseline = SupervisedClassifier(copy.deepcopy(m2.classifier), m2.num_labels)
    per_epoch: list[float] = []

    def record(epoch: int, history: pv.History) -> None:
        per_epoch.append(m2.accuracy(*tests["binarized"]))
        print(
            f"  {num_labelled} labels, epoch {epoch}: loss {history.loss[-1]:.2f}, "
            f"test accuracy {per_epoch[-1]:.4f} ({history.epoch_seconds[-1]:.0f} s)",
            flush=True,
        )

    started = time.perf_counter()
    pv.fit(
        m2,
        (x, y),
        loss=m2.loss(),
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        callback=record,
        generator=torch.Generator().manual_seed(args.seed),
        progress=False,
    )
    m2_seconds = time.perf_counter() - started

    batch = min(100, num_labelled)
    steps_per_epoch = -(-num_labelled // batch)
    started = time.perf_counter()
    pv.fit(
        baseline,
        (data.x_train[labelled], data.y_train[labelled]),
        num_epochs=max(1, args.baseline_steps // steps_per_epoch),
        batch_size=batch,
        learning_rate=args.learning_rate,
        binarize=True,
        generator=torch.Generator().manual_seed(args.seed),
        progress=False,
    )
    baseline_seconds = time.perf_counter() - started
    row = {
        "num_labelled": num_labelled,
        "num_rows": len(x),
        "alpha": m2.alpha,
        "m2_accuracy": m2.accuracy(*tests["binarized"]),
        "m2_accuracy_grayscale": m2.accuracy(*tests["grayscale"]),
        "m2_accuracy_per_epoch": per_epoch,
        "m2_seconds": m2_seconds,
        "baseline_accuracy": baseline.accuracy(*tests["binarized"]),
        "baseline_accuracy_grayscale": baseline.accuracy(*tests["grayscale"]),
        "baseline_seconds": baseline_seconds,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[100, 600, 1000, 3000])
    parser.add_argument("--num-unlabelled", type=int, default=5000, help="0: all the rest")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256])
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument(
        "--alpha",
        type=float,
        default=50.0,
        help="weight of log q(y|x) per labelled example; 0: the paper's 0.1 N / N_l",
    )
    parser.add_argument("--baseline-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "m2-fashion-mnist.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = pv.load_dataset("fashion-mnist")
    tests = {
        "binarized": (
            pv.binarize(data.x_test, torch.Generator().manual_seed(args.seed)),
            data.y_test,
        ),
        "grayscale": (data.x_test, data.y_test),
    }
    started = time.perf_counter()
    rows = [run_one(n, data, tests, args) for n in args.labels]
    total = time.perf_counter() - started

    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(
        json.dumps({"settings": settings, "rows": rows, "total_seconds": total}, indent=1)
    )
    print(
        "\n| labels | M2 | supervised only | M2 − baseline | M2 (grayscale test) | "
        "baseline (grayscale test) | M2 time | baseline time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['num_labelled']} | {r['m2_accuracy']:.4f} | {r['baseline_accuracy']:.4f} | "
            f"{r['m2_accuracy'] - r['baseline_accuracy']:+.4f} | "
            f"{r['m2_accuracy_grayscale']:.4f} | {r['baseline_accuracy_grayscale']:.4f} | "
            f"{r['m2_seconds']:.0f} s | {r['baseline_seconds']:.0f} s |"
        )
    print(f"\ntotal {total:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
