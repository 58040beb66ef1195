"""Quality of each prior and each encoder on full Fashion-MNIST, against the standard-normal
prior with a diagonal Normal encoder: the table in README.md.

Every row trains from the same seed with the same budget (epochs, batch size, learning rate,
networks, Trace_ELBO with one particle) on dynamically binarized training images, then reports
on the 10000 test images (binarized once, with a fixed seed):

- the test ELBO (one draw of z per image), with its reconstruction and KL terms;
- the importance-weighted bound on log p(x) with K samples (Burda et al. 2016);
- the wall time of training and of evaluation.

    python benchmarks/compare_components.py                  # the README table (about 20 min)
    python benchmarks/compare_components.py --dataset digits --num-epochs 20   # a quick check

Results go to benchmarks/results/components-<dataset>.json and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

import pyro_vae as pv

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


def run_one(label: str, options: dict, data: pv.DataSplits, x_test: torch.Tensor, args) -> dict:
    pyro.set_rng_seed(args.seed)
    vae = pv.build_vae(data.data_dim, args.latent_dim, hidden_dims=args.hidden_dims, **options)
    started = time.perf_counter()
    history = pv.fit(
        vae,
        data.x_train,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        generator=torch.Generator().manual_seed(args.seed),
        progress=not args.no_progress,
    )
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    terms = pv.elbo_terms(vae, x_test)
    row = {
        "label": label,
        "options": options,
        "final_train_loss": history.loss[-1],
        "test_elbo": terms.elbo.mean().item(),
        "test_reconstruction": terms.reconstruction.mean().item(),
        "test_kl": terms.kl.mean().item(),
        "train_seconds": train_seconds,
    }
    # A Delta posterior has no density: p(x, z) / q(z | x) is not an importance weight, and its
    # "ELBO" is the joint log p(x, z*) at the code z*, not a bound on log p(x).
    if options.get("encoder") != "delta":
        log_px = pv.log_likelihood(vae, x_test, num_particles=args.num_iw_samples, progress=False)
        row["test_log_likelihood"] = log_px.mean().item()
    row["eval_seconds"] = time.perf_counter() - started
    return row


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"| run | test ELBO | reconstruction | KL | log p(x) ≥ (K={args.num_iw_samples}) "
        "| train time | eval time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        log_px = f"{r['test_log_likelihood']:.2f}" if "test_log_likelihood" in r else "n/a"
        lines.append(
            f"| {r['label']} | {r['test_elbo']:.2f} | {r['test_reconstruction']:.2f} | "
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
    parser.add_argument("--only", nargs="+", default=None, help="row numbers to run (0-based)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/components-<dataset>.json"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    data = pv.load_dataset(args.dataset)
    x_test = pv.binarize(data.x_test, torch.Generator().manual_seed(12345))
    runs = [RUNS[int(i)] for i in args.only] if args.only else RUNS
    rows = []
    out = args.out or Path(__file__).parent / "results" / f"components-{args.dataset}.json"
    for label, options in runs:
        row = run_one(label, options, data, x_test, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(
            json.dumps(
                {
                    "settings": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    }
                    | {"torch_threads": torch.get_num_threads()},
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
