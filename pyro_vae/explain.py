"""The explain report: what μ(x) and σ(x) are, answered with measurements on a trained model.

:func:`explain` writes ``report.md`` and its figures into a directory, one section per question
people ask about VAEs, each answer backed by numbers computed there and then. For the other
models it writes their own report (:func:`explain_m2`, :func:`explain_cvae`): the μ/σ sections
that apply to their z encoder, and what only they have (q(y | x); the spread of completions).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from pyro import poutine
from torch import Tensor, nn
from torch.distributions import kl_divergence

from pyro_vae import explain_gaps, explain_plots, plots
from pyro_vae._checks import check_positive_int
from pyro_vae._files import atomic_write
from pyro_vae._markdown import table as _table
from pyro_vae._sites import site_distribution, site_value
from pyro_vae.components.distributions import is_diagonal_normal
from pyro_vae.components.networks import output_layer
from pyro_vae.components.priors import StandardNormalPrior
from pyro_vae.infer.estimators import (
    active_units,
    kl_decomposition,
    kl_per_dimension,
    weight_spread,
)
from pyro_vae.models.cvae import ConditionalVAE
from pyro_vae.models.cvae_estimators import sample_spread
from pyro_vae.models.m2 import M2
from pyro_vae.models.vae import VAE

# The models whose z encoder sections 1 and 2 read: each has latent_dim and an encoder.
Encoded = VAE | M2 | ConditionalVAE

SHOWN = 5  # test inputs in the per-example tables
# Every file explain() may write (which depend on the model), so that a later report can
# replace an earlier, or interrupted, one without touching anything else in its directory.
OUTPUT_FILES = (
    "report.md",
    "point_cloud.png",
    "aggregate_posterior.png",
    "prior_samples.png",
    "traversal.png",
    "kl_per_dimension.png",
    "weight_uncertainty.png",
    "confusion.png",
    explain_gaps.FIGURE,
)
# How every report explain writes begins: what tells its own report.md from one a user wrote.
REPORT_HEADING = "# What μ and σ"
# Draws per pass in sections 3 and 4: bounds their memory for any num_particles (the moments are
# merged across passes; the point-cloud figure shows the first pass's draws).
DRAW_CHUNK = 4096


@torch.no_grad()
def explain(
    vae: VAE | M2 | ConditionalVAE,
    x: Tensor,
    labels: Tensor,
    image_shape: Sequence[int],
    class_names: Sequence[str],
    out_dir: str | os.PathLike,
    num_particles: int = 2000,
    *,
    condition: Tensor | None = None,
) -> Path:
    """Write ``out_dir/report.md`` and its PNG figures for ``vae`` on the test data ``x``
    (in the likelihood's support) with their ``labels``; return the report's path.

    The sections need a diagonal Normal encoder (what μ and σ mean); the KL section also a
    standard normal prior. Where a model lacks them, the section says so instead.

    An :class:`~pyro_vae.models.m2.M2` gets :func:`explain_m2`'s report (which draws
    nothing: ``image_shape`` and ``num_particles`` are not used for it); a
    :class:`~pyro_vae.models.cvae.ConditionalVAE` :func:`explain_cvae`'s, with ``x`` the
    missing part and ``condition`` the given part of each test input (``labels``,
    ``image_shape`` and ``class_names`` are not used for it).
    """
    if isinstance(vae, M2):
        return explain_m2(vae, x, labels, class_names, out_dir)
    if isinstance(vae, ConditionalVAE):
        if condition is None:
            raise ValueError("explain of a ConditionalVAE needs condition= (the given parts)")
        return explain_cvae(vae, x, condition, out_dir, num_particles=num_particles)
    if condition is not None:
        raise ValueError("condition= is for a ConditionalVAE; this model is a VAE")
    vae.validate_data(x, "test data")
    check_positive_int("num_particles", num_particles)
    if len(x) < SHOWN:
        raise ValueError(f"explain needs at least {SHOWN} test examples, got {len(x)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    diagonal = is_diagonal_normal(vae.encoder(x[:2]))
    loc, scale = vae.encode(x)
    # Average KL per latent dimension: sections 5 and 6 both use it.
    kl = kl_per_dimension(vae, x).mean(0) if diagonal else None
    sections = [
        _per_example(vae, x, loc, scale),
        _read_outs(vae, x, loc)
        if diagonal and _has_linear_read_out(vae.encoder)
        else _not_applicable(2, "What each μ_i is"),
        _point_cloud(vae, x[:1], num_particles, out),
        _kl_three_ways(vae, x, num_particles)
        if diagonal and isinstance(vae.prior, StandardNormalPrior)
        else _not_applicable(4, "The KL term"),
        _why_standard_normal(vae, x, kl, labels, image_shape, class_names, out),
        _active_units(vae, x, kl, out) if kl is not None else _not_applicable(6, "Active units"),
    ]
    if vae.weight_guide is not None:
        sections.append(_weight_uncertainty(vae, x, image_shape, out))
    sections.append(explain_gaps.gaps_section(vae, x, len(sections) + 1, out))
    report = out / "report.md"
    header = (
        f"{REPORT_HEADING} really are: measured on this model\n\n"
        f"{len(x)} test examples of {vae.data_dim} features; latent size {vae.latent_dim}; "
        f"prior {type(vae.prior).__name__}, encoder {type(vae.encoder).__name__}, "
        f"likelihood {type(vae.likelihood).__name__}. Every number below was computed when "
        "this report was written. Test inputs and latent dimensions are numbered from 1, "
        "here and in the figures.\n"
    )
    with atomic_write(report, "w") as file:
        file.write("\n".join([header, *sections]))
    return report


@torch.no_grad()
def explain_m2(
    m2: M2,
    x: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    out_dir: str | os.PathLike,
) -> Path:
    """Write ``out_dir/report.md`` for a trained M2 on the test data ``x`` with their true
    ``labels`` (every one known): q(z | x, y)'s μ and σ at the most probable y (sections 1
    and 2 of the VAE's report), the confusion matrix of q(y | x) and its entropy, with a
    figure ``confusion.png``; return the report's path."""
    m2.validate_data(x, "test data")
    labels = m2.check_labels(labels, len(x)).to(x.device)
    if bool((labels < 0).any()):
        raise ValueError("explain_m2 needs every test label known (no UNLABELLED rows)")
    if len(class_names) != m2.num_labels:
        raise ValueError(
            f"class_names has {len(class_names)} names, the M2 {m2.num_labels} classes"
        )
    if len(x) < SHOWN:
        raise ValueError(f"explain needs at least {SHOWN} test examples, got {len(x)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predicted = m2.classify(x)
    encoder_input = m2._encoder_input(x, predicted)
    loc, scale = m2.encode(x, predicted)
    note = (
        "*In this M2, z's encoder is q(z | x, y): its μ and σ below are read at the most "
        "probable y of q(y | x) for each input (not its true label).*\n\n"
    )
    diagonal = is_diagonal_normal(m2.encoder(encoder_input[:2]))
    sections = [
        _with_note(_per_example(m2, x, loc, scale), note),
        _with_note(_read_outs(m2, encoder_input, loc), note)
        if diagonal and _has_linear_read_out(m2.encoder)
        else _not_applicable(2, "What each μ_i is"),
        _confusion(m2, x, labels, predicted, class_names, out),
        _label_entropy(m2, x, labels, class_names),
    ]
    gaps_note = (
        "*In this M2, q(z | x, y) is measured at the most probable y of q(y | x) for each input, "
        "and its ELBOs and log p(x | y) are those of p(x | y, z) p(z) at that y.*\n\n"
    )
    view = explain_gaps.M2View(m2)
    rows = view.rows(x, predicted)
    sections.append(explain_gaps.gaps_section(view, rows, len(sections) + 1, out, gaps_note))
    header = (
        f"{REPORT_HEADING}, and q(y | x), are: measured on this M2\n\n"
        f"{len(x)} test examples of {m2.data_dim} features, {m2.num_labels} classes; latent "
        f"size {m2.latent_dim}; encoder {type(m2.encoder).__name__}, classifier "
        f"{type(m2.classifier).__name__}, likelihood {type(m2.likelihood).__name__}. Every "
        "number below was computed when this report was written. Test inputs and latent "
        "dimensions are numbered from 1. The VAE report's sections on the reparameterization, "
        "the KL and active units read a guide with one site z and are not repeated here.\n"
    )
    return _write(out, header, sections)


@torch.no_grad()
def explain_cvae(
    cvae: ConditionalVAE,
    x: Tensor,
    condition: Tensor,
    out_dir: str | os.PathLike,
    num_particles: int = 100,
) -> Path:
    """Write ``out_dir/report.md`` for a trained CVAE on the missing parts ``x`` of its test
    inputs and their given parts ``condition``: q(z | x, c)'s μ and σ (sections 1 and 2 of
    the VAE's report) and the spread of completions per condition
    (:func:`~pyro_vae.models.cvae_estimators.sample_spread` at ``num_particles`` draws); return the
    report's path."""
    cvae.validate_data(x, "test data")
    condition = cvae.validate_condition(condition, len(x))
    if check_positive_int("num_particles", num_particles) < 2:
        raise ValueError("explain_cvae needs num_particles >= 2 for a standard deviation")
    if len(x) < SHOWN:
        raise ValueError(f"explain needs at least {SHOWN} test examples, got {len(x)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder_input = torch.cat([x, condition], -1)
    posterior = cvae.encoder(encoder_input)
    loc, scale = posterior.mean, posterior.stddev
    note = (
        "*In this CVAE, z's encoder is q(z | x, c): it reads the missing part x together with "
        "the given part c, and its μ and σ below are those of each test input's (x, c).*\n\n"
    )
    diagonal = is_diagonal_normal(posterior)
    sections = [
        _with_note(_per_example(cvae, x, loc, scale), note),
        _with_note(_read_outs(cvae, encoder_input, loc), note)
        if diagonal and _has_linear_read_out(cvae.encoder)
        else _not_applicable(2, "What each μ_i is"),
        _spread(cvae, x, condition, num_particles),
    ]
    gaps_note = (
        "*In this CVAE, q(z | x, c) is measured against the best Gaussian of each input "
        "(x, c), and its ELBOs and log p(x | c) are those of p(z | c) p(x | z, c).*\n\n"
    )
    view = explain_gaps.CVAEView(cvae)
    sections.append(
        explain_gaps.gaps_section(view, encoder_input, len(sections) + 1, out, gaps_note)
    )
    header = (
        f"{REPORT_HEADING} are, and how much completions vary: measured on this CVAE\n\n"
        f"{len(x)} test inputs, each {cvae.condition_dim} given and {cvae.data_dim} missing "
        f"features; latent size {cvae.latent_dim}; prior {type(cvae.prior).__name__}, encoder "
        f"{type(cvae.encoder).__name__}, likelihood {type(cvae.likelihood).__name__}. Every "
        "number below was computed when this report was written. Test inputs and latent "
        "dimensions are numbered from 1. The VAE report's other sections (the "
        "reparameterization cloud, the KL to N(0, I), the aggregate posterior, active units) "
        "read a VAE's guide and its prior N(0, I); this prior p(z | c) depends on the "
        "condition, so they are not repeated here.\n"
    )
    return _write(out, header, sections)


def _write(out: Path, header: str, sections: Sequence[str]) -> Path:
    report = out / "report.md"
    with atomic_write(report, "w") as file:
        file.write("\n".join([header, *sections]))
    return report


def _with_note(section: str, note: str) -> str:
    """The section with ``note`` as its first paragraph, after its title."""
    title, body = section.split("\n\n", 1)
    return f"{title}\n\n{note}{body}"


def _confusion(
    m2: M2,
    x: Tensor,
    labels: Tensor,
    predicted: Tensor,
    class_names: Sequence[str],
    out: Path,
) -> str:
    k = m2.num_labels
    counts = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k).cpu()
    _plot_confusion(counts, class_names, out / "confusion.png")
    rows = [
        [f"true {class_names[i]}", *(int(v) for v in counts[i]), float(counts[i, i] / n)]
        if (n := int(counts[i].sum())) > 0
        else [f"true {class_names[i]}", *(int(v) for v in counts[i]), "no test rows"]
        for i in range(k)
    ]
    accuracy = float(counts.diagonal().sum()) / len(x)
    return (
        "## 3. What does q(y | x) get right?\n\n"
        f"q(y | x) is M2's classifier. Its most probable class is right for "
        f"**{accuracy:.3f}** of the {len(x)} test inputs (chance: {1 / k:.3f}). Each row of "
        "the confusion matrix is a true class; each column the class q(y | x) gives most "
        "probability; the last column the fraction of that row classified right:\n\n"
        + _table(["", *(f"→ {name}" for name in class_names), "right"], rows)
        + "\n![confusion matrix](confusion.png)\n"
    )


def _plot_confusion(counts: Tensor, class_names: Sequence[str], path: Path) -> None:
    fig = plots.new_figure(figsize=(1 + 0.5 * len(class_names), 1 + 0.5 * len(class_names)))
    ax = fig.add_subplot()
    ax.imshow(counts.numpy(), cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, [str(name) for name in class_names], rotation=90)
    ax.set_yticks(ticks, [str(name) for name in class_names])
    ax.set_xlabel("most probable under q(y | x)")
    ax.set_ylabel("true class")
    plots.save_figure(fig, path)


def _label_entropy(m2: M2, x: Tensor, labels: Tensor, class_names: Sequence[str]) -> str:
    entropy = m2.label_posterior(x).entropy()
    k = m2.num_labels
    rows = [
        [
            str(class_names[i]),
            int((labels == i).sum()),
            float(entropy[labels == i].mean()) if bool((labels == i).any()) else "no test rows",
        ]
        for i in range(k)
    ]
    return (
        "## 4. How sure is q(y | x)?\n\n"
        "The entropy H[q(y | x)] = −Σ_y q(y | x) log q(y | x) is 0 nats when the classifier "
        f"puts all its probability on one class and log K = {math.log(k):.3f} nats when it "
        "cannot tell the K classes apart. For an unlabelled input, M2's bound sums over y with "
        "these weights, so a high entropy means the decoder is trained on several guesses of "
        f"the class at once. Mean over the {len(x)} test inputs: **{float(entropy.mean()):.3f}** "
        f"nats (from {float(entropy.min()):.3f} to {float(entropy.max()):.3f}); per true "
        "class:\n\n" + _table(["true class", "test inputs", "mean entropy (nats)"], rows)
    )


def _spread(cvae: ConditionalVAE, x: Tensor, condition: Tensor, num_particles: int) -> str:
    spread = sample_spread(cvae, condition, num_particles)
    rows = [[f"test #{n + 1}", f"{float(spread[n]):.4f}"] for n in range(SHOWN)]
    return (
        "## 3. How much do the completions of one condition vary?\n\n"
        "Given the part c of an input, the CVAE completes the missing part by decoding "
        f"z ~ p(z | c). For each test input, {num_particles} draws of z give {num_particles} "
        "completions (the likelihood's mean); the standard deviation over them, averaged over "
        f"the {cvae.data_dim} missing features, is the spread. 0 would mean a deterministic "
        "map from c to one completion, as a plain regression network gives; a larger spread "
        "means the model keeps several completions of c in play, which it should where c "
        "leaves the missing part ambiguous.\n\n"
        + _table(["input", "spread of completions"], rows)
        + f"\nOver the {len(x)} test inputs: mean **{float(spread.mean()):.4f}**, from "
        f"{float(spread.min()):.4f} to {float(spread.max()):.4f}; the standard deviation of "
        f"the missing features across the test set itself is {float(x.std(0).mean()):.4f}.\n"
    )


def _has_linear_read_out(encoder: nn.Module) -> bool:
    """Whether the encoder reads μ off its network's last linear layer (the shipped ones do)."""
    try:
        output_layer(encoder.net)
    except (AttributeError, TypeError, IndexError):
        return False
    return True


def _not_applicable(number: int, title: str) -> str:
    return (
        f"## {number}. {title}\n\nNot measured: this section needs a diagonal Normal encoder "
        "that reads μ off a linear layer (and, for the KL, a standard normal prior); this "
        "model has another.\n"
    )


def _per_example(vae: Encoded, x: Tensor, loc: Tensor, scale: Tensor) -> str:
    shown_dims = min(3, vae.latent_dim)
    rows = []
    for n in range(SHOWN):
        rows.append(
            [f"test #{n + 1}", float(x[n].mean()), float(x[n].std())]
            + [float(loc[n, i]) for i in range(shown_dims)]
            + [float(scale[n, i]) for i in range(shown_dims)]
        )
    rows.append(["whole test set", float(x.mean()), float(x.std())] + [""] * (2 * shown_dims))
    header = ["input", "pixel mean", "pixel std"]
    header += [f"μ_{i + 1}(x)" for i in range(shown_dims)]
    header += [f"σ_{i + 1}(x)" for i in range(shown_dims)]
    num_parameters = sum(p.numel() for p in vae.parameters())
    encoder_parameters = sum(p.numel() for p in vae.encoder.parameters())
    spread_loc = loc.std(0)
    spread_scale = scale.std(0)
    return (
        "## 1. A dataset has one mean and one standard deviation: how does each example get "
        "its own μ and σ?\n\n"
        "μ(x) and σ(x) are not statistics of the data. They are the two outputs of the encoder "
        "network for one input x: the mean and standard deviation of q(z | x), a distribution "
        "over the latent code of *that* x. Different inputs give different outputs:\n\n"
        + _table(header, rows)
        + f"\nAcross the {len(x)} test inputs, μ_i(x) varies with a standard deviation of "
        f"{float(spread_loc.min()):.3f} to {float(spread_loc.max()):.3f} (over dimensions i) "
        f"and σ_i(x) with {float(spread_scale.min()):.4f} to {float(spread_scale.max()):.4f}. "
        f"The pixel statistics of the dataset are two numbers; the encoder produced "
        f"{2 * loc.numel()} μ and σ values here, {2 * vae.latent_dim} per input.\n\n"
        f"**Are μ and σ learned parameters?** No. The model has {num_parameters} learned "
        f"parameters ({encoder_parameters} in the encoder), all weights and biases of the "
        f"networks (and of the prior or likelihood, if learnable); none of them is a μ or a σ "
        f"of any example. Training changes the weights, and so the function x ↦ (μ(x), σ(x)).\n"
    )


def _read_outs(vae: Encoded, encoder_input: Tensor, loc: Tensor) -> str:
    layer = output_layer(vae.encoder.net)
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        vae.encoder(encoder_input)
    finally:
        handle.remove()
    hidden = captured[0]  # the last hidden layer h(x), (N, H)
    d = vae.latent_dim
    weight, bias = layer.weight[:d], layer.bias[:d]
    rebuilt = hidden @ weight.T + bias
    error = float((rebuilt - loc).abs().max())
    shown_dims = min(3, d)
    rows = [
        [f"test #{n + 1}", float(hidden[n].mean())] + [float(loc[n, i]) for i in range(shown_dims)]
        for n in range(SHOWN)
    ]
    header = ["input", "mean of h(x)"] + [f"μ_{i + 1}(x)" for i in range(shown_dims)]
    centred_h = hidden.mean(1) - hidden.mean()
    correlations = []
    for i in range(shown_dims):
        centred = loc[:, i] - loc[:, i].mean()
        correlations.append(
            float((centred_h * centred).sum() / (centred_h.norm() * centred.norm() + 1e-12))
        )
    cosines = torch.nn.functional.cosine_similarity(weight[:, None], weight[None], dim=-1)
    off_diagonal = cosines[~torch.eye(d, dtype=torch.bool, device=cosines.device)]
    return (
        "## 2. Do μ_1 and μ_2 both compute the mean of the hidden vector?\n\n"
        f"No. The encoder's last hidden layer h(x) has {hidden.shape[1]} units. Each μ_i(x) is "
        "its own learned read-out of it, μ_i(x) = w_i · h(x) + b_i, with a different weight "
        f"vector w_i for every i. Rebuilding μ from h with those weights matches the encoder "
        f"to {error:.1e}.\n\n"
        + _table(header, rows)
        + "\nThe correlation, across the test set, between the mean activation of h(x) and "
        f"μ_i(x) is {', '.join(f'{c:+.2f}' for c in correlations)} for i = 1..{shown_dims}. "
        "If the μ_i were means of h, each would be ±1. The read-out vectors w_i point in "
        f"different directions: their pairwise cosines lie between "
        f"{float(off_diagonal.min()):+.2f} and {float(off_diagonal.max()):+.2f}"
        + (" (one latent dimension: no pairs)" if d == 1 else "")
        + ".\n"
    )


def _point_cloud(vae: VAE, x0: Tensor, num_draws: int, out: Path) -> str:
    # The draws come from the guide itself, as SVI makes them: z ~ q(z | x) via Pyro.
    moments = _Moments()
    shown: Tensor | None = None
    for size in _chunk_sizes(num_draws):
        trace = poutine.trace(vae.guide).get_trace(x0.expand(size, -1))
        z = site_value(trace.nodes["z"])
        shown = z if shown is None else shown
        moments.add(z)
    assert shown is not None  # num_draws >= 1, checked by explain
    loc, scale = vae.encode(x0)
    loc, scale = loc[0], scale[0]
    mean, std = moments.mean, moments.std
    se_mean = std / math.sqrt(num_draws)
    se_std = std / math.sqrt(2 * (num_draws - 1))
    dims = (0, 1) if vae.latent_dim > 1 else (0, 0)
    explain_plots.plot_point_cloud(shown, loc, scale, dims, out / "point_cloud.png")
    rows = [
        [
            f"z_{i + 1}",
            float(loc[i]),
            float(mean[i]),
            float(se_mean[i]),
            float(scale[i]),
            float(std[i]),
            float(se_std[i]),
        ]
        for i in range(min(4, vae.latent_dim))
    ]
    within = bool(
        ((mean - loc).abs() < 4 * se_mean).all() and ((std - scale).abs() < 4 * se_std).all()
    )
    return (
        "## 3. The reparameterization: z = μ(x) + σ(x)·ε\n\n"
        f"For test input #1, {num_draws} draws of z from the guide (Pyro's sample site `z`). "
        "Each is z = μ(x) + σ(x)·ε with ε ~ N(0, I), so the cloud has mean μ(x) and standard "
        "deviation σ(x), and gradients reach μ and σ through z:\n\n"
        + _table(["dim", "μ(x)", "mean of z", "± SE", "σ(x)", "std of z", "± SE"], rows)
        + f"\nEmpirical moments within 4 standard errors of μ(x), σ(x) in every dimension: "
        f"{'yes' if within else 'no'}.\n\n![point cloud](point_cloud.png)\n"
    )


def _chunk_sizes(num_draws: int) -> Iterator[int]:
    """The sizes of the passes over ``num_draws`` draws, one at a time: never a list of them
    (``--num-particles 1e20`` would make one of 2.4e16)."""
    for start in range(0, num_draws, DRAW_CHUNK):
        yield min(DRAW_CHUNK, num_draws - start)


class _Moments:
    """The mean and standard deviation over the first dimension of tensors added one chunk at
    a time (Chan et al.'s pairwise merge), without keeping the chunks: for a single chunk, its
    own mean and standard deviation."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = torch.zeros(())
        self._squares = torch.zeros(())  # the sum of squared deviations from the mean

    def add(self, values: Tensor) -> None:
        size = len(values)
        chunk_mean = values.mean(0)
        delta = chunk_mean - self.mean
        total = self.count + size
        self.mean = self.mean + delta * (size / total)
        self._squares = (
            self._squares
            + (values - chunk_mean).pow(2).sum(0)
            + delta.pow(2) * (self.count * size / total)
        )
        self.count = total

    @property
    def std(self) -> Tensor:
        return (self._squares / (self.count - 1)).sqrt()


def _kl_three_ways(vae: VAE, x: Tensor, num_draws: int) -> str:
    rows = []
    for n in range(SHOWN):
        xn = x[n : n + 1]
        loc, scale = vae.encode(xn)
        log_var = 2 * scale.log()
        formula = float(0.5 * (loc.pow(2) + log_var.exp() - 1 - log_var).sum())
        q = vae.encoder(xn)
        torch_kl = float(kl_divergence(q, vae.prior().expand(q.batch_shape)))
        draws = _Moments()
        for size in _chunk_sizes(num_draws):
            guide = poutine.trace(vae.guide).get_trace(xn.expand(size, -1))
            model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(
                xn.expand(size, -1)
            )
            z_guide, z_model = guide.nodes["z"], model.nodes["z"]
            log_q = site_distribution(z_guide).log_prob(site_value(z_guide))
            log_p = site_distribution(z_model).log_prob(site_value(z_model))
            draws.add(log_q - log_p)
        # The wrong formulas people write: log(0.5σ) as the noise scale, and log σ where the
        # formula needs log σ², averaged instead of summed over dimensions.
        wrong_std = float((0.5 * scale).log().abs().mean())
        log_sigma = scale.log()
        wrong_kl = float(-0.5 * (1 + log_sigma - loc.pow(2) - log_sigma.exp()).mean())
        rows.append(
            [
                f"test #{n + 1}",
                formula,
                torch_kl,
                float(draws.mean),
                float(draws.std / math.sqrt(num_draws)),
                wrong_kl,
                float(scale.mean()),
                wrong_std,
            ]
        )
    return (
        "## 4. What is the KL term the divergence between?\n\n"
        "Not between matrices of μ and σ: for each example it is KL(q(z | x) ‖ p(z)), between "
        "the encoder's distribution N(μ(x), diag σ(x)²) for that x and the prior N(0, I). The "
        "loss averages it over examples. Three ways to compute it agree: the formula "
        "½ Σ_i (μ_i² + σ_i² − 1 − log σ_i²) written with log σ²; torch's `kl_divergence`; and "
        f"Pyro's Monte-Carlo estimate, log q(z|x) − log p(z) at {num_draws} draws from the "
        "traces (what `Trace_ELBO` uses), with its standard error. The last columns show what "
        "two common mistakes give: `kl = -0.5*mean(1 + log_sigma - mu^2 - exp(log_sigma))` "
        "with log σ where log σ² belongs (and a mean where the sum belongs), and "
        "`z = mu + log(0.5*sigma)*eps`, whose noise scale |log(0.5σ)| is nothing like σ:\n\n"
        + _table(
            [
                "input",
                "formula (log σ²)",
                "torch",
                "Pyro MC",
                "± SE",
                "wrong KL",
                "mean σ",
                "mean abs(log 0.5σ)",
            ],
            rows,
        )
    )


def _why_standard_normal(
    vae: VAE,
    x: Tensor,
    kl: Tensor | None,
    labels: Tensor,
    image_shape: Sequence[int],
    class_names: Sequence[str],
    out: Path,
) -> str:
    z = vae.encoder(x).sample()  # one draw per input: a sample of the aggregate posterior
    mean, covariance = z.mean(0), torch.cov(z.T).reshape(vae.latent_dim, vae.latent_dim)
    variance = covariance.diagonal()
    off = covariance - torch.diag(variance)
    dims = (0, 1) if vae.latent_dim > 1 else (0, 0)
    if vae.latent_dim > 1 and kl is not None:
        top = torch.argsort(kl, descending=True)[:2]
        dims = (int(top[0]), int(top[1]))
    explain_plots.plot_aggregate_posterior(
        z,
        labels,
        class_names,
        dims,
        out / "aggregate_posterior.png",
        standard_prior=isinstance(vae.prior, StandardNormalPrior),
    )
    plots.plot_samples(vae.sample(64), image_shape, out / "prior_samples.png")
    # The dimensions that carry the most KL change the image most; others may have collapsed.
    ranked = torch.argsort(kl, descending=True).tolist() if kl is not None else None
    traversal_dims = (ranked or list(range(vae.latent_dim)))[:5]
    values = torch.linspace(-2.5, 2.5, 9, dtype=x.dtype, device=x.device)
    codes = torch.zeros(
        len(traversal_dims), len(values), vae.latent_dim, dtype=x.dtype, device=x.device
    )
    for r, d in enumerate(traversal_dims):
        codes[r, :, d] = values
    decoded = vae.likelihood(vae.decoder(codes.reshape(-1, vae.latent_dim))).mean
    explain_plots.plot_traversal(
        decoded, traversal_dims, values, image_shape, out / "traversal.png"
    )
    try:
        parts = kl_decomposition(vae, x)
        closed_form = f"; in closed form {float(kl.sum()):.3f}" if kl is not None else ""
        decomposition = (
            "Three KL averages measure different things; the first is the sum of the other "
            "two (Hoffman & Johnson 2016), each a Monte-Carlo estimate ± its standard error:\n\n"
            f"- **Average KL term** (1/N) Σ_n KL(q(z | x_n) ‖ p(z)) = {parts.average_kl:.3f} ± "
            f"{parts.average_kl_se:.3f} nats{closed_form}: the KL of the ELBO, how far each "
            "input's own posterior is from the prior, averaged over the test inputs.\n"
            f"- **Mutual information** I(x; z) = {parts.mutual_information:.3f} ± "
            f"{parts.mutual_information_se:.3f} nats: how much the code tells the inputs "
            f"apart (at most log N = {math.log(len(x)):.2f} with this estimator), the price of "
            "an informative code, which no prior can remove.\n"
            f"- **Marginal KL** KL(q(z) ‖ p(z)) = {parts.marginal_kl:.3f} ± "
            f"{parts.marginal_kl_se:.3f} nats: how far the aggregate posterior, the mixture of "
            "all the inputs' posteriors, is from the prior, the only part a better prior could "
            "remove.\n\n"
        )
    except ValueError as error:
        decomposition = f"The KL decomposition is not available here: {error}.\n\n"
    return (
        "## 5. Why a Gaussian, and why keep z close to N(0, I)?\n\n"
        "Because new data are made by decoding z ~ p(z). The decoder is trained only on codes "
        "from q(z | x), so the prior must cover where those codes are: the KL term pulls each "
        "q(z | x) towards N(0, I), and so the aggregate posterior q(z) = (1/N) Σ_n q(z | x_n) "
        "towards the prior. On this model, one draw per test input gives q(z) a mean of "
        f"{float(mean.abs().max()):.3f} at most in absolute value (prior: 0), variances from "
        f"{float(variance.min()):.3f} to {float(variance.max()):.3f} (prior: 1), and "
        f"covariances up to {float(off.abs().max()) if vae.latent_dim > 1 else 0.0:.3f} "
        "(prior: 0).\n\n" + decomposition + "![aggregate posterior](aggregate_posterior.png)\n\n"
        "Decoded draws from the prior, and a traversal of the latent dimensions with the most "
        "KL:\n\n"
        "![prior samples](prior_samples.png)\n\n![traversal](traversal.png)\n"
    )


def _active_units(vae: VAE, x: Tensor, kl: Tensor, out: Path) -> str:
    units = active_units(vae, x)
    explain_plots.plot_kl_per_dimension(
        kl, units.variance, units.threshold, out / "kl_per_dimension.png"
    )
    rows = [
        [
            f"z_{i + 1}",
            float(units.variance[i]),
            float(kl[i]),
            "active" if units.variance[i] > units.threshold else "collapsed",
        ]
        for i in range(vae.latent_dim)
    ]
    return (
        "## 6. Which dimensions carry information?\n\n"
        f"Active units (Burda et al. 2016): **{units.num_active} of {vae.latent_dim}**. "
        "Dimension i counts as active when the variance over the test inputs of its posterior "
        f"mean, Cov_x(E_q[z_i | x]), exceeds {units.threshold:g} (the prior's variance is 1). "
        "That says the mean moves with x, which is not the same as carrying information: a "
        "mean that moves by 0.1 (variance 0.01) while σ_i stays near 1 leaves q(z_i | x) close "
        "to the prior, and the decoder can read little from z_i. What z_i carries is bounded "
        "by its average KL in the table below (the information I(x; z_i) is at most that KL): "
        "near 0 nats means next to nothing, whatever the count says. A collapsed dimension has "
        "a mean that ignores x and a posterior equal to the prior, so its KL is near 0 and the "
        "decoder cannot use it. Summed over the dimensions, the KL column is the average KL "
        "term of section 5.\n\n"
        + _table(["dimension", "Cov_x(E_q[z_i])", "average KL (nats)", ""], rows)
        + "\n![KL per dimension](kl_per_dimension.png)\n"
    )


def _weight_uncertainty(vae: VAE, x: Tensor, image_shape: Sequence[int], out: Path) -> str:
    num_draws = 100
    mean, std = weight_spread(vae, x, num_draws)
    plots.plot_weight_spread(x, mean, std, image_shape, out / "weight_uncertainty.png")
    per_example = std.mean(1)
    return (
        "## 7. What the decoder's weight uncertainty does\n\n"
        "This decoder's weights are random too: q(w) is a Normal per weight. With z = μ(x) "
        f"fixed, {num_draws} draws of the weights give {num_draws} reconstructions of each "
        "input; their pixel-wise standard deviation is the uncertainty the weights alone "
        "put into the output.\n\n"
        f"Average pixel-wise std over the {len(x)} test examples: **{float(std.mean()):.4f}** "
        f"(per example from {float(per_example.min()):.4f} to {float(per_example.max()):.4f}); "
        f"largest single pixel: {float(std.max()):.4f}.\n\n"
        "![weight uncertainty](weight_uncertainty.png)\n"
    )
