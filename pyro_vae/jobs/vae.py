"""The VAE's job (``scripts/train.py --model vae``, the default): its flags, checks and config,
what it scores each epoch and at the end, its figures, its evaluation table and its report.

    python scripts/train.py                       # a VAE on digits, offline
    python scripts/train.py --prior vamp --encoder full-covariance --elbo iwae

Each epoch scores the one-draw ELBO terms on a training subset and the test set; the end adds
the importance-weighted bound on log p(x) with ``--num-iw-particles`` samples. The figures are
reconstructions.png, samples.png, latent_space.png, loss_curves.png (and
weight_uncertainty.png for a Bayesian decoder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor

import pyro_vae as pv
from pyro_vae import plots
from pyro_vae.components.networks import DEFAULT_HIDDEN_DIMS
from pyro_vae.data import DataSplits
from pyro_vae.infer import compiled, distributed
from pyro_vae.jobs import cli
from pyro_vae.jobs.run_directory import RunDirectory
from pyro_vae.jobs.runs import (
    SPLIT_NAMES,
    Run,
    Setup,
    default_num_particles,
    elbo_line,
    explain_on,
    make_loss,
    per_class,
    provenance,
)
from pyro_vae.models.build import describe

KIND = "vae"
# The epoch kept, and scored on the test set: the best by this validation metric.
SELECTED_BY = "val_elbo"
# The files this job adds to a run (write_figures); the weight figure only for a Bayesian
# decoder.
RECONSTRUCTIONS, SAMPLES, LATENT_SPACE, LOSS_CURVES, WEIGHT_UNCERTAINTY = FILES = (
    "reconstructions.png",
    "samples.png",
    "latent_space.png",
    "loss_curves.png",
    "weight_uncertainty.png",
)
# The flags of this model's own group: the parts, one keyword each (pv.build_vae). --network
# is in the group but not its own: M2 takes it too.
OWN_FLAGS = (
    "--prior",
    "--encoder",
    "--likelihood",
    "--decoder",
    "--prior-scale",
    "--num-components",
    "--flow-depth",
    "--likelihood-scale",
)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The flags that choose the VAE's parts."""
    group.add_argument("--prior", choices=pv.PRIOR_NAMES, default="standard-normal", help="p(z)")
    group.add_argument("--encoder", choices=pv.ENCODER_NAMES, default="diagonal", help="q(z|x)")
    group.add_argument(
        "--likelihood", choices=pv.LIKELIHOOD_NAMES, default="bernoulli", help="p(x|z)"
    )
    group.add_argument(
        "--network",
        choices=pv.NETWORK_NAMES,
        default="mlp",
        help="the architecture of encoder and decoder alike (conv: fixed layers, no --hidden-dims)",
    )
    group.add_argument(
        "--decoder",
        choices=pv.DECODER_NAMES,
        default="deterministic",
        help="bayesian: a Normal prior on the decoder's weights, fitted by a mean-field guide",
    )
    group.add_argument(
        "--prior-scale", type=cli.positive_float, help="weight prior's std (bayesian; default 1)"
    )
    group.add_argument(
        "--num-components",
        type=cli.positive_int,
        help="mixture components (default 10) or VampPrior pseudo-inputs (default 100)",
    )
    group.add_argument("--flow-depth", type=cli.positive_int, default=2, help="flow/IAF layers")
    group.add_argument(
        "--likelihood-scale",
        type=cli.likelihood_scale,
        default="learned",
        help="normal / laplace: a number, learned (shared) or learned-per-feature",
    )


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The defaults that depend on other arguments, and the combinations that make no sense
    refused (one line)."""
    args.num_particles = args.num_particles or default_num_particles(args.elbo)
    if args.hidden_dims is None and args.network == "mlp":
        args.hidden_dims = list(DEFAULT_HIDDEN_DIMS)
    elif args.hidden_dims is not None and args.network == "conv":
        parser.error("--hidden-dims sets MLP widths; --network conv has fixed layers")
    if args.num_components is not None and args.prior not in ("mixture", "vamp"):
        parser.error(f"--num-components is for --prior mixture or vamp, not {args.prior}")
    if args.prior_scale is not None and args.decoder != "bayesian":
        parser.error(f"--prior-scale is for --decoder bayesian, not {args.decoder}")
    if args.elbo == "iwae" and args.decoder == "bayesian":
        parser.error(
            "--elbo iwae cannot train --decoder bayesian: its N/B scale sits outside the "
            "log-sum-exp, which would count the weights' KL N/B times per step; use trace or "
            "meanfield"
        )


def new_config(args: argparse.Namespace, data: DataSplits) -> dict[str, Any]:
    """The keyword arguments of :func:`pyro_vae.build_vae` for a run's arguments and data:
    plain values, saved in the checkpoint so that the run rebuilds exactly."""
    return {
        "data_dim": data.data_dim,
        "latent_dim": args.latent_dim,
        # The conv networks have fixed layers: hidden widths are the MLP's.
        "hidden_dims": None if args.network == "conv" else list(args.hidden_dims),
        "prior": args.prior,
        "encoder": args.encoder,
        "likelihood": args.likelihood,
        "network": args.network,
        "decoder": args.decoder,
        "image_shape": list(data.image_shape),
        "num_components": args.num_components,
        "flow_depth": args.flow_depth,
        "likelihood_scale": args.likelihood_scale,
        "num_levels": data.num_levels,
        "beta": args.beta,
        # Only a Bayesian decoder has a weight prior.
        **({"prior_scale": args.prior_scale or 1.0} if args.decoder == "bayesian" else {}),
    }


def check_run(run: Run) -> None:
    """A VAE run needs nothing beyond what every run is checked for."""


def prepare(run: Run, args: argparse.Namespace) -> Setup:
    """The run on ``args.device``: the training rows and the evaluation sets, checked
    against the likelihood's support before anything is written. Training rows streamed from
    a ``.npy`` stay there: fit reads them batch by batch (with the DataLoader's workers,
    ``--num-workers``), each rank its own shard under torchrun."""
    vae = run.model.to(args.device)
    assert isinstance(vae, pv.VAE)  # the registry sent a "vae" run here
    data = run.data.to(args.device)
    scored = run.scored_sets(args.device, vae.dtype)
    for split, x in scored.items():
        vae.validate_data(x, f"{SPLIT_NAMES[split]} data")
    loss = make_loss(args.elbo, args.num_particles)
    kl_kind = "closed form" if args.elbo == "meanfield" and pv.has_closed_form_kl(vae) else "MC"
    notes: tuple[str, ...] = ()
    if args.kl_warmup_epochs > args.num_epochs:
        reached = args.beta * args.num_epochs / args.kl_warmup_epochs
        notes = (f"note: the KL warm-up outlasts training: beta reaches only {reached:.3g}",)
    # Rows in memory, or the rows left in the .npy (data.train_tensor() would read them).
    streamed = data.x_train if isinstance(data.x_train, pv.ArrayDataset) else None
    training_data = (data.train_tensor(),) if streamed is None else (streamed,)
    binarize = None  # fit judges rows in memory on all of them
    if streamed is not None:
        # fit would judge streamed rows on their first batch; all of them decide, as in
        # memory (the scan the runner's checks made already).
        binary = bool(getattr(vae.likelihood, "binary_data", False))
        binarize = binary and not data.train_rows_binary()
    return Setup(
        model=vae,
        training_data=training_data,
        loss=loss,
        description=(
            f"{args.dataset}: {len(data.x_train)} train / {data.num_val} validation / "
            f"{len(data.x_test)} test examples of "
            f"{data.data_dim} features; {describe(run.config)}; latent {args.latent_dim}; "
            f"{type(loss).__name__} with {args.num_particles} particle(s), KL by {kl_kind}, "
            f"beta {args.beta}; device {args.device}; writing to {args.out_dir}"
        ),
        scored=scored,
        notes=notes,
        binarize=binarize,
    )


def compile_key(run: Run, setup: Setup, args: argparse.Namespace) -> str:
    """What makes a compile of this run's step the same as another's (the traced graph's
    shapes and constants): the torch version, the model's config, the batch size, the
    number of training rows (the N/B scale), the objective and the device's kind."""
    parts = {
        "torch": torch.__version__,
        "config": run.config,
        "batch_size": args.batch_size,
        "num_data": len(setup.training_data[0]),
        "elbo": args.elbo,
        "num_particles": args.num_particles,
        "device": torch.device(args.device).type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def decide_compile(
    run: Run,
    setup: Setup,
    args: argparse.Namespace,
    steps: int,
    eager_step_seconds: Callable[[], float],
) -> tuple[bool, str]:
    """``--compile auto``: whether the run's ``steps`` steps pay back the compile
    (:func:`pyro_vae.infer.compiled.compile_pays`), from the eager step's time
    (``eager_step_seconds()``, the run's own first steps timed) and the compile's
    (:func:`~pyro_vae.infer.compiled.compile_estimate`: a cache hit, or the known cold
    figure at the machine's load); and why, in words. Eager without timing anything where
    the step cannot compile, on a GPU (the compiled CUDA path is unmeasured) and under
    torchrun (the ranks would have to time alike)."""
    reason = compiled.loss_eager_reason(setup.loss)
    if reason is not None:
        return False, f"{type(setup.loss).__name__} runs eager"
    if torch.device(args.device).type != "cpu":
        return False, "the compiled step on a GPU is unmeasured; --compile on tries it"
    if distributed.launched_by_torchrun():
        return False, "not timed under torchrun; --compile on compiles"
    estimate, source = compiled.compile_estimate(compile_key(run, setup, args))
    pays, why = compiled.compile_pays(eager_step_seconds(), steps, estimate)
    return pays, f"{why}; {source}"


def epoch_metrics(vae: pv.VAE, x: Tensor, prefix: str, num_data: int) -> dict[str, float]:
    """Mean ELBO terms per example. A Bayesian decoder's weight KL is spread over the
    ``num_data`` training examples, as in the training loss, and also reported whole.
    On many processes each rank scores its share of ``x`` and the means are all-reduced."""
    terms = pv.elbo_terms(vae, distributed.rows(x, distributed.ranks()), num_data=num_data)
    row = {
        f"{prefix}_elbo": distributed.mean_over_ranks(terms.elbo),
        f"{prefix}_reconstruction": distributed.mean_over_ranks(terms.reconstruction),
        f"{prefix}_kl": distributed.mean_over_ranks(terms.kl),
    }
    if vae.weight_guide is not None:
        row[f"{prefix}_weight_kl"] = distributed.mean_over_ranks(terms.global_kl[None])
    return row


def split_metrics(setup: Setup, split: str) -> dict[str, float]:
    """The ELBO terms of one evaluation set (``"train"``, ``"val"``, ``"test"``)."""
    vae = setup.model
    assert isinstance(vae, pv.VAE)
    # A Bayesian decoder's weight KL is charged to each of the training rows.
    return epoch_metrics(vae, setup.scored[split], split, len(setup.training_data[0]))


def epoch_row(setup: Setup, args: argparse.Namespace, epoch: int) -> dict[str, Any]:
    """The ELBO terms on the training subset and the validation set (never the test set)."""
    return {split: value for name in ("train", "val") if name in setup.scored
            for split, value in split_metrics(setup, name).items()}  # fmt: skip


def epoch_line(row: dict[str, Any]) -> str:
    return elbo_line(row)


def test_log_likelihood(vae: pv.VAE, x: Tensor, num_particles: int, progress: bool | None) -> float:
    """The mean importance-weighted bound on log p(x) over ``x`` with ``num_particles``
    samples; on many processes each rank scores its share and the mean is all-reduced."""
    group = distributed.ranks()
    local = pv.log_likelihood(vae, distributed.rows(x, group), num_particles, progress=progress)
    return distributed.mean_over_ranks(local)


def finish(
    setup: Setup,
    run: Run,
    args: argparse.Namespace,
    run_dir: RunDirectory,
    metrics: list[dict[str, Any]],
    progress: bool | None,
) -> dict[str, Any]:
    """The test set's score, once, of the weights the runner kept (the ELBO terms and
    log p(x) with K importance samples), and the figures."""
    vae, x_test = setup.model, setup.scored["test"]
    assert isinstance(vae, pv.VAE)
    final: dict[str, Any] = split_metrics(setup, "test")
    if args.num_iw_particles and args.encoder == "delta":
        cli.say("no importance-weighted log p(x) for the delta encoder: q(z|x) has no density")
    elif args.num_iw_particles:
        cli.say(f"scoring log p(x) with K={args.num_iw_particles} importance samples")
        final["test_log_likelihood"] = test_log_likelihood(
            vae, x_test, args.num_iw_particles, progress
        )
        final["num_iw_particles"] = args.num_iw_particles
        if vae.weight_guide is not None:
            final["test_log_likelihood_given"] = "posterior-mean decoder weights"
    if distributed.ranks().is_main:
        write_figures(run_dir.path, vae, x_test, run.data, metrics, setup.kept_epoch)
    return final


def summary(final: dict[str, Any], args: argparse.Namespace) -> str:
    text = f"test ELBO {final['test_elbo']:.2f} nats"
    if "test_log_likelihood" in final:
        given = ", posterior-mean weights" if "test_log_likelihood_given" in final else ""
        text += (
            f", test log p(x) >= {final['test_log_likelihood']:.2f} nats "
            f"(K={args.num_iw_particles}{given})"
        )
    return text


def write_figures(
    directory: Path,
    vae: pv.VAE,
    x_test: Tensor,
    data: DataSplits,
    metrics: list,
    best_epoch: int | None = None,
) -> None:
    shown = x_test[:10]
    binarized = "" if torch.equal(x_test, data.x_test.to(x_test)) else "binarized "
    with torch.no_grad():
        plots.plot_reconstructions(
            shown,
            vae.reconstruct(shown),
            data.image_shape,
            directory / RECONSTRUCTIONS,
            input_label=f"{binarized}test inputs",
        )
        plots.plot_samples(vae.sample(64), data.image_shape, directory / SAMPLES)
        loc, _ = vae.encode(x_test)
        plots.plot_latent_space(loc, data.y_test, data.class_names, directory / LATENT_SPACE)
        if vae.weight_guide is not None:
            mean, std = pv.weight_spread(vae, shown)
            plots.plot_weight_spread(
                shown, mean, std, data.image_shape, directory / WEIGHT_UNCERTAINTY
            )
    plots.plot_loss_curves(metrics, directory / LOSS_CURVES, best_epoch)


def evaluate(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """scripts/evaluate.py's numbers: the test ELBO and its terms, log p(x) with K samples, the
    active units and the KL per dimension, the KL decomposition, and all of it per class."""
    vae, x_test, labels = run.model, run.x_test, run.data.y_test
    assert isinstance(vae, pv.VAE)
    if args.max_examples is not None:
        x_test, labels = x_test[: args.max_examples], labels[: args.max_examples]
    pyro.set_rng_seed(args.seed)
    progress = False if args.no_progress else None
    stage = cli.stage_printer()

    stage(f"ELBO of {len(x_test)} test examples, {args.num_particles} particles")
    terms = pv.elbo_terms(vae, x_test, num_particles=args.num_particles)
    stage(f"log p(x), K={args.num_iw_particles}")
    log_px = pv.log_likelihood(
        vae, x_test, args.num_iw_particles, chunk_size=args.chunk_size, progress=progress
    )
    result = provenance(run, describe(run.config), args.seed)
    result.update(
        num_examples=len(x_test),
        num_particles=args.num_particles,
        num_iw_particles=args.num_iw_particles,
        test_elbo=terms.elbo.mean().item(),
        test_reconstruction=terms.reconstruction.mean().item(),
        test_kl=terms.kl.mean().item(),
        test_log_likelihood=log_px.mean().item(),
    )
    stage("active units and KL per dimension")
    units = pv.active_units(vae, x_test)
    result["active_units"] = units.num_active
    result["latent_dim"] = vae.latent_dim
    result["mean_variance_per_dimension"] = units.variance.tolist()
    try:
        result["kl_per_dimension"] = pv.kl_per_dimension(vae, x_test).mean(0).tolist()
    except ValueError as error:
        result["kl_per_dimension"] = None
        result["kl_per_dimension_note"] = str(error)
    stage("KL decomposition")
    try:
        decomposition = pv.kl_decomposition(
            vae, x_test, num_particles=args.num_particles, progress=progress
        )
        result.update({f"kl_decomposition_{k}": v for k, v in decomposition._asdict().items()})
    except ValueError as error:
        result["kl_decomposition_note"] = str(error)
    result["per_class"] = per_class(
        labels, run.data.class_names, elbo=terms.elbo, kl=terms.kl, log_likelihood=log_px
    )
    stage("done")
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['run']} (epoch {result['epoch']}, {result['selected_by']}; {result['model']}), "
        f"{result['num_examples']} test examples, nats per example",
        f"  ELBO {result['test_elbo']:.2f} = reconstruction {result['test_reconstruction']:.2f}"
        f" - KL {result['test_kl']:.2f}",
        f"  log p(x) >= {result['test_log_likelihood']:.2f} (K={result['num_iw_particles']})",
        f"  active units {result['active_units']} of {result['latent_dim']} "
        "(Cov_x E_q[z_i] > 0.01: the mean moves with x)",
    ]
    if result.get("kl_per_dimension") is not None:
        per_dim = ", ".join(f"{v:.2f}" for v in result["kl_per_dimension"])
        lines.append(f"  KL per dimension: {per_dim}")
    if "kl_decomposition_mutual_information" in result:
        lines.append(
            f"  average KL {result['kl_decomposition_average_kl']:.2f} = I(x;z) "
            f"{result['kl_decomposition_mutual_information']:.2f} + KL(q(z)||p(z)) "
            f"{result['kl_decomposition_marginal_kl']:.2f}"
        )
    lines.append(f"  {'class':<14}{'count':>7}{'ELBO':>10}{'KL':>8}{'log p(x)':>10}")
    for name, row in result["per_class"].items():
        lines.append(
            f"  {name:<14}{row['count']:>7}{row['elbo']:>10.2f}{row['kl']:>8.2f}"
            f"{row['log_likelihood']:>10.2f}"
        )
    return "\n".join(lines)


def explain(run: Run, out_dir: Path, num_particles: int) -> Path:
    """The report of μ(x) and σ(x) on the run's own test set (:func:`pyro_vae.explain`)."""
    return explain_on(run, run.x_test, out_dir, num_particles=num_particles)
