#!/usr/bin/env python
"""Train a VAE, evaluate it, and write its results: the main job of pyro_vae.

    python scripts/train.py                       # digits, offline, about a minute on 2 CPU cores
    python scripts/train.py --dataset fashion-mnist --num-epochs 20 --latent-dim 50
    python scripts/train.py --prior vamp --encoder full-covariance --elbo iwae --num-particles 5

Writes into --out-dir: checkpoint.pt (weights plus the arguments that rebuild the model; loads
with torch.load(weights_only=True)), metrics.json and metrics.csv (per epoch: train and test
ELBO with its reconstruction and KL terms), and PNG figures: reconstructions.png, samples.png,
latent_space.png, loss_curves.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

import pyro_vae as pv
from pyro_vae import plots
from pyro_vae._files import atomic_write

PROG = "train.py"
# Everything a run writes into its directory.
OUTPUT_FILES = (
    "checkpoint.pt",
    "metrics.json",
    "metrics.csv",
    "final_metrics.json",
    "reconstructions.png",
    "samples.png",
    "latent_space.png",
    "loss_curves.png",
    "weight_uncertainty.png",
)
# Train-set metrics each epoch use a fixed subset, so that evaluation stays cheap on big data.
MAX_TRAIN_EVAL = 10000


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    if text.strip() == "0":
        return 0
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _hidden_dims(text: str) -> list[int]:
    try:
        return [_positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive widths such as 512,256, got {text!r}"
        ) from None


def _device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected auto, cpu, cuda or cuda:N, got {text!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available here")
    return str(device)


def _likelihood_scale(text: str) -> float | str:
    if text in ("learned", "learned-per-feature"):
        return text
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a number > 0, learned or learned-per-feature, got {text!r}"
        ) from None


# What may change when a run is resumed: nothing that alters the model or the maths.
RESUME_OVERRIDES = ("--num-epochs", "--no-progress", "--checkpoint-every")

# --elbo names → Pyro's estimators, given the number of particles.
ELBOS = {
    "trace": lambda k: Trace_ELBO(num_particles=k),
    "meanfield": lambda k: TraceMeanField_ELBO(num_particles=k),
    "iwae": lambda k: RenyiELBO(alpha=0, num_particles=k),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog=PROG,
        description="Train a VAE (Pyro model and guide, SVI with Trace_ELBO) and write its "
        "checkpoint, metrics and figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        choices=pv.DATASETS,
        default="digits",
        help="digits is bundled with scikit-learn and always offline",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory with the dataset's IDX files (gzipped or not); default: "
        "Debian's files, then the cache ~/.cache/pyro_vae",
    )
    parser.add_argument(
        "--num-epochs",
        type=_positive_int,
        default=None,
        help="default: 200 for digits (1437 examples), 20 for the 60000-image datasets",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=128)
    parser.add_argument("--learning-rate", type=_positive_float, default=1e-3)
    parser.add_argument("--latent-dim", type=_positive_int, default=10)
    parser.add_argument(
        "--hidden-dims",
        type=_hidden_dims,
        default=[400],
        help="hidden widths of the encoder MLP, comma-separated; the decoder mirrors them",
    )
    parser.add_argument(
        "--num-iw-samples",
        type=_non_negative_int,
        default=100,
        help="importance samples for the final test log-likelihood (0: skip)",
    )
    parts = parser.add_argument_group(
        "model", "every part is one flag; the checkpoint records them all (pv.build_vae)"
    )
    parts.add_argument("--prior", choices=pv.PRIORS, default="standard-normal")
    parts.add_argument("--encoder", choices=pv.ENCODERS, default="diagonal")
    parts.add_argument(
        "--likelihood",
        choices=pv.LIKELIHOODS,
        default="bernoulli",
        help="bernoulli binarizes grayscale data dynamically; discretized-logistic uses the "
        "dataset's pixel levels",
    )
    parts.add_argument(
        "--decoder",
        choices=pv.DECODERS,
        default="mlp",
        help="conv: a convolutional encoder network and decoder pair over the images; "
        "bayesian-mlp: an MLP decoder whose weights have a Normal prior and a mean-field "
        "Normal posterior",
    )
    parts.add_argument(
        "--prior-scale",
        type=_positive_float,
        default=None,
        help="standard deviation of the weight prior of --decoder bayesian-mlp (default 1)",
    )
    parts.add_argument(
        "--num-components",
        type=_positive_int,
        default=None,
        help="mixture components (default 10) or VampPrior pseudo-inputs (default 100)",
    )
    parts.add_argument(
        "--flow-depth", type=_positive_int, default=2, help="layers of the flow prior / IAF"
    )
    parts.add_argument(
        "--likelihood-scale",
        type=_likelihood_scale,
        default="learned",
        help="normal / laplace: a fixed number, learned (shared) or learned-per-feature",
    )
    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--elbo",
        choices=tuple(ELBOS),
        default="trace",
        help="trace: Trace_ELBO (Monte-Carlo KL); meanfield: TraceMeanField_ELBO (closed-form "
        "KL where registered); iwae: RenyiELBO(alpha=0), importance weighted",
    )
    objective.add_argument(
        "--num-particles",
        type=_positive_int,
        default=None,
        help="draws of z per example and step; default 1, or 5 for iwae",
    )
    objective.add_argument("--beta", type=_positive_float, default=1.0, help="KL weight (beta-VAE)")
    objective.add_argument(
        "--kl-warmup-epochs",
        type=_non_negative_int,
        default=0,
        help="beta rises linearly from 0 to --beta over this many epochs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="where results go; default runs/<dataset>"
    )
    parser.add_argument(
        "--device", type=_device, default="auto", help="auto picks CUDA when present"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    faults = parser.add_argument_group("checkpoints and faults")
    faults.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint, with its own arguments (only "
        f"{', '.join(RESUME_OVERRIDES)} may change)",
    )
    faults.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out-dir"
    )
    faults.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        metavar="STEPS",
        help="also checkpoint every this many steps (default: after each epoch only)",
    )
    faults.add_argument(
        "--clip-norm", type=_positive_float, default=None, help="clip the gradient norm"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.resume is not None:
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        fixed = sorted(given - {"--resume", *RESUME_OVERRIDES})
        if fixed:
            parser.error(
                f"--resume continues a run with its own arguments; {', '.join(fixed)} cannot "
                f"change (only {', '.join(RESUME_OVERRIDES)} can)"
            )
        if args.overwrite:
            parser.error("--resume and --overwrite exclude each other")
        args.explicit = given
        return args
    if args.out_dir is None:
        args.out_dir = Path("runs") / args.dataset
    if args.num_epochs is None:
        args.num_epochs = 200 if args.dataset == "digits" else 20
    if args.num_particles is None:
        args.num_particles = 5 if args.elbo == "iwae" else 1
    if args.num_components is not None and args.prior not in ("mixture", "vamp"):
        parser.error(f"--num-components is for --prior mixture or vamp, not {args.prior}")
    if args.prior_scale is not None and args.decoder != "bayesian-mlp":
        parser.error(f"--prior-scale is for --decoder bayesian-mlp, not {args.decoder}")
    if args.elbo == "iwae" and args.decoder == "bayesian-mlp":
        parser.error(
            "--elbo iwae cannot train --decoder bayesian-mlp: its N/B scale sits outside the "
            "log-sum-exp, which would count the weights' KL N/B times per step; use trace or "
            "meanfield"
        )
    return args


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as file:
        file.write(text)


def _write_metrics(out_dir: Path, metrics: list[dict]) -> None:
    _write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(metrics[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(metrics)
    _write_text(out_dir / "metrics.csv", table.getvalue())


def _terms(vae: pv.VAE, x: torch.Tensor, prefix: str, num_data: int) -> dict[str, float]:
    """Mean ELBO terms per example. A Bayesian decoder's weight KL is spread over the
    ``num_data`` training examples, as in the training loss, and also reported whole."""
    terms = pv.elbo_terms(vae, x, num_data=num_data)
    row = {
        f"{prefix}_elbo": terms.elbo.mean().item(),
        f"{prefix}_reconstruction": terms.reconstruction.mean().item(),
        f"{prefix}_kl": terms.kl.mean().item(),
    }
    if vae.weight_guide is not None:
        row[f"{prefix}_weight_kl"] = terms.global_kl.item()
    return row


def evaluation_data(
    vae: pv.VAE, data: pv.DataSplits, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set and a training subset as the run evaluates them.

    A Bernoulli likelihood needs binary data: training binarizes dynamically (fit's default),
    and evaluation uses one fixed binarization drawn from the run's seeded ``generator``, so
    that every epoch, and scripts/evaluate.py later, sees the same test set.
    """
    binarize = isinstance(vae.likelihood, pv.BernoulliLikelihood) and not pv.data.is_binary(
        data.x_train
    )
    x_test = pv.binarize(data.x_test, generator) if binarize else data.x_test
    x_train_eval = data.x_train[:MAX_TRAIN_EVAL]
    if binarize:
        x_train_eval = pv.binarize(x_train_eval, generator)
    return x_test, x_train_eval


def load_run(run_dir: Path, required: tuple[str, ...] = ("args",)) -> tuple[pv.VAE, dict]:
    """The model and checkpoint of a run of this script, which must hold ``required`` keys."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no checkpoint.pt there (train with scripts/train.py)")
    vae, payload = pv.load_checkpoint(path)
    for key in required:
        if key not in payload:
            raise ValueError(f"{path}: holds no {key!r}; it was not written by scripts/train.py")
    return vae, payload


def load_run_test_set(run_dir: Path) -> tuple[pv.VAE, dict, pv.DataSplits, torch.Tensor]:
    """A run's model, checkpoint, dataset and test set exactly as the run evaluated it (for
    scripts/evaluate.py and scripts/explain.py), in the model's dtype."""
    vae, payload = load_run(run_dir)
    run = payload["args"]
    data = pv.load_dataset(run["dataset"], run["data_dir"])
    x_test, _ = evaluation_data(vae, data, torch.Generator().manual_seed(run["seed"]))
    return vae, payload, data, x_test.to(vae.dtype)


def _resumed_args(saved: dict, given: argparse.Namespace) -> argparse.Namespace:
    """The saved run's arguments, with the few a resume may change taken from the command."""
    args = argparse.Namespace(**saved)
    args.out_dir = given.resume  # the run's directory, wherever it is now
    args.data_dir = None if saved["data_dir"] is None else Path(saved["data_dir"])
    for flag in RESUME_OVERRIDES:
        name = flag.removeprefix("--").replace("-", "_")
        if flag in given.explicit:
            setattr(args, name, getattr(given, name))
    args.resume, args.overwrite = given.resume, False
    return args


def _prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into an old one's directory, or to write where we cannot."""
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"output directory {out_dir} already holds a run; continue it with --resume "
            f"{out_dir}, or replace it with --overwrite"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create output directory {out_dir}: {error}") from error
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"output directory {out_dir} is not writable")
    if overwrite:
        # The old run's files go now, so that none of them can pass for the new run's.
        for name in OUTPUT_FILES:
            (out_dir / name).unlink(missing_ok=True)


def model_config(args: argparse.Namespace, data: pv.DataSplits) -> dict:
    """The keyword arguments of pv.build_vae for these arguments and data: plain values, saved
    in the checkpoint so that the run rebuilds exactly."""
    return {
        "data_dim": data.data_dim,
        "latent_dim": args.latent_dim,
        "hidden_dims": list(args.hidden_dims),
        "prior": args.prior,
        "encoder": args.encoder,
        "likelihood": args.likelihood,
        "decoder": args.decoder,
        "image_shape": list(data.image_shape),
        "num_components": args.num_components,
        "flow_depth": args.flow_depth,
        "likelihood_scale": args.likelihood_scale,
        "num_bins": data.num_levels,
        "beta": args.beta,
        # Only a Bayesian decoder has a weight prior; other configs stay as they were saved.
        **({"prior_scale": args.prior_scale or 1.0} if args.decoder == "bayesian-mlp" else {}),
    }


def main(args: argparse.Namespace) -> dict:
    """Train, evaluate and write results; return the final metrics.

    Everything that can fail on bad input (device, data, model) runs before the output
    directory is touched.
    """
    resumed = None
    if args.resume is not None:
        saved_vae, resumed = load_run(args.resume, ("args", "metrics", "training"))
        args = _resumed_args(resumed["args"], args)
    pyro.set_rng_seed(args.seed)  # seeds torch, numpy and random
    data = pv.load_dataset(args.dataset, args.data_dir, device=args.device)
    config = model_config(args, data)
    if resumed is None:
        vae = pv.build_vae(**config).to(args.device)
    elif config != resumed["config"]:
        raise ValueError(
            f"{args.resume}: the data no longer match the saved run's model "
            f"({resumed['config']} against {config})"
        )
    else:
        vae = saved_vae.to(args.device)
    loss = ELBOS[args.elbo](args.num_particles)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    x_test, x_train_eval = evaluation_data(vae, data, generator)
    # Data outside the likelihood's support fail here, before the output directory is touched.
    vae.validate_data(x_test, "test data")
    vae.validate_data(x_train_eval, "training data")

    out_dir: Path = args.out_dir
    _prepare_out_dir(out_dir, resume=resumed is not None, overwrite=args.overwrite)
    run_args = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("resume", "overwrite", "explicit")
    }
    metrics: list[dict] = [] if resumed is None else list(resumed["metrics"])
    state = None if resumed is None else pv.TrainingState.from_dict(resumed["training"])
    # Only the mean-field objective uses a closed-form KL, and only where one is registered.
    closed_form = args.elbo == "meanfield" and pv.has_closed_form_kl(vae)
    kl_kind = "closed form" if closed_form else "Monte Carlo"
    print(
        f"{args.dataset}: {len(data.x_train)} train / {len(data.x_test)} test examples of "
        f"{data.data_dim} features; {pv.build.describe(config)}; latent {args.latent_dim}, "
        f"hidden {args.hidden_dims}; {type(loss).__name__} with {args.num_particles} "
        f"particle(s), KL by {kl_kind}, beta {args.beta}"
        + (f" (warm-up {args.kl_warmup_epochs} epochs)" if args.kl_warmup_epochs else "")
        + f"; device {args.device}; writing to {out_dir}"
    )

    if args.kl_warmup_epochs > args.num_epochs:
        reached = args.beta * args.num_epochs / args.kl_warmup_epochs
        print(
            f"note: the KL warm-up ({args.kl_warmup_epochs} epochs) outlasts training "
            f"({args.num_epochs} epochs): beta reaches only {reached:.3g} of {args.beta}"
        )

    def after_epoch(epoch: int, history: pv.History) -> None:
        row = {"epoch": epoch, "train_loss": history.loss[-1]}
        row.update(_terms(vae, x_train_eval, "train", len(data.x_train)))
        row.update(_terms(vae, x_test, "test", len(data.x_train)))
        row["seconds"] = history.epoch_seconds[-1]
        metrics.append(row)
        _write_metrics(out_dir, metrics)
        tqdm.write(
            f"epoch {epoch:>3}/{args.num_epochs}  loss {row['train_loss']:8.2f}  "
            f"train ELBO {row['train_elbo']:8.2f}  test ELBO {row['test_elbo']:8.2f} "
            f"(reconstruction {row['test_reconstruction']:8.2f}, KL {row['test_kl']:6.2f}"
            + (
                f", weight KL {row['test_weight_kl']:.0f} / {len(data.x_train)}"
                if "test_weight_kl" in row
                else ""
            )
            + ")  "
            f"{row['seconds']:.2f}s"
        )

    def checkpoint(training: pv.TrainingState) -> None:
        # Written atomically: a kill at any instant leaves the previous checkpoint whole.
        pv.save_checkpoint(
            out_dir / "checkpoint.pt",
            vae,
            config,
            args=run_args,
            epoch=training.epoch,
            step=training.step,
            metrics=metrics,
            training=training.to_dict(),
        )

    if state is not None:
        print(f"resuming after epoch {state.epoch}, step {state.step}")
    started = time.perf_counter()
    pv.fit(
        vae,
        data.x_train,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        loss=loss,
        kl_warmup_epochs=args.kl_warmup_epochs,
        clip_norm=args.clip_norm,
        callback=after_epoch,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=state,
        progress=False if args.no_progress else None,
        generator=generator,
    )

    final = dict(metrics[-1])
    final["train_seconds"] = time.perf_counter() - started
    # A deterministic encoder's q(z|x) has no density, so importance weights p(x, z) / q(z|x)
    # make no bound on log p(x): report none rather than a wrong one.
    if args.num_iw_samples and args.encoder == "delta":
        print("no importance-weighted log p(x) for the delta encoder: q(z|x) has no density")
    elif args.num_iw_samples:
        final["test_log_likelihood"] = (
            pv.log_likelihood(
                vae,
                x_test,
                num_samples=args.num_iw_samples,
                progress=False if args.no_progress else None,
            )
            .mean()
            .item()
        )
        final["num_iw_samples"] = args.num_iw_samples
        if vae.weight_guide is not None:
            # log_likelihood fixes a Bayesian decoder's weights at their posterior mean.
            final["test_log_likelihood_given"] = "posterior-mean decoder weights"
    _write_text(out_dir / "final_metrics.json", json.dumps(final, indent=2) + "\n")

    with torch.no_grad():
        shown = x_test[:10]
        plots.plot_reconstructions(
            shown, vae.reconstruct(shown), data.image_shape, out_dir / "reconstructions.png"
        )
        plots.plot_samples(vae.sample(64), data.image_shape, out_dir / "samples.png")
        loc, _ = vae.encode(x_test)
        plots.plot_latent_space(loc, data.y_test, data.class_names, out_dir / "latent_space.png")
        if vae.weight_guide is not None:
            mean, std = pv.weight_spread(vae, shown)
            plots.plot_weight_spread(
                shown, mean, std, data.image_shape, out_dir / "weight_uncertainty.png"
            )
    plots.plot_loss_curves(metrics, out_dir / "loss_curves.png")

    summary = f"done in {final['train_seconds']:.0f}s: test ELBO {final['test_elbo']:.2f} nats"
    if "test_log_likelihood" in final:
        summary += (
            f", test log p(x) >= {final['test_log_likelihood']:.2f} nats (K={args.num_iw_samples}"
            + (", given the posterior-mean weights" if vae.weight_guide is not None else "")
            + ")"
        )
    print(f"{summary}; results in {out_dir}")
    return final


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        main(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except pv.TrainingDivergedError as error:
        print(
            f"{PROG}: training diverged: {error}; checkpoint.pt keeps the last good state",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; checkpoint.pt holds the last finished step; continue with "
            f"--resume {args.resume or args.out_dir}",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
