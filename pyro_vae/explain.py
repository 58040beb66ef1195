"""The explain report: what μ(x) and σ(x) are, answered with measurements on a trained model.

:func:`explain` writes ``report.md`` and its figures into a directory, one section per question
people ask about VAEs, each answer backed by numbers computed there and then.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from pyro import poutine
from torch import Tensor, nn
from torch.distributions import kl_divergence

from pyro_vae import plots
from pyro_vae._checks import check_positive_int
from pyro_vae._files import atomic_write
from pyro_vae._sites import site_distribution, site_value
from pyro_vae.distributions import is_diagonal_normal
from pyro_vae.evaluate import active_units, kl_decomposition, kl_per_dimension, weight_spread
from pyro_vae.model import VAE
from pyro_vae.networks import output_layer
from pyro_vae.priors import StandardNormalPrior

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
)
# Draws per pass in sections 3 and 4: bounds their memory for any num_particles (the moments are
# merged across passes; the point-cloud figure shows the first pass's draws).
DRAW_CHUNK = 4096


@torch.no_grad()
def explain(
    vae: VAE,
    x: Tensor,
    labels: Tensor,
    image_shape: Sequence[int],
    class_names: Sequence[str],
    out_dir: str | os.PathLike,
    num_particles: int = 2000,
) -> Path:
    """Write ``out_dir/report.md`` and its PNG figures for ``vae`` on the test data ``x``
    (in the likelihood's support) with their ``labels``; return the report's path.

    The sections need a diagonal Normal encoder (what μ and σ mean); the KL section also a
    standard normal prior. Where a model lacks them, the section says so instead.
    """
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
    report = out / "report.md"
    header = (
        f"# What μ and σ really are: measured on this model\n\n"
        f"{len(x)} test examples of {vae.data_dim} features; latent size {vae.latent_dim}; "
        f"prior {type(vae.prior).__name__}, encoder {type(vae.encoder).__name__}, "
        f"likelihood {type(vae.likelihood).__name__}. Every number below was computed when "
        "this report was written. Test inputs and latent dimensions are numbered from 1, "
        "here and in the figures.\n"
    )
    with atomic_write(report, "w") as file:
        file.write("\n".join([header, *sections]))
    return report


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


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _per_example(vae: VAE, x: Tensor, loc: Tensor, scale: Tensor) -> str:
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
        f"**Are μ and σ learnt parameters?** No. The model has {num_parameters} learnt "
        f"parameters ({encoder_parameters} in the encoder), all weights and biases of the "
        f"networks (and of the prior or likelihood, if learnable); none of them is a μ or a σ "
        f"of any example. Training changes the weights, and so the function x ↦ (μ(x), σ(x)).\n"
    )


def _read_outs(vae: VAE, x: Tensor, loc: Tensor) -> str:
    layer = output_layer(vae.encoder.net)
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        vae.encoder(x)
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
        "its own learnt read-out of it, μ_i(x) = w_i · h(x) + b_i, with a different weight "
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
    plots.plot_point_cloud(shown, loc, scale, dims, out / "point_cloud.png")
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


def _chunk_sizes(num_draws: int) -> list[int]:
    return [min(DRAW_CHUNK, num_draws - start) for start in range(0, num_draws, DRAW_CHUNK)]


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
    plots.plot_aggregate_posterior(
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
    plots.plot_traversal(decoded, traversal_dims, values, image_shape, out / "traversal.png")
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
    plots.plot_kl_per_dimension(kl, units.variance, units.threshold, out / "kl_per_dimension.png")
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
