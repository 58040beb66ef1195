"""The explain report's section on how good μ(x) and σ(x) are: the amortization gap and the
approximation gap (:func:`~pyro_vae.infer.gaps.inference_gaps`) measured on the report's test
inputs, with their figure.

The estimator reads a model of x alone. M2's q(z | x, y) and the CVAE's q(z | x, c) read a
second input per row, so each is shown to it as a model of the rows [x, y] or [x, c]
(:class:`M2View`, :class:`CVAEView`): copies of the rows the estimator stacks carry their own
y or c.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pyro import poutine
from torch import Tensor, nn

from pyro_vae import explain_plots
from pyro_vae._markdown import table
from pyro_vae.infer.gaps import GapsModel, InferenceGaps, inference_gaps
from pyro_vae.models.cvae import ConditionalVAE
from pyro_vae.models.m2 import M2

TITLE = "How good are μ(x) and σ(x)? The amortization gap and the approximation gap"
FIGURE = "inference_gaps.png"
# The test inputs measured (the first ones): a few hundred SVI steps each, all at once.
GAP_EXAMPLES = 500
SHOWN = 5  # test inputs in the table
# Latent dimensions in the figure's μ(x)-against-μ* panel.
SHOWN_DIMS = 3


def gaps_section(model: GapsModel, x: Tensor, number: int, out: Path, note: str = "") -> str:
    """Section ``number`` of a report: the two gaps on the first :data:`GAP_EXAMPLES` of the
    test inputs ``x``, with :data:`FIGURE` written into ``out``. ``note`` opens the section
    (what ``model`` stands for, when it is a view of another model). A model the estimator
    cannot measure (an encoder without a σ) gets the section marked, saying why."""
    measured = x[:GAP_EXAMPLES]
    try:
        gaps = inference_gaps(model, measured)
    except ValueError as error:
        return f"## {number}. {TITLE}\n\n{note}Not measured: {error}.\n"
    spread = gaps.optimized_loc.var(0)
    dims = torch.argsort(spread, descending=True)[:SHOWN_DIMS].tolist()
    explain_plots.plot_inference_gaps(gaps, dims, out / FIGURE)
    return f"## {number}. {TITLE}\n\n{note}" + describe(gaps, model, len(x))


def describe(gaps: InferenceGaps, model: object, num_test: int) -> str:
    """The section's text for ``gaps`` measured on the first inputs of ``num_test``."""
    n = len(gaps.encoder_elbo)
    amortization = gaps.average(gaps.amortization_gap)
    approximation = gaps.average(gaps.approximation_gap)
    family = "full-covariance" if gaps.full_covariance else "diagonal"
    rows = [
        [
            f"test #{i + 1}",
            float(gaps.encoder_elbo[i]),
            float(gaps.optimized_elbo[i]),
            float(gaps.log_likelihood[i]),
            float(gaps.amortization_gap[i]),
            float(gaps.approximation_gap[i]),
        ]
        for i in range(min(SHOWN, n))
    ]
    rows.append(
        [
            f"mean of {n} (± SE)",
            *(
                f"{mean:.3f} ± {se:.3f}"
                for mean, se in (
                    gaps.average(gaps.encoder_elbo),
                    gaps.average(gaps.optimized_elbo),
                    gaps.average(gaps.log_likelihood),
                    amortization,
                    approximation,
                )
            ),
        ]
    )
    shift = gaps.standardized_shift.abs()
    ratio = gaps.scale_ratio
    quartiles = (
        ratio.flatten().double().quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    )
    converged = int(gaps.converged.sum())
    sample = (
        f"the first {n} of the {num_test} test inputs" if n < num_test else f"the {n} test inputs"
    )
    return (
        "The encoder is one network for every input. For each input x alone, the best "
        "Gaussian q*(z) that SVI could find is at least as good as the encoder's q(z | x), and "
        "usually better; and the true posterior p(z | x) is better still. The ELBO's shortfall "
        "from log p(x) splits in two (Cremer, Li & Duvenaud 2018):\n\n"
        f"- **amortization gap** ELBO(q*) − ELBO(q(z | x)) = **{amortization[0]:.3f} ± "
        f"{amortization[1]:.3f}** nats per input: what sharing one encoder network costs;\n"
        f"- **approximation gap** log p(x) − ELBO(q*) = **{approximation[0]:.3f} ± "
        f"{approximation[1]:.3f}** nats per input: what the Gaussian family costs, however "
        "it is fitted.\n\n" + _verdict(amortization, approximation, gaps.full_covariance) + "\n\n"
        f"Measured on {sample}. q* is {family} ({_family_reason(gaps, model)}): Pyro params "
        f"started at μ(x) and σ(x), fitted by SVI ({gaps.num_steps} steps of Adam, the model "
        f"frozen), all inputs at once, each with its own parameters. Each ELBO is a Monte-Carlo "
        f"estimate from {gaps.num_particles} draws of z per input (the encoder's and q*'s from "
        f"the same draws of ε), log p(x) the importance-weighted bound with K = "
        f"{gaps.iw_particles} draws from q* (below log p(x) by a bias that shrinks with K, so "
        "the approximation gap is if anything understated); ± is the standard error over the "
        f"inputs.{_model_notes(model)} It took {gaps.seconds:.1f} s.\n\n"
        + table(
            [
                "input",
                "ELBO, encoder",
                "ELBO, q*",
                "log p(x) ≥",
                "amortization",
                "approximation",
            ],
            rows,
        )
        + f"\nHow far the encoder's μ and σ are from q*'s, over every input and latent "
        f"dimension: |μ(x) − μ*| / σ* has median {float(shift.median()):.2f} and 90th "
        f"percentile {float(shift.flatten().double().quantile(0.9)):.2f} (μ(x) is that many of "
        f"q*'s standard deviations off); σ(x) / σ* has quartiles {float(quartiles[0]):.2f}, "
        f"{float(quartiles[1]):.2f}, {float(quartiles[2]):.2f} (above 1, the encoder is less "
        "sure than the best Gaussian of that input's own; below 1, more sure than the data "
        f"allow).\n\nConverged: {converged} of {n} inputs (ELBO of q* changed by at most "
        f"{gaps.tolerance:g}, relative, after the step size began to fall)"
        + (
            "."
            if converged == n
            else "; the others' q* might still improve, so their amortization gaps are "
            "understated and their approximation gaps overstated."
        )
        + f"\n\n![inference gaps]({FIGURE})\n"
    )


def _verdict(
    amortization: tuple[float, float], approximation: tuple[float, float], full: bool
) -> str:
    """What the two gaps mean for this model, in a sentence or two."""
    (a, a_se), (b, b_se) = amortization, approximation
    richer = "a flow guide (`--encoder iaf`)" + ("" if full else " or a full-covariance one")
    seen_a, seen_b = a > 2 * a_se, b > 2 * b_se
    if not seen_a and not seen_b:
        return (
            "Neither gap is distinguishable from 0 here (each is within 2 standard errors): "
            "the encoder is as good as a Gaussian fitted to each input alone, and a Gaussian "
            "as good as the posterior needs."
        )
    first = f"Sharing the encoder costs {_pm(a, a_se)} nats per input" + (
        "" if seen_a else " (not distinguishable from 0)"
    )
    second = f"the Gaussian family costs {_pm(b, b_se)}" + (
        "" if seen_b else " (not distinguishable from 0)"
    )
    advice = (
        f"{richer} can cut the second, a wider encoder or more training of it the first"
        if b >= a
        else f"a wider encoder or more training of it can cut the first, {richer} the second"
    )
    return (
        f"{first}; {second}: {advice}. With this decoder, those are the most each could gain "
        "(a model trained with another encoder also learns another decoder)."
    )


def _pm(mean: float, se: float) -> str:
    """``mean ± se`` to the decimal of the standard error's first digit (two decimals at least,
    five at most)."""
    places = 2 if not se > 0 else min(5, max(2, -math.floor(math.log10(se))))
    return f"{mean:.{places}f} ± {se:.{places}f}"


def _family_reason(gaps: InferenceGaps, model: object) -> str:
    # A view's encoder is its method; the network's class is the view's encoder_name.
    encoder = getattr(model, "encoder_name", type(getattr(model, "encoder", None)).__name__)
    if gaps.full_covariance and encoder not in ("FullCovarianceNormalEncoder",):
        return (
            f"the encoder, a {encoder}, is not a Gaussian: the amortization gap then also "
            "compares the families, and may be negative"
        )
    return f"as the encoder, a {encoder}"


def _model_notes(model: object) -> str:
    notes = ""
    beta = getattr(model, "beta", 1.0)
    if beta != 1.0:
        notes += (
            f" The ELBOs are the true ELBO (β = 1), not the β = {beta:g} objective this model "
            "was trained on."
        )
    if getattr(model, "weight_guide", None) is not None:
        notes += (
            " The decoder's weights are held at their posterior mean, as for log p(x) in the "
            "evaluation."
        )
    return notes


class _JoinedView:
    """A model of x and one more input per row, seen as a model of the rows [x, input]: what
    :func:`~pyro_vae.infer.gaps.inference_gaps` reads (a
    :class:`~pyro_vae.infer.gaps.GapsModel`)."""

    weight_guide = None

    def __init__(self, module: M2 | ConditionalVAE, data_dim: int) -> None:
        self.module, self.data_dim = module, data_dim
        self.prior, self.likelihood = module.prior, module.likelihood
        self.encoder_name = type(module.encoder).__name__

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return rows[:, : self.data_dim], rows[:, self.data_dim :]

    def weight_means(self) -> dict[str, Tensor]:
        return {}

    def parameters(self) -> Iterator[Tensor]:
        return self.module.parameters()

    def modules(self) -> Iterator[nn.Module]:
        return self.module.modules()

    def encode(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.encoder(rows)
        return posterior.mean, posterior.stddev

    def decode(self, z: Tensor, weights: str = "mean") -> Tensor:
        raise NotImplementedError("the estimator decodes through the model only")

    def validate_data(
        self, rows: object, what: str = "data", *, probabilities: bool = False
    ) -> Tensor:
        assert isinstance(rows, Tensor)
        self.module.validate_data(self.split(rows)[0], what, probabilities=probabilities)
        return rows

    def encoder(self, rows: Tensor) -> Any:
        raise NotImplementedError


class CVAEView(_JoinedView):
    """A :class:`~pyro_vae.models.cvae.ConditionalVAE` as a model of the rows [x, c]: its
    p(z | c) p(x | z, c) and its guide q(z | x, c); β is the CVAE's."""

    def __init__(self, cvae: ConditionalVAE) -> None:
        super().__init__(cvae, cvae.data_dim)
        self.cvae = cvae

    @property
    def beta(self) -> float:
        return self.cvae.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.cvae.beta = value

    def model(self, rows: Tensor, num_data: int | None = None) -> Tensor:
        return self.cvae.model(*self.split(rows), num_data)

    def guide(self, rows: Tensor, num_data: int | None = None) -> Tensor:
        return self.cvae.guide(*self.split(rows), num_data)

    def encoder(self, rows: Tensor) -> Any:
        return self.cvae.encoder(rows)  # its input is [x, c]: the rows as they are


class M2View(_JoinedView):
    """An :class:`~pyro_vae.models.m2.M2` as a model of the rows [x, y] with every y known:
    p(z) p(x | y, z) at its site ``z_labelled`` (the model's log p(y) and its classification
    term are left out: they do not depend on z) and its guide q(z | x, y)."""

    latent_site = "z_labelled"
    latent_plate = "labelled"

    def __init__(self, m2: M2) -> None:
        super().__init__(m2, m2.data_dim)
        self.m2 = m2

    def labelled(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.split(rows)
        return x, y[:, 0].long()

    def model(self, rows: Tensor, num_data: int | None = None) -> None:
        blocked = poutine.block(self.m2.model, hide=["y_labelled", "y_aux"])
        blocked(*self.labelled(rows), num_data)

    def guide(self, rows: Tensor, num_data: int | None = None) -> None:
        self.m2.guide(*self.labelled(rows), num_data)

    def encoder(self, rows: Tensor) -> Any:
        return self.m2.encoder(self.m2._encoder_input(*self.labelled(rows)))

    @staticmethod
    def rows(x: Tensor, y: Tensor) -> Tensor:
        """[x, y]: the labels as one more column."""
        return torch.cat([x, y.to(x.dtype).unsqueeze(-1)], -1)
