"""The main job of scripts/train.py for ``--model cvae``: the conditional VAE on Pyro's quadrant
task (given 1, 2 or 3 quadrants of an image, generate the rest), against its deterministic
baseline.

    python scripts/train.py --model cvae --given-quadrants 2 --num-epochs 2

The steps are the VAE's (arguments, data, model, fit, evaluate, write) and the run directory
is pyro_vae.jobs.runs' format. The images are split by the quadrant mask into the missing pixels x
(the only observed site, dynamically binarized in training and binarized once, on the CPU from
the seed, for evaluation: :func:`pyro_vae.jobs.runs.evaluation_sets`) and the given pixels c (the
grayscale condition). The run directory gets

- ``checkpoint.pt``: the CVAE (config ``"model": "cvae"``), written by fit after each epoch
  and every ``--checkpoint-every`` steps, so that a run resumes exactly;
- ``baseline.pt``: the deterministic baseline (``"model": "cvae-baseline"``). It trains after
  the CVAE, from the seed, with the same budget (epochs, batch size, learning rate, widths),
  and without checkpoints of its own: training it is deterministic, so a resumed run that
  trains it again gets the very same weights;
- ``metrics.json`` / ``metrics.csv``: per epoch, the training objective and the one-draw ELBO
  terms of the missing pixels on a training subset and on the test set (cheap: the final
  score is the importance-sampled one);
- ``final_metrics.json``: the test negative log-likelihood of the missing pixels in nats,
  −log p(x | c), importance-sampled with ``--num-iw-particles`` draws for the CVAE and exact
  for the baseline, their standard errors over the test images, the paired difference, and
  the timings;
- ``completions.png``: test inputs (the given quadrants), the truth, the baseline's
  prediction and several CVAE completions.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, NamedTuple, cast

import pyro
import torch
from torch import Tensor

import pyro_vae as pv
from pyro_vae.checkpoint import build_model
from pyro_vae.infer import distributed
from pyro_vae.jobs import cli
from pyro_vae.jobs.runs import RunDirectory, claim_run_directory
from pyro_vae.models.cvae import ConditionalBaseline, ConditionalVAE
from pyro_vae.models.cvae_estimators import (
    completions,
    conditional_elbo_terms,
    conditional_log_likelihood,
)
from pyro_vae.models.masks import quadrant_mask, split_by_mask
from pyro_vae.plots import plot_completions

OWN_FLAGS: tuple[str, ...] = ("given_quadrants",)
BASELINE = "baseline.pt"
FIGURE = "completions.png"
# The VAE's flags that choose its parts: the CVAE's parts are fixed (a conditional Normal
# prior, a diagonal Normal encoder, MLPs, a Bernoulli likelihood: build_cvae). The VAE's other
# flags (--beta, --kl-warmup-epochs, --elbo, --num-particles, --num-iw-particles, the sizes and
# the training settings) mean the same here and are honoured.
VAE_ONLY = (
    "--compile",
    "--prior",
    "--encoder",
    "--likelihood",
    "--network",
    "--decoder",
    "--prior-scale",
    "--num-components",
    "--flow-depth",
    "--likelihood-scale",
)
# Images shown in the completion figure, and CVAE completions of each.
FIGURE_IMAGES, FIGURE_COMPLETIONS = 10, 5


def given_quadrants(text: str) -> int:
    if text.strip() not in ("1", "2", "3"):
        raise argparse.ArgumentTypeError(
            f"expected 1, 2 or 3 given quadrants (0 leaves nothing to condition on, 4 nothing "
            f"to predict), got {text!r}"
        )
    return int(text)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The flags of this model's group in scripts/train.py."""
    group.add_argument(
        "--given-quadrants",
        type=given_quadrants,
        default=2,
        help="quadrants of each image the CVAE is given; it generates the others (1: "
        "bottom-left, 2: left half, 3: all but bottom-right, as Pyro's examples/cvae)",
    )


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The defaults that depend on other arguments, and the VAE's flags the CVAE has no use
    for refused (one line) when they were given."""
    refused = sorted(args.given & set(VAE_ONLY))
    if refused:
        parser.error(
            f"{', '.join(refused)} chooses a part of the VAE; --model cvae has fixed parts "
            "(a conditional Normal prior, a diagonal Normal encoder, MLPs, a Bernoulli "
            "likelihood)"
        )
    args.num_particles = args.num_particles or (5 if args.elbo == "iwae" else 1)
    args.hidden_dims = args.hidden_dims or [400]


def model_config(args: argparse.Namespace, data_dim: int, condition_dim: int) -> dict[str, Any]:
    """The checkpoint's config of the CVAE (the keyword arguments of :func:`build_cvae`)."""
    return {
        "model": "cvae",
        "data_dim": data_dim,
        "condition_dim": condition_dim,
        "latent_dim": args.latent_dim,
        "beta": args.beta,
        "hidden_dims": list(args.hidden_dims),
    }


def baseline_config(config: dict[str, Any]) -> dict[str, Any]:
    """The baseline's config: the CVAE's sizes and widths, no latent."""
    keys = ("data_dim", "condition_dim", "hidden_dims")
    return {"model": "cvae-baseline", **{key: config[key] for key in keys}}


class Run(NamedTuple):
    """A CVAE run, new or read back by :func:`load_run` (:class:`pyro_vae.Run` is the VAE's)."""

    cvae: ConditionalVAE
    config: dict[str, Any]
    """The keyword arguments of build_cvae, with ``"model": "cvae"``."""
    args: dict[str, Any]
    """The arguments of scripts/train.py that made it (empty for a new run)."""
    checkpoint: dict[str, Any]
    """The whole checkpoint (empty for a new run)."""
    data: pv.DataSplits
    x_test: Tensor
    """The test images as the run scores them (binarized once from the seed), on the CPU."""
    x_train_eval: Tensor
    """The training subset scored each epoch, likewise."""


def evaluation_sets(cvae: ConditionalVAE, data: pv.DataSplits, seed: int) -> tuple[Tensor, Tensor]:
    """The VAE's evaluation sets (:func:`pyro_vae.jobs.runs.evaluation_sets`): whole images, of
    which the run scores the missing pixels."""
    # It reads the model's likelihood only, which the CVAE has as the VAE does.
    return pv.jobs.runs.evaluation_sets(cast(pv.VAE, cvae), data, seed)


def main(args: argparse.Namespace, prog: str) -> int:
    """Train the CVAE and its baseline, evaluate and write; return the exit code. Bad input
    (data, mask) fails before the output directory is claimed; a resumed run holds its
    directory first, as the VAE's does."""
    if args.resume is not None:
        with claim_run_directory(args.resume, mode="existing") as run_dir:
            run = load_run(args.resume)
            # scripts/train.py's parser has refused every flag a resume may not change.
            overrides = sorted(args.given - {"--resume"})
            args = pv.jobs.runs.resumed_args(run.args, args, run.checkpoint["training"], overrides)
            pyro.set_rng_seed(args.seed)
            return run_dir.guarded(prog, lambda: train(args, run_dir, run))
    pyro.set_rng_seed(args.seed)  # seeds torch, numpy and random
    data = pv.load_dataset(args.dataset, args.data_dir, device=args.device)
    mask = quadrant_mask(data.image_shape, args.given_quadrants)
    num_given = int(mask.sum())
    config = model_config(args, data.data_dim - num_given, num_given)
    pv.jobs.runs.check_model_size(config)
    cvae = cast(ConditionalVAE, build_model(config)).to(args.device)
    x_test, x_train_eval = evaluation_sets(cvae, data, args.seed)
    # Data outside the likelihood's support are refused here, before any file is written.
    _split(cvae, x_test, data.x_test, mask, "test data")
    _split(cvae, x_train_eval, data.x_train[: len(x_train_eval)], mask, "training data")
    run = Run(cvae, config, {}, {}, data, x_test, x_train_eval)
    with claim_run_directory(
        args.out_dir, mode="overwrite" if args.overwrite else "new"
    ) as run_dir:
        return run_dir.guarded(prog, lambda: train(args, run_dir, run))


def load_run(directory: Path) -> Run:
    """The CVAE run in ``directory`` (what :func:`pyro_vae.load_run` returns for it): the
    model, its arguments and checkpoint, the data, and the very evaluation sets it scored,
    checked by their digest."""
    path = pv.jobs.runs.checkpoint_path(directory)
    cvae, payload = pv.load_checkpoint(path)
    if not isinstance(cvae, ConditionalVAE):
        raise ValueError(f"{path}: not a run of --model cvae")
    for key in ("args", "config", "evaluation_digest", "training"):
        if key not in payload:
            raise ValueError(f"{path}: holds no {key!r}; it was not written by scripts/train.py")
    saved = payload["args"]
    data = pv.load_dataset(saved["dataset"], saved["data_dir"])
    x_test, x_train_eval = evaluation_sets(cvae, data, saved["seed"])
    if pv.jobs.runs.digest(x_test) != payload["evaluation_digest"]:
        raise ValueError(
            f"{path}: the test set rebuilt from {saved['dataset']} is not the one this run "
            "scored (have the data files changed?)"
        )
    return Run(cvae, payload["config"], saved, payload, data, x_test, x_train_eval)


def _split(
    cvae: ConditionalVAE, x_scored: Tensor, images: Tensor, mask: Tensor, what: str
) -> tuple[Tensor, Tensor]:
    """(x, c) as the run scores them: the missing pixels of the evaluation images (binarized
    for the Bernoulli likelihood), the given pixels of the grayscale images, both checked."""
    x, _ = split_by_mask(x_scored.to(cvae.device, cvae.dtype), mask)
    _, c = split_by_mask(images.to(cvae.device, cvae.dtype), mask)
    cvae.validate_data(x, f"{what} (the missing pixels)")
    cvae.validate_condition(c, len(x), f"{what} (the given pixels)")
    return x, c


def train(args: argparse.Namespace, run_dir: RunDirectory, run: Run) -> int:
    started = time.perf_counter()
    main_rank = distributed.ranks().is_main  # under torchrun, rank 0 alone shows and writes
    progress = False if args.no_progress or not main_rank else None
    cvae, config, data = run.cvae.to(args.device), run.config, run.data.to(args.device)
    mask = quadrant_mask(data.image_shape, args.given_quadrants)
    x_train, c_train = split_by_mask(data.x_train, mask)
    x_test, c_test = _split(cvae, run.x_test, data.x_test, mask, "test data")
    x_train_eval, c_train_eval = _split(
        cvae, run.x_train_eval, data.x_train[: len(run.x_train_eval)], mask, "training data"
    )
    loss = pv.jobs.runs.make_loss(args.elbo, args.num_particles)
    metrics, state = run_dir.resume_state(run.checkpoint)
    cli.say(
        f"{args.dataset}: {len(x_train)} train / {len(x_test)} test images; "
        f"{args.given_quadrants} quadrant(s) given ({c_train.shape[1]} pixels), "
        f"{x_train.shape[1]} to predict; CVAE latent {args.latent_dim}, widths "
        f"{args.hidden_dims}; {type(loss).__name__} with {args.num_particles} particle(s), "
        f"beta {args.beta}; device {args.device}; writing to {run_dir.path}"
        + pv.jobs.runs.start_details(args.batch_size, state)
    )

    def after_epoch(epoch: int, history: pv.History) -> None:
        row = {"epoch": epoch, "train_loss": history.loss[-1]}
        for prefix, x, c in (("train", x_train_eval, c_train_eval), ("test", x_test, c_test)):
            terms = conditional_elbo_terms(cvae, x, c)
            row[f"{prefix}_elbo"] = terms.elbo.mean().item()
            row[f"{prefix}_reconstruction"] = terms.reconstruction.mean().item()
            row[f"{prefix}_kl"] = terms.kl.mean().item()
        row["seconds"] = history.epoch_seconds[-1]
        metrics.append(row)
        cli.say(
            f"epoch {epoch:>3}/{args.num_epochs}  loss {row['train_loss']:8.2f}  train ELBO "
            f"{row['train_elbo']:8.2f}  test ELBO {row['test_elbo']:8.2f} (reconstruction "
            f"{row['test_reconstruction']:8.2f}, KL {row['test_kl']:6.2f})  "
            f"{row['seconds']:.2f}s"
        )

    budget = {
        "num_epochs": args.num_epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "clip_norm": args.clip_norm,
        "progress": progress,
    }
    distributed.seed_noise(args.seed)  # each rank its own z, from the model built alike
    pv.fit(
        cvae,
        (x_train, c_train),
        loss=loss,
        kl_warmup_epochs=args.kl_warmup_epochs,
        callback=after_epoch,
        # The digest lets load_run check that it rebuilds this very test set.
        checkpoint=run_dir.checkpointer(
            cvae,
            config,
            metrics,
            args=pv.jobs.runs.run_arguments(args),
            evaluation_digest=pv.jobs.runs.digest(run.x_test),
        ),
        checkpoint_every=args.checkpoint_every,
        resume=state,
        generator=torch.Generator(args.device).manual_seed(args.seed),
        **budget,
    )
    trained = time.perf_counter() - started

    # The baseline: from the seed, after the CVAE, so that it is the same whether or not the
    # CVAE's training was interrupted and resumed.
    cli.say(f"training the baseline ({args.num_epochs} epochs, the same budget)")
    pyro.set_rng_seed(args.seed)
    baseline = cast(ConditionalBaseline, build_model(baseline_config(config))).to(args.device)
    distributed.seed_noise(args.seed)
    try:
        baseline_history = pv.fit(
            baseline,
            (x_train, c_train),
            generator=torch.Generator(args.device).manual_seed(args.seed),
            **budget,
        )
    except pv.TrainingDivergedError as error:
        # The CVAE is trained and checkpointed; say which model diverged.
        raise pv.TrainingDivergedError(f"the baseline: {error}") from error
    if main_rank:
        pv.save_checkpoint(
            run_dir.path / BASELINE,
            baseline,
            baseline_config(config),
            args=pv.jobs.runs.run_arguments(args),
            train_loss=baseline_history.loss,
        )
    baseline_trained = time.perf_counter() - started - trained

    final: dict[str, Any] = dict(metrics[-1])
    final["baseline_train_loss"] = baseline_history.loss[-1]
    final.update(score(cvae, baseline, x_test, c_test, args.num_iw_particles, progress))
    figure = completions(
        cvae,
        baseline,
        data.x_test[:FIGURE_IMAGES].to(cvae.dtype),
        mask,
        data.image_shape,
        num_completions=FIGURE_COMPLETIONS,
    )
    if main_rank:
        plot_completions(figure, run_dir.path / FIGURE)
    final["train_seconds"] = trained
    final["baseline_train_seconds"] = baseline_trained
    final["total_seconds"] = time.perf_counter() - started
    run_dir.write_json("final_metrics.json", final)

    summary = f"test ELBO {final['test_elbo']:.2f} nats"
    if "test_nll" in final:
        summary = (
            f"test -log p(missing | given): CVAE {final['test_nll']:.2f} ± "
            f"{final['test_nll_se']:.2f} nats (K={args.num_iw_particles}), baseline "
            f"{final['baseline_test_nll']:.2f} ± {final['baseline_test_nll_se']:.2f}; "
            f"baseline − CVAE {final['test_nll_difference']:.2f} ± "
            f"{final['test_nll_difference_se']:.2f} (paired)"
        )
    cli.say(
        f"done in {final['total_seconds']:.0f}s ({trained:.0f}s CVAE, {baseline_trained:.0f}s "
        f"baseline): {summary}; results in {run_dir.path}"
    )
    return 0


def score(
    cvae: ConditionalVAE,
    baseline: ConditionalBaseline,
    x: Tensor,
    c: Tensor,
    num_particles: int,
    progress: bool | None,
) -> dict[str, float]:
    """The test negative log-likelihood of the missing pixels, −log p(x | c) per image in nats:
    the CVAE's importance-sampled with ``num_particles`` draws (an upper bound in expectation,
    tighter as K grows; 0: not scored), the baseline's exact; their means, standard errors
    over the images, and the paired difference (same images: a far smaller error)."""
    if not num_particles:
        return {}
    cli.say(f"scoring log p(missing | given) with K={num_particles} importance samples")
    cvae_nll = -conditional_log_likelihood(cvae, x, c, num_particles, progress=progress)
    baseline_nll = -conditional_log_likelihood(baseline, x, c, 1, progress=progress)
    row = {}
    for name, values in (
        ("test_nll", cvae_nll),
        ("baseline_test_nll", baseline_nll),
        ("test_nll_difference", baseline_nll - cvae_nll),
    ):
        row[name] = values.mean().item()
        row[f"{name}_se"] = (values.std() / math.sqrt(len(values))).item()
    row["num_iw_particles"] = num_particles
    return row
