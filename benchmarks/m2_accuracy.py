"""M2 against its supervised-only baseline: the table of issue 22 (benchmarks/README.md, "M2").

For each label count and each seed of the labelled subset:

- the validation rows are held out of the training set by ``validation_indices`` with
  ``default_val_size`` (10,000 for MNIST and Fashion-MNIST, 10% for digits), drawn with seed 0
  for every seed: one validation set serves all seeds, so that they differ in the labelled
  subset, the initial weights and the draws alone (``scripts/train.py`` draws them with
  ``--seed``, so its runs of seeds other than 0 hold out other rows); the labelled rows are
  ``labelled_subset(y_train, n, seed)`` of the rest, and the unlabelled rows are the first
  ``--num-unlabelled`` of the others (default: all);
- M2 is ``M2.from_data`` at its defaults (α, the labelled rows in every batch), with the
  sizes and budget of ``scripts/train.py --model m2`` unless flags say otherwise, trained by
  ``pv.fit`` on dynamically binarized images;
- the baseline is ``SupervisedClassifier`` holding a copy of M2's q(y|x) network *as
  initialized*, trained by ``pv.fit`` on the labelled rows alone (batches of
  ``min(batch size, n)``), with as many optimizer steps as M2 takes, in as many "epochs";
- after every epoch each is scored on the validation set (binarized once, as a run does); the
  epoch with the best validation accuracy is kept (the first, on ties), and the test set is
  scored once, with that epoch's weights.

Every choice is made on the validation set; the test set chooses nothing.

    OMP_NUM_THREADS=1 python benchmarks/m2_accuracy.py --dataset digits --labels 10 50 100
    python benchmarks/m2_accuracy.py --dataset fashion-mnist --labels 100 --epochs 2 --seeds 0

Results go to benchmarks/results/m2-<dataset>.json (``--out``); a Markdown table is printed,
with mean ± SD over seeds and the paired difference M2 − baseline ± its standard error.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor

import pyro_vae as pv
from pyro_vae.data import validation_indices
from pyro_vae.jobs.runs import default_val_size, evaluation_sets
from pyro_vae.models.labels import hide_labels, labelled_subset
from pyro_vae.models.m2 import M2, SupervisedClassifier

# scripts/train.py --model m2's sizes and budget (pyro_vae/jobs/m2.py, scripts/train.py).
DEFAULT_LATENT, DEFAULT_HIDDEN, DEFAULT_BATCH, DEFAULT_LR = 32, [400], 128, 1e-3


def default_epochs(dataset: str) -> int:
    return 100 if dataset == "digits" else 20


class BestByValidation:
    """The weights of the epoch with the best validation accuracy so far, and the curve."""

    def __init__(self, model: Any, x_val: Tensor, y_val: Tensor) -> None:
        self.model, self.x_val, self.y_val = model, x_val, y_val
        self.curve: list[float] = []
        self.best_epoch, self.state = 0, copy.deepcopy(model.state_dict())

    def __call__(self, epoch: int, history: pv.History | None = None) -> None:
        accuracy = self.model.accuracy(self.x_val, self.y_val)
        self.curve.append(accuracy)
        if accuracy > max(self.curve[:-1], default=-1.0):
            self.best_epoch, self.state = epoch, copy.deepcopy(self.model.state_dict())

    def test_accuracy(self, x_test: Tensor, y_test: Tensor) -> float:
        """The kept epoch's test accuracy: the one test score of the run."""
        self.model.load_state_dict(self.state)
        return float(self.model.accuracy(x_test, y_test))


def run_one(num_labelled: int, seed: int, data: pv.DataSplits, args: argparse.Namespace) -> dict:
    pyro.set_rng_seed(seed)
    labelled = labelled_subset(data.y_train, num_labelled, seed=seed)
    others = torch.ones(len(data.y_train), dtype=torch.bool)
    others[labelled] = False
    unlabelled = others.nonzero().squeeze(1)
    if args.num_unlabelled:
        unlabelled = unlabelled[: args.num_unlabelled]
    rows = torch.cat([labelled, unlabelled])
    x = data.x_train[rows]
    y = hide_labels(data.y_train[rows], torch.arange(num_labelled))
    m2 = M2.from_data(
        x,
        y,
        args.latent_dim,
        alpha=args.alpha,
        hidden_dims=args.hidden,
        num_labels=len(data.class_names),
        labelled_per_batch=args.labelled_per_batch,
    )
    baseline = SupervisedClassifier(copy.deepcopy(m2.classifier), m2.num_labels)
    x_test, _, x_val = evaluation_sets(m2, data, seed)
    assert x_val is not None and data.y_val is not None

    m2_best = BestByValidation(m2, x_val, data.y_val)
    started = time.perf_counter()
    history = pv.fit(
        m2,
        (x, y),
        loss=m2.loss(),
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        callback=m2_best,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    m2_seconds = time.perf_counter() - started
    steps_per_epoch = len(history.step_loss) // args.epochs

    # The baseline: as many steps as M2, scored on validation at the same points.
    batch = min(args.batch_size, num_labelled)
    x_l, y_l = data.x_train[labelled], data.y_train[labelled]

    base_best = BestByValidation(baseline, x_val, data.y_val)
    # One "epoch" of the baseline is as many of its steps as one epoch of M2.
    per_epoch = max(1, round(steps_per_epoch / math.ceil(num_labelled / batch)))
    started = time.perf_counter()
    pv.fit(
        baseline,
        (x_l, y_l),
        num_epochs=args.epochs * per_epoch,
        batch_size=batch,
        learning_rate=args.learning_rate,
        binarize=True,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda epoch, _: base_best(epoch // per_epoch) if epoch % per_epoch == 0 else None,
        progress=False,
    )
    base_seconds = time.perf_counter() - started

    row = {
        "num_labelled": num_labelled,
        "seed": seed,
        "num_unlabelled": len(unlabelled),
        "alpha": m2.alpha,
        "labelled_per_batch": m2.epoch_order(x, y, batch_size=args.batch_size).per_batch,
        "m2_val_curve": m2_best.curve,
        "m2_epoch_kept": m2_best.best_epoch,
        "m2_test_accuracy": m2_best.test_accuracy(x_test, data.y_test),
        "m2_last_val_accuracy": m2_best.curve[-1],
        "m2_seconds": m2_seconds,
        "baseline_val_curve": base_best.curve,
        "baseline_epoch_kept": base_best.best_epoch,
        "baseline_test_accuracy": base_best.test_accuracy(x_test, data.y_test),
        "baseline_seconds": base_seconds,
    }
    print(
        f"{num_labelled} labels, seed {seed}: M2 {row['m2_test_accuracy']:.4f} (epoch "
        f"{row['m2_epoch_kept']}), baseline {row['baseline_test_accuracy']:.4f} (epoch "
        f"{row['baseline_epoch_kept']}); {m2_seconds:.0f} s + {base_seconds:.0f} s",
        flush=True,
    )
    return row


def sd(values: list[float]) -> float | None:
    """The standard deviation over seeds; ``None`` (JSON's null) for one seed."""
    return statistics.stdev(values) if len(values) > 1 else None


def spread(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def summary(rows: list[dict]) -> list[dict]:
    """Per label count: mean ± SD over seeds of each side, and the paired difference ± SE."""
    out = []
    for n in sorted({r["num_labelled"] for r in rows}):
        mine = [r for r in rows if r["num_labelled"] == n]
        m2 = [r["m2_test_accuracy"] for r in mine]
        base = [r["baseline_test_accuracy"] for r in mine]
        diff = [a - b for a, b in zip(m2, base, strict=True)]
        diff_sd = sd(diff)
        out.append(
            {
                "num_labelled": n,
                "seeds": len(mine),
                "m2_mean": statistics.fmean(m2),
                "m2_sd": sd(m2),
                "baseline_mean": statistics.fmean(base),
                "baseline_sd": sd(base),
                "diff_mean": statistics.fmean(diff),
                "diff_se": None if diff_sd is None else diff_sd / math.sqrt(len(diff)),
                "m2_seconds": statistics.fmean(r["m2_seconds"] for r in mine),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-unlabelled", type=int, default=0, help="0: all the rest")
    parser.add_argument("--epochs", type=int, default=None, help="default: train.py's")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_LR)
    parser.add_argument("--hidden", type=int, nargs="+", default=DEFAULT_HIDDEN)
    parser.add_argument("--latent-dim", type=int, default=DEFAULT_LATENT)
    parser.add_argument("--alpha", type=float, default=None, help="default: M2.from_data's")
    parser.add_argument("--labelled-per-batch", type=int, default=None, help="default: M2's rule")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.epochs = args.epochs or default_epochs(args.dataset)
    out = args.out or Path(__file__).parent / "results" / f"m2-{args.dataset}.json"

    data = pv.load_dataset(args.dataset, data_dir=args.data_dir)
    val_size = default_val_size(args.dataset, len(data.y_train))
    # One validation split for every seed: the seeds vary the labelled subset.
    data = data.hold_out(validation_indices(len(data.y_train), val_size, 0))
    started = time.perf_counter()
    rows = [run_one(n, s, data, args) for n in args.labels for s in args.seeds]
    total = time.perf_counter() - started
    table = summary(rows)

    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["val_size"] = val_size
    out.write_text(
        json.dumps(
            {"settings": settings, "rows": rows, "summary": table, "total_seconds": total},
            indent=1,
        )
    )
    print(
        f"\n{args.dataset}: {rows[0]['num_unlabelled']}+ unlabelled, {val_size} validation "
        f"rows, {args.epochs} epochs of batch {args.batch_size}, epoch kept by validation "
        "accuracy, test scored once"
    )
    print("| labels | seeds | M2 | supervised only | M2 − baseline (paired) | M2 time |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['num_labelled']} | {r['seeds']} | {r['m2_mean']:.4f} ± {spread(r['m2_sd'])} | "
            f"{r['baseline_mean']:.4f} ± {spread(r['baseline_sd'])} | "
            f"{r['diff_mean']:+.4f} ± {spread(r['diff_se'])} | {r['m2_seconds']:.0f} s |"
        )
    print(f"\ntotal {total:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
