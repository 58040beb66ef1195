"""The conditional VAE against its deterministic baseline on Pyro's quadrant task: given 1, 2 or
3 quadrants of a Fashion-MNIST image, predict the rest. The table in README.md.

For each number of given quadrants, both models train from the same seed with the same budget
(epochs, batch size, learning rate, hidden widths, one Trace_ELBO particle) through
``pyro_vae.fit`` on the tuple (missing pixels, given pixels): the missing pixels dynamically
binarized, the given ones the grayscale condition. The project's validation split
(``pyro_vae.data.validation_indices``: 10000 of Fashion-MNIST's 60000 training images, drawn from
the seed) is held out first; ``--train-size`` takes the first N of the rest. After every epoch
each model's validation ELBO of the missing pixels is computed (``conditional_elbo_terms``: one
draw of z from a fixed seed for the CVAE, in a forked random state so that the training noise is
the same with or without it; the exact log-likelihood for the baseline, which has no latent),
and each model keeps the weights of its epoch with the best one. Only then, once, with those
weights, the test images (missing pixels binarized once, with a fixed seed) are scored:

- the CVAE's importance-weighted estimate of -log p(x_missing | x_given) with K samples, and
  its standard error over the test images;
- the baseline's exact -log p(x_missing | x_given) under its Bernoulli output, and the
  per-image difference of the two (paired: same images), with its standard error;
- on the first ``--check-size`` test images, the CVAE's estimate with ``--check-samples``
  samples, to show how far K samples are from convergence;
- the wall time of training (with the validation passes) and of evaluation, and a completion
  figure.

Nothing else is chosen: every other setting is fixed in advance. The per-epoch validation
numbers and the epoch each model kept are in the results.

    python benchmarks/cvae_quadrants.py                          # the README table
    python benchmarks/cvae_quadrants.py --dataset digits --num-epochs 30   # a quick check

Results go to benchmarks/results/cvae-quadrants-<dataset>.json (or ``--out``), with a figure
cvae-q<N>-<dataset>.png beside it for each N;
a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import pyro
import torch

import pyro_vae as pv
from pyro_vae.data import validation_indices
from pyro_vae.jobs.runs import default_val_size
from pyro_vae.models.cvae import ConditionalBaseline, ConditionalVAE
from pyro_vae.models.cvae_estimators import (
    completions,
    conditional_elbo_terms,
    conditional_log_likelihood,
)
from pyro_vae.models.masks import quadrant_mask, split_by_mask
from pyro_vae.plots import plot_completions

RESULTS = Path(__file__).parent / "results"
# The draws of z that score the validation set: each epoch is scored on the same noise.
VAL_NOISE_SEED = 54321


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def validation_elbo(module, x_val: torch.Tensor, c_val: torch.Tensor) -> dict:
    """The one-draw ELBO terms of the validation set's missing pixels, drawn from a fixed seed
    in a forked random state: the same draws every epoch, and the training's own noise left as
    it was. For the baseline (no latent) the ELBO is the exact log-likelihood."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VAL_NOISE_SEED)
        terms = conditional_elbo_terms(module, x_val, c_val)
    return {
        "val_elbo": terms.elbo.mean().item(),
        "val_reconstruction": terms.reconstruction.mean().item(),
        "val_kl": terms.kl.mean().item(),
    }


def run_one(given: int, data: pv.DataSplits, args: argparse.Namespace) -> dict:
    mask = quadrant_mask(data.image_shape, given)
    x_train, c_train = split_by_mask(data.x_train[: args.train_size], mask)
    x_val, c_val = split_by_mask(data.x_val, mask)
    x_test, c_test = split_by_mask(data.x_test[: args.test_size], mask)
    # The validation and test targets are binarized once, each with a seed of its own: both
    # models are scored on the very same binary pixels.
    x_val = pv.binarize(x_val, torch.Generator().manual_seed(args.seed + 2000))
    x_test = pv.binarize(x_test, torch.Generator().manual_seed(args.seed + 1000))
    row: dict = {
        "given_quadrants": given,
        "missing_pixels": x_train.shape[1],
        "given_pixels": c_train.shape[1],
    }
    models = {
        "cvae": lambda: ConditionalVAE(
            x_train.shape[1], c_train.shape[1], args.latent_dim, hidden_dims=args.hidden_dims
        ),
        "baseline": lambda: ConditionalBaseline(
            x_train.shape[1], c_train.shape[1], hidden_dims=args.hidden_dims
        ),
    }
    log_p_test = {}
    for name, build in models.items():
        pyro.set_rng_seed(args.seed)
        pyro.clear_param_store()
        module = build()
        epochs: list[dict] = []
        best: dict = {"epoch": 0, "val_elbo": -math.inf, "weights": None}

        def after_epoch(epoch: int, history: pv.History, module=module, epochs=epochs, best=best):
            started = time.perf_counter()
            scores = validation_elbo(module, x_val, c_val)
            epochs.append(
                {"epoch": epoch, "train_loss": history.loss[-1]}
                | scores
                | {"seconds": history.epoch_seconds[-1]}
                | {"val_seconds": time.perf_counter() - started}
            )
            if scores["val_elbo"] > best["val_elbo"]:
                weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
                best.update(epoch=epoch, val_elbo=scores["val_elbo"], weights=weights)

        started = time.perf_counter()
        history = pv.fit(
            module,
            (x_train, c_train),
            num_epochs=args.num_epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            generator=torch.Generator().manual_seed(args.seed),
            progress=not args.no_progress,
            callback=after_epoch,
        )
        row[f"{name}_train_seconds"] = time.perf_counter() - started
        row[f"{name}_train_loss"] = history.loss
        row[f"{name}_epochs"] = epochs
        row[f"{name}_best_epoch"] = best["epoch"]
        row[f"{name}_best_val_elbo"] = best["val_elbo"]
        module.load_state_dict(best["weights"])
        # The weights put back score the validation set as they did at their epoch.
        check = validation_elbo(module, x_val, c_val)["val_elbo"]
        if not math.isclose(check, best["val_elbo"], rel_tol=1e-6, abs_tol=1e-4):
            raise RuntimeError(f"{name}: the kept weights score {check}, not {best['val_elbo']}")
        # The test set, scored once, with the kept epoch's weights.
        started = time.perf_counter()
        num_particles = args.num_samples if name == "cvae" else 1
        log_p = conditional_log_likelihood(module, x_test, c_test, num_particles, progress=False)
        row[f"{name}_nll"], row[f"{name}_nll_se"] = mean_and_se(-log_p)
        log_p_test[name] = log_p
        if name == "cvae" and args.check_size:
            n = args.check_size
            # The same images with K and with check_samples samples: the paired difference
            # says how much more K would buy.
            more = conditional_log_likelihood(
                module, x_test[:n], c_test[:n], args.check_samples, progress=False
            )
            row["check_size"], row["check_samples"] = n, args.check_samples
            row["cvae_nll_check_K"] = float(-log_p[:n].mean())
            row["cvae_nll_check_more"] = float(-more.mean())
            row["cvae_nll_check_diff_se"] = mean_and_se(more - log_p[:n])[1]
        row[f"{name}_eval_seconds"] = time.perf_counter() - started
        models[name] = module
        print(
            f"  {given} given, {name}: epoch {best['epoch']} kept (validation ELBO "
            f"{best['val_elbo']:.2f}); test NLL {row[f'{name}_nll']:.2f} ± "
            f"{row[f'{name}_nll_se']:.2f} nats, train {row[f'{name}_train_seconds']:.0f} s, eval "
            f"{row[f'{name}_eval_seconds']:.0f} s",
            flush=True,
        )
    # Both models are scored on the same images: the per-image difference has a far smaller
    # standard error than either mean.
    difference = log_p_test["cvae"] - log_p_test["baseline"]  # baseline NLL - CVAE NLL
    row["nll_difference"], row["nll_difference_se"] = mean_and_se(difference)
    print(
        f"  {given} given: baseline NLL - CVAE NLL = {row['nll_difference']:.2f} ± "
        f"{row['nll_difference_se']:.2f} nats (paired)",
        flush=True,
    )
    figure = completions(
        models["cvae"],
        models["baseline"],
        data.x_test[: args.figure_images],
        mask,
        data.image_shape,
        num_completions=args.figure_samples,
    )
    path = args.out.parent / f"cvae-q{given}-{args.dataset}.png"
    plot_completions(figure, path)
    row["figure"] = path.name
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--given", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--num-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[500, 500])
    parser.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="training images held out for validation; default: the project's (10000 for "
        "Fashion-MNIST and MNIST, 10%% otherwise)",
    )
    parser.add_argument(
        "--train-size", type=int, default=None, help="first N training images not held out"
    )
    parser.add_argument("--test-size", type=int, default=None, help="first N test images")
    parser.add_argument("--num-samples", type=int, default=100, help="K of the CVAE's NLL")
    parser.add_argument("--check-size", type=int, default=500)
    parser.add_argument("--check-samples", type=int, default=1000)
    parser.add_argument("--figure-images", type=int, default=8)
    parser.add_argument("--figure-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/cvae_quadrants.py " + " ".join(_cli(args))
    args.out = args.out or RESULTS / f"cvae-quadrants-{args.dataset}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = pv.load_dataset(args.dataset)
    if args.val_size is None:
        args.val_size = default_val_size(args.dataset, len(data.x_train))
    if args.val_size < 1:
        parser.error("--val-size must be at least 1: the epoch is chosen on validation")
    data = data.hold_out(validation_indices(len(data.x_train), args.val_size, args.seed))
    started = time.perf_counter()
    rows = []
    for given in args.given:
        rows.append(run_one(given, data, args))
    total = time.perf_counter() - started
    result = {
        "command": command,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_images": len(data.x_train[: args.train_size]),
        "val_images": data.num_val,
        "selected_by": "each model's epoch with the best validation ELBO (exact log-likelihood "
        "for the baseline); the test set scored once, with those weights",
        "test_images": len(data.x_test[: args.test_size]),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "total_seconds": total,
        "rows": rows,
    }
    out = args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({total / 60:.1f} min)\n")
    print(
        "| given quadrants | epochs kept (CVAE, baseline) | CVAE NLL (nats) "
        "| baseline NLL (nats) | baseline − CVAE (paired) "
        "| CVAE train / eval (s) | baseline train / eval (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['given_quadrants']} | {r['cvae_best_epoch']}, {r['baseline_best_epoch']} "
            f"| {r['cvae_nll']:.2f} ± {r['cvae_nll_se']:.2f} "
            f"| {r['baseline_nll']:.2f} ± {r['baseline_nll_se']:.2f} "
            f"| {r['nll_difference']:.2f} ± {r['nll_difference_se']:.2f} "
            f"| {r['cvae_train_seconds']:.0f} / {r['cvae_eval_seconds']:.0f} "
            f"| {r['baseline_train_seconds']:.0f} / {r['baseline_eval_seconds']:.0f} |"
        )


def _cli(args: argparse.Namespace) -> list[str]:
    words = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words += [flag] if value else []
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        elif value is not None:
            words += [flag, str(value)]
    return words


if __name__ == "__main__":
    main()
