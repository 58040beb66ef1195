"""Quality of each prior and each encoder on full Fashion-MNIST, against the standard-normal
prior with a diagonal Normal encoder: the table in README.md.

Every row trains from the same seed with the same budget (epochs, batch size, learning rate,
networks, Trace_ELBO with one particle) on dynamically binarized training images. The project's
validation split (``pyro_vae.data.validation_indices``: 10000 of Fashion-MNIST's 60000 training
images, drawn from the seed) is held out of training and binarized once. After every epoch the
validation ELBO is computed (one draw of z per image, from a fixed seed, in a forked random
state so that the training noise is the same with or without it), and the weights of the epoch
with the best validation ELBO are kept. Only then, once, with those weights, the 10000 test
images (binarized once, with a fixed seed) are scored:

- the test ELBO (one draw of z per image), with its reconstruction and KL terms;
- the importance-weighted bound on log p(x) with K samples (Burda et al. 2016);
- the wall time of training (with the validation passes) and of the test evaluation.

Nothing else is chosen: every other setting is fixed in advance. The per-epoch validation
numbers and the epoch kept are in the results.

    python benchmarks/compare_components.py                  # the README table (about 15 min)
    python benchmarks/compare_components.py --dataset digits --num-epochs 20   # a quick check

Results go to benchmarks/results/components-<dataset>.json and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import torch

import pyro_vae as pv
from pyro_vae.data import validation_indices
from pyro_vae.jobs.runs import default_val_size

# The fixed binarizations of the evaluation sets, and the draws of z that score the validation
# set: each epoch is scored on the same pixels and the same noise.
TEST_BINARIZATION_SEED = 12345
VAL_BINARIZATION_SEED = 12346
VAL_NOISE_SEED = 54321

# (row label, build_vae keywords): the baseline, then one prior or one encoder swapped at a time.
RUNS = [
    ("baseline: standard-normal prior, diagonal encoder", {}),
    ("prior: diagonal-normal (learned)", {"prior": "diagonal-normal"}),
    ("prior: mixture of 10 Gaussians", {"prior": "mixture", "num_components": 10}),
    ("prior: VampPrior, 100 pseudo-inputs", {"prior": "vamp", "num_components": 100}),
    ("prior: flow (2 MAF layers)", {"prior": "flow", "flow_depth": 2}),
    ("encoder: full-covariance Normal", {"encoder": "full-covariance"}),
    ("encoder: IAF (2 layers)", {"encoder": "iaf", "flow_depth": 2}),
    ("encoder: delta (deterministic)", {"encoder": "delta"}),
]


def validation_elbo(vae, x_val: torch.Tensor) -> dict:
    """The one-draw ELBO terms of the validation set, drawn from a fixed seed in a forked random
    state: the same draws every epoch, and the training's own noise left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VAL_NOISE_SEED)
        terms = pv.elbo_terms(vae, x_val)
    return {
        "val_elbo": terms.elbo.mean().item(),
        "val_reconstruction": terms.reconstruction.mean().item(),
        "val_kl": terms.kl.mean().item(),
    }


def run_one(
    label: str, options: dict, data: pv.DataSplits, x_val: torch.Tensor, x_test: torch.Tensor, args
) -> dict:
    pyro.set_rng_seed(args.seed)
    vae = pv.build_vae(data.data_dim, args.latent_dim, hidden_dims=args.hidden_dims, **options)
    epochs: list[dict] = []
    best: dict = {"epoch": 0, "val_elbo": -math.inf, "weights": None}

    def after_epoch(epoch: int, history: pv.History) -> None:
        started = time.perf_counter()
        row = {"epoch": epoch, "train_loss": history.loss[-1]} | validation_elbo(vae, x_val)
        row["seconds"] = history.epoch_seconds[-1]
        row["val_seconds"] = time.perf_counter() - started
        epochs.append(row)
        if row["val_elbo"] > best["val_elbo"]:
            weights = {k: v.detach().clone() for k, v in vae.state_dict().items()}
            best.update(epoch=epoch, val_elbo=row["val_elbo"], weights=weights)

    started = time.perf_counter()
    pv.fit(
        vae,
        data.x_train,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        generator=torch.Generator().manual_seed(args.seed),
        progress=not args.no_progress,
        callback=after_epoch,
    )
    train_seconds = time.perf_counter() - started
    vae.load_state_dict(best["weights"])
    # The weights put back score the validation set as they did at their epoch: the state_dict
    # holds all of the model.
    check = validation_elbo(vae, x_val)["val_elbo"]
    if not math.isclose(check, best["val_elbo"], rel_tol=1e-6, abs_tol=1e-4):
        raise RuntimeError(f"{label}: the kept weights score {check}, not {best['val_elbo']}")
    kept = epochs[best["epoch"] - 1]
    # The test set, scored once, with the kept epoch's weights.
    started = time.perf_counter()
    terms = pv.elbo_terms(vae, x_test)
    row = {
        "label": label,
        "options": options,
        "best_epoch": best["epoch"],
        "selected_by": f"the best validation ELBO over {len(x_val)} held-out training images",
        "best_val_elbo": best["val_elbo"],
        "train_loss_at_best_epoch": kept["train_loss"],
        "final_train_loss": epochs[-1]["train_loss"],
        "test_elbo": terms.elbo.mean().item(),
        "test_reconstruction": terms.reconstruction.mean().item(),
        "test_kl": terms.kl.mean().item(),
        "train_seconds": train_seconds,
        "val_seconds": sum(e["val_seconds"] for e in epochs),
    }
    # A Delta posterior has no density: p(x, z) / q(z | x) is not an importance weight, and its
    # "ELBO" is the joint log p(x, z*) at the code z*, not a bound on log p(x).
    if options.get("encoder") != "delta":
        log_px = pv.log_likelihood(vae, x_test, num_particles=args.num_iw_samples, progress=False)
        row["test_log_likelihood"] = log_px.mean().item()
    row["eval_seconds"] = time.perf_counter() - started
    row["epochs"] = epochs
    return row


def markdown(rows: list[dict], args) -> str:
    lines = [
        "| run | epoch kept | test ELBO | reconstruction | KL "
        f"| log p(x) ≥ (K={args.num_iw_samples}) | train time | eval time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        log_px = f"{r['test_log_likelihood']:.2f}" if "test_log_likelihood" in r else "n/a"
        lines.append(
            f"| {r['label']} | {r['best_epoch']} | {r['test_elbo']:.2f} | "
            f"{r['test_reconstruction']:.2f} | "
            f"{r['test_kl']:.2f} | {log_px} | {r['train_seconds']:.0f} s | "
            f"{r['eval_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=pv.DATASET_NAMES)
    parser.add_argument("--num-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[400])
    parser.add_argument("--num-iw-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="training images held out for validation; default: the project's (10000 for "
        "Fashion-MNIST and MNIST, 10%% otherwise)",
    )
    parser.add_argument("--only", nargs="+", default=None, help="row numbers to run (0-based)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/components-<dataset>.json"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    data = pv.load_dataset(args.dataset)
    if args.val_size is None:
        args.val_size = default_val_size(args.dataset, len(data.x_train))
    if args.val_size < 1:
        parser.error("--val-size must be at least 1: the epoch is chosen on validation")
    data = data.hold_out(validation_indices(len(data.x_train), args.val_size, args.seed))
    x_test = pv.binarize(data.x_test, torch.Generator().manual_seed(TEST_BINARIZATION_SEED))
    x_val = pv.binarize(data.x_val, torch.Generator().manual_seed(VAL_BINARIZATION_SEED))
    print(
        f"{args.dataset}: {len(data.x_train)} training, {len(x_val)} validation, "
        f"{len(x_test)} test images",
        flush=True,
    )
    runs = [RUNS[int(i)] for i in args.only] if args.only else RUNS
    rows = []
    out = args.out or Path(__file__).parent / "results" / f"components-{args.dataset}.json"
    for label, options in runs:
        row = run_one(label, options, data, x_val, x_test, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "epochs"}), flush=True)
        out.write_text(
            json.dumps(
                {
                    "settings": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    }
                    | {
                        "torch_threads": torch.get_num_threads(),
                        "train_images": len(data.x_train),
                        "val_images": len(x_val),
                        "test_images": len(x_test),
                    },
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
