"""The main job of scripts/train.py for ``--model cvae``: the conditional VAE on Pyro's quadrant
task (given 1, 2 or 3 quadrants of an image, generate the rest), against its deterministic
baseline.

    python scripts/train.py --model cvae --given-quadrants 2 --num-epochs 2

The runner (pyro_vae.jobs.runner) trains it through the steps of every model kind, into a
run directory (pyro_vae.jobs.run_directory). The images are split by the quadrant mask into
the missing pixels x (the only observed site, dynamically binarized in training and binarized
once, on the CPU from the seed, for evaluation: :func:`pyro_vae.jobs.runs.evaluation_sets`)
and the given pixels c (the grayscale condition). The run directory gets

- ``checkpoint.pt``: the CVAE (config ``"model": "cvae"``), written by fit after each epoch
  and every ``--checkpoint-every`` steps, so that a run resumes exactly;
- ``baseline.pt``: the deterministic baseline (``"model": "cvae-baseline"``). It trains after
  the CVAE, from the seed, with the same budget (epochs, batch size, learning rate, widths),
  and without checkpoints of its own: training it is deterministic, so a resumed run that
  trains it again gets the very same weights. Like the CVAE's, its epoch is chosen on the
  validation set (its exact −log p(missing | given) there, after each epoch) and the file
  holds the weights of that epoch (:class:`BaselineSelection`);
- ``metrics.json`` / ``metrics.csv``: per epoch, the training objective and the one-draw ELBO
  terms of the missing pixels on a training subset and on the validation set (cheap: the
  final score is the importance-sampled one);
- ``final_metrics.json``: the test negative log-likelihood of the missing pixels in nats,
  −log p(x | c), importance-sampled with ``--num-iw-particles`` draws for the CVAE and exact
  for the baseline, their standard errors over the test images, the paired difference, the
  baseline's epoch kept (``baseline_epoch``) and its validation curve
  (``baseline_val_nll_by_epoch``), and the timings;
- ``completions.png``: test inputs (the given quadrants), the truth, the baseline's
  prediction and several CVAE completions.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, cast

import pyro
import torch
from torch import Tensor

import pyro_vae as pv
from pyro_vae.checkpoint import build_model
from pyro_vae.components.networks import DEFAULT_HIDDEN_DIMS
from pyro_vae.infer import distributed
from pyro_vae.jobs import cli
from pyro_vae.jobs.run_directory import RunDirectory
from pyro_vae.jobs.runs import (
    SPLIT_NAMES,
    Run,
    Setup,
    default_num_particles,
    elbo_line,
    explain_on,
    load_companion,
    make_loss,
    per_class,
    provenance,
    read_whole,
    run_arguments,
)
from pyro_vae.models.cvae_estimators import conditional_elbo_terms

KIND = "cvae"
# The epoch kept, and scored on the test set: the best by this validation metric.
SELECTED_BY = "val_elbo"
OWN_FLAGS = ("--given-quadrants",)
BASELINE, FIGURE = FILES = ("baseline.pt", "completions.png")
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
    args.num_particles = args.num_particles or default_num_particles(args.elbo)
    args.hidden_dims = args.hidden_dims or list(DEFAULT_HIDDEN_DIMS)


def new_config(args: argparse.Namespace, data: pv.DataSplits) -> dict[str, Any]:
    """The checkpoint's config of a new CVAE (the keyword arguments of ``build_cvae``): the
    quadrant mask splits each image into the pixels to predict and the given ones."""
    num_given = int(pv.quadrant_mask(data.image_shape, args.given_quadrants).sum())
    return {
        "model": "cvae",
        "data_dim": data.data_dim - num_given,
        "condition_dim": num_given,
        "latent_dim": args.latent_dim,
        "beta": args.beta,
        "hidden_dims": list(args.hidden_dims),
    }


def baseline_config(config: dict[str, Any]) -> dict[str, Any]:
    """The baseline's config: the CVAE's sizes and widths, no latent."""
    keys = ("data_dim", "condition_dim", "hidden_dims")
    return {"model": "cvae-baseline", **{key: config[key] for key in keys}}


def check_run(run: Run) -> None:
    """A CVAE run needs nothing beyond what every run is checked for."""


def split_scored(
    cvae: pv.ConditionalVAE, x_scored: Tensor, images: Tensor, mask: Tensor, what: str
) -> tuple[Tensor, Tensor]:
    """(x, c) as the run scores them: the missing pixels of the evaluation images (binarized
    for the Bernoulli likelihood), the given pixels of the grayscale images, both checked."""
    x, _ = pv.split_by_mask(x_scored.to(cvae.device, cvae.dtype), mask)
    _, c = pv.split_by_mask(images.to(cvae.device, cvae.dtype), mask)
    cvae.validate_data(x, f"{what} (the missing pixels)")
    cvae.validate_condition(c, len(x), f"{what} (the given pixels)")
    return x, c


def prepare(run: Run, args: argparse.Namespace) -> Setup:
    """The missing and given pixels of the training images and of both evaluation sets, on
    ``args.device``, checked before anything is written."""
    cvae = run.model.to(args.device)
    assert isinstance(cvae, pv.ConditionalVAE)  # the registry sent a "cvae" run here
    # The CVAE trains on tensors only: rows streamed from a .npy are read whole, and it
    # says so.
    data, notes = read_whole(run.data, KIND)
    data = data.to(args.device)
    x_all = data.train_tensor()
    mask = pv.quadrant_mask(data.image_shape, args.given_quadrants)
    x_train, c_train = pv.split_by_mask(x_all, mask)
    # Each evaluation set as (missing pixels as scored, given pixels of the grayscale images).
    images = {
        "train": x_all[: len(run.x_train_eval)],
        "val": data.x_val,
        "test": data.x_test,
    }
    scored: dict[str, Tensor] = {"mask": mask}
    for split, x in run.scored_sets(args.device, cvae.dtype).items():
        given = images[split]
        assert given is not None  # a scored set has its images
        scored[split], scored[f"{split}_given"] = split_scored(
            cvae, x, given, mask, f"{SPLIT_NAMES[split]} data"
        )
    loss = make_loss(args.elbo, args.num_particles)
    return Setup(
        model=cvae,
        training_data=(x_train, c_train),
        loss=loss,
        description=(
            f"{args.dataset}: {len(x_train)} train / {data.num_val} validation / "
            f"{len(data.x_test)} test images; "
            f"{args.given_quadrants} quadrant(s) given ({c_train.shape[1]} pixels), "
            f"{x_train.shape[1]} to predict; CVAE latent {args.latent_dim}, widths "
            f"{args.hidden_dims}; {type(loss).__name__} with {args.num_particles} particle(s), "
            f"beta {args.beta}; device {args.device}; writing to {args.out_dir}"
        ),
        scored=scored,
        notes=notes,
        trained="CVAE",
    )


def split_metrics(setup: Setup, split: str) -> dict[str, float]:
    """The one-draw ELBO terms of the missing pixels of one evaluation set."""
    cvae, scored = setup.model, setup.scored
    assert isinstance(cvae, pv.ConditionalVAE)
    terms = conditional_elbo_terms(cvae, scored[split], scored[f"{split}_given"])
    return {
        f"{split}_elbo": terms.elbo.mean().item(),
        f"{split}_reconstruction": terms.reconstruction.mean().item(),
        f"{split}_kl": terms.kl.mean().item(),
    }


def epoch_row(setup: Setup, args: argparse.Namespace, epoch: int) -> dict[str, Any]:
    """The ELBO terms on a training subset and the validation set (never the test set)."""
    row: dict[str, Any] = {}
    for split in ("train", "val"):
        if split in setup.scored:
            row.update(split_metrics(setup, split))
    return row


def epoch_line(row: dict[str, Any]) -> str:
    return elbo_line(row)


def finish(
    setup: Setup,
    run: Run,
    args: argparse.Namespace,
    run_dir: RunDirectory,
    metrics: list[dict[str, Any]],
    progress: bool | None,
) -> dict[str, Any]:
    """The test set's ELBO terms, once, of the weights the runner kept; the baseline, trained
    after the CVAE with the same budget, its best epoch by validation kept; both scored once on
    the test set; the completion figure."""
    test_terms = split_metrics(setup, "test")
    started = time.perf_counter()
    cvae, scored = setup.model, setup.scored
    assert isinstance(cvae, pv.ConditionalVAE)
    main_rank = distributed.ranks().is_main
    # The baseline: from the seed, after the CVAE, so that it is the same whether or not the
    # CVAE's training was interrupted and resumed.
    cli.say(f"training the baseline ({args.num_epochs} epochs, the same budget)")
    pyro.set_rng_seed(args.seed)
    config = baseline_config(run.config)
    baseline = cast(pv.ConditionalBaseline, build_model(config)).to(args.device)
    distributed.seed_noise(args.seed)
    selection = BaselineSelection(baseline, scored)
    try:
        baseline_history = pv.fit(
            baseline,
            setup.training_data,
            num_epochs=args.num_epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            clip_norm=args.clip_norm,
            progress=progress,
            generator=torch.Generator(args.device).manual_seed(args.seed),
            callback=selection,
        )
    except pv.TrainingDivergedError as error:
        # The CVAE is trained and checkpointed; say which model diverged.
        raise pv.TrainingDivergedError(f"the baseline: {error}") from error
    # The test set is scored once, below, with the kept epoch's weights; baseline.pt holds them.
    selection.restore()
    if main_rank:
        pv.save_checkpoint(
            run_dir.path / BASELINE,
            baseline,
            config,
            args=run_arguments(args),
            train_loss=baseline_history.loss,
        )
    final: dict[str, Any] = {
        **test_terms,
        "baseline_train_loss": baseline_history.loss[-1],
        **selection.describe(),
        "baseline_train_seconds": time.perf_counter() - started,
    }
    final.update(
        score(cvae, baseline, scored["test"], scored["test_given"], args.num_iw_particles, progress)
    )
    figure = pv.completions(
        cvae,
        baseline,
        run.data.x_test[:FIGURE_IMAGES].to(args.device, cvae.dtype),
        scored["mask"],
        run.data.image_shape,
        num_completions=FIGURE_COMPLETIONS,
    )
    if main_rank:
        pv.plot_completions(figure, run_dir.path / FIGURE)
    return final


class BaselineSelection:
    """fit's callback for the baseline: after each epoch, its exact −log p(missing | given)
    on the validation set (``scored["val"]``, the run's ``x_val``), and a copy of the weights
    of the best epoch so far, which :meth:`restore` puts back once training is over. Without a
    validation set (``--val-size 0``) the last epoch is kept. Never stops training: the
    baseline has the CVAE's budget. Alike on every rank (the same weights score the same
    rows), so the ranks keep the same epoch."""

    def __init__(self, baseline: pv.ConditionalBaseline, scored: dict[str, Tensor]) -> None:
        self.baseline = baseline
        self.val = (scored["val"], scored["val_given"]) if "val" in scored else None
        self.val_nll: list[float] = []  # one per epoch, the first epoch first
        self.epoch = self.epoch_trained = 0
        self.best = math.inf
        self.weights: dict[str, Tensor] | None = None

    def __call__(self, epoch: int, history: pv.History) -> None:
        self.epoch_trained = epoch
        if self.val is None:
            return
        x, c = self.val
        nll = -pv.conditional_log_likelihood(self.baseline, x, c, 1, progress=False).mean().item()
        self.val_nll.append(nll)
        if self.weights is None or nll < self.best:
            self.epoch, self.best = epoch, nll
            self.weights = {
                key: value.detach().clone() for key, value in self.baseline.state_dict().items()
            }

    def restore(self) -> None:
        """The kept epoch's weights back in the baseline (the last epoch's already are when
        there is no validation set)."""
        if self.weights is not None:
            self.baseline.load_state_dict(self.weights)

    def describe(self) -> dict[str, Any]:
        """What final_metrics.json records of the choice: the epoch kept, how, and the
        validation curve it was read off."""
        if self.val is None:
            return {
                "baseline_epoch": self.epoch_trained,
                "baseline_selected_by": "last epoch (no validation set)",
            }
        return {
            "baseline_epoch": self.epoch,
            "baseline_selected_by": "best validation -log p(missing | given) (exact)",
            "baseline_val_nll": self.best,
            "baseline_val_nll_by_epoch": self.val_nll,
        }


def summary(final: dict[str, Any], args: argparse.Namespace) -> str:
    text = f"test ELBO {final['test_elbo']:.2f} nats"
    if "test_nll" in final:
        text = (
            f"test -log p(missing | given): CVAE {final['test_nll']:.2f} ± "
            f"{final['test_nll_se']:.2f} nats (K={args.num_iw_particles}), baseline "
            f"{final['baseline_test_nll']:.2f} ± {final['baseline_test_nll_se']:.2f}; "
            f"baseline − CVAE {final['test_nll_difference']:.2f} ± "
            f"{final['test_nll_difference_se']:.2f} (paired)"
        )
    kept = f"epoch {final['baseline_epoch']} kept"
    if "baseline_val_nll" in final:
        kept += f", validation -log p {final['baseline_val_nll']:.2f}"
    else:
        kept += " (no validation set: the last)"
    return f"{text}; the baseline trained in {final['baseline_train_seconds']:.0f}s, {kept}"


def score(
    cvae: pv.ConditionalVAE,
    baseline: pv.ConditionalBaseline,
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
    cvae_nll = -pv.conditional_log_likelihood(cvae, x, c, num_particles, progress=progress)
    baseline_nll = -pv.conditional_log_likelihood(baseline, x, c, 1, progress=progress)
    return {**paired_scores(cvae_nll, baseline_nll), "num_iw_particles": num_particles}


def paired_scores(cvae_nll: Tensor, baseline_nll: Tensor) -> dict[str, float]:
    """The mean −log p(x | c) of the CVAE and of the baseline, and of their difference, each
    with its standard error over the images. The difference is paired (the same images), so
    the images' own difficulty cancels and its error is far smaller."""
    row = {}
    for name, values in (
        ("test_nll", cvae_nll),
        ("baseline_test_nll", baseline_nll),
        ("test_nll_difference", baseline_nll - cvae_nll),
    ):
        row[name] = values.mean().item()
        row[f"{name}_se"] = (values.std() / math.sqrt(len(values))).item()
    return row


# Draws of z per condition for the spread of the completions, and conditions per pass.
SPREAD_SAMPLES, SPREAD_CHUNK = 100, 100


def load_baseline(run: Run) -> pv.ConditionalBaseline:
    """The run's baseline (``baseline.pt``): as :func:`~pyro_vae.jobs.load_run` loaded and
    checked it, or, for a run read without its companions, loaded and checked against the
    run now (its digest kept in ``run.digests``); a ValueError saying why there is none."""
    path = run.directory / BASELINE
    baseline = run.companions.get(BASELINE)
    if baseline is None:
        if not path.is_file():
            raise ValueError(
                f"{run.directory}: no {BASELINE} there: the run stopped before its baseline "
                "was trained (finish it with scripts/train.py --resume)"
            )
        baseline, _, read = load_companion(run.directory, BASELINE, run.checkpoint, run.args)
        run.digests.update(read)
    if not isinstance(baseline, pv.ConditionalBaseline):
        raise ValueError(f"{path}: not the CVAE's baseline")
    return baseline


def test_parts(run: Run) -> tuple[Tensor, Tensor]:
    """(x, c) of the test set as the run scores them (:func:`split_scored`), on the CPU."""
    cvae = run.model
    assert isinstance(cvae, pv.ConditionalVAE)
    mask = pv.quadrant_mask(run.data.image_shape, run.args["given_quadrants"])
    return split_scored(cvae, run.x_test, run.data.x_test, mask, "test data")


@torch.no_grad()
def evaluate(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """scripts/evaluate.py's numbers: −log p(x | c) of the missing pixels, importance-sampled
    for the CVAE and exact for its baseline, their standard errors and paired difference, and
    how much the CVAE's completions vary per condition."""
    cvae = run.model
    assert isinstance(cvae, pv.ConditionalVAE)
    baseline = load_baseline(run)
    x, c = test_parts(run)
    labels = run.data.y_test
    if args.max_examples is not None:
        x, c, labels = x[: args.max_examples], c[: args.max_examples], labels[: args.max_examples]
    pyro.set_rng_seed(args.seed)
    progress = False if args.no_progress else None
    stage = cli.stage_printer()
    result = provenance(run, describe(run.config), args.seed)
    result.update(
        baseline_sha256=run.file_sha256(BASELINE),
        given_quadrants=run.args["given_quadrants"],
        num_examples=len(x),
        num_missing_pixels=x.shape[1],
        num_iw_particles=args.num_iw_particles,
    )
    stage(f"-log p(missing | given) of {len(x)} test images, CVAE with K={args.num_iw_particles}")
    cvae_nll = -pv.conditional_log_likelihood(
        cvae, x, c, args.num_iw_particles, chunk_size=args.chunk_size, progress=progress
    )
    stage("-log p(missing | given), baseline (exact)")
    baseline_nll = -pv.conditional_log_likelihood(baseline, x, c, 1, chunk_size=args.chunk_size)
    result.update(paired_scores(cvae_nll, baseline_nll))
    stage(f"spread of CVAE completions, {SPREAD_SAMPLES} draws of z per condition")
    spread = torch.cat(
        [pv.sample_spread(cvae, chunk, SPREAD_SAMPLES) for chunk in c.split(SPREAD_CHUNK)]
    )
    result["spread_num_samples"] = SPREAD_SAMPLES
    result["sample_spread"] = quartiles(spread)
    result["per_class"] = per_class(
        labels, run.data.class_names, nll=cvae_nll, baseline_nll=baseline_nll, sample_spread=spread
    )
    stage("done")
    return result


def quartiles(values: Tensor) -> dict[str, float]:
    """The mean, standard deviation and quartiles of per-condition values."""
    values = values.double()
    points = torch.quantile(values, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).double())
    return {
        "mean": values.mean().item(),
        "std": values.std().item() if len(values) > 1 else 0.0,
        **dict(zip(("min", "q25", "median", "q75", "max"), points.tolist(), strict=True)),
    }


def describe(config: dict[str, Any]) -> str:
    return f"CVAE, latent {config['latent_dim']}, hidden {config['hidden_dims']}"


def table(result: dict[str, Any]) -> str:
    spread = result["sample_spread"]
    lines = [
        f"{result['run']} (epoch {result['epoch']}, {result['selected_by']}; {result['model']}; "
        f"{result['given_quadrants']} quadrant(s) given), {result['num_examples']} test images, "
        f"-log p(missing | given) in nats per image",
        f"  CVAE     {result['test_nll']:8.2f} ± {result['test_nll_se']:.2f} "
        f"(K={result['num_iw_particles']})",
        f"  baseline {result['baseline_test_nll']:8.2f} ± {result['baseline_test_nll_se']:.2f} "
        "(exact)",
        f"  baseline - CVAE {result['test_nll_difference']:.2f} ± "
        f"{result['test_nll_difference_se']:.2f} (paired)",
        f"  spread of CVAE completions per condition ({result['spread_num_samples']} draws): "
        f"mean {spread['mean']:.4f}, median {spread['median']:.4f}, "
        f"range {spread['min']:.4f}-{spread['max']:.4f}",
        f"  {'class':<14}{'count':>7}{'CVAE':>10}{'baseline':>10}{'spread':>9}",
    ]
    for name, row in result["per_class"].items():
        lines.append(
            f"  {name:<14}{row['count']:>7}{row['nll']:>10.2f}{row['baseline_nll']:>10.2f}"
            f"{row['sample_spread']:>9.4f}"
        )
    return "\n".join(lines)


def explain(run: Run, out_dir: Path, num_particles: int) -> Path:
    """The report of the spread of the completions and of μ and σ of q(z|x,c)."""
    x, c = test_parts(run)
    return explain_on(run, x, out_dir, num_particles=num_particles, condition=c)
