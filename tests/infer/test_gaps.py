"""The amortization and approximation gaps (pyro_vae/infer/gaps.py) against closed forms.

In probabilistic PCA (test_ppca.ppca) the posterior p(z | x) is Gaussian and known, and so is
log p(x): the best full-covariance q* is the posterior itself, the best diagonal one is known
too, and every gap has a closed form. The tolerances are the estimator's own: its standard
errors (4 of them) and its convergence tolerance τ, in nats τ·|ELBO| per example (what an
example it calls converged may still be short of the best ELBO). In PPCA that shortfall is
KL(q* ‖ p(z | x)), in closed form: so q* is checked within τ of the optimum, and every q* the
estimator calls converged is.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_ppca import NOISE, ExactPosterior, ppca
from torch import nn
from torch.distributions import kl_divergence

import pyro_vae as pv
from pyro_vae import explain_plots
from pyro_vae.infer.gaps import InferenceGaps, inference_gaps
from pyro_vae.infer.local_gaussian import LocalGaussian

NUM_EXAMPLES = 50


def posterior(vae: pv.VAE) -> ExactPosterior:
    """The closed-form p(z | x) of a PPCA VAE, read off its decoder."""
    return ExactPosterior(vae.decoder.weight.detach(), vae.decoder.bias.detach())


def tolerance(gaps: InferenceGaps) -> torch.Tensor:
    """The estimator's convergence tolerance in nats, per example."""
    return gaps.tolerance * gaps.optimized_elbo.abs()


def assert_zero_within_se(values: torch.Tensor, slack: float, what: str) -> None:
    """The mean of ``values`` is 0 within 4 standard errors over the examples and ``slack``."""
    mean, se = InferenceGaps.average(values)
    assert abs(mean) <= 4 * se + slack, f"{what}: {mean:.3g} with SE {se:.3g}, slack {slack:.3g}"


class ConstantMean(nn.Module):
    """A crippled encoder: the posterior's covariance, but the same μ = 0 for every x."""

    def __init__(self, exact: ExactPosterior) -> None:
        super().__init__()
        self.exact = exact

    def forward(self, x: torch.Tensor) -> dist.MultivariateNormal:
        scale_tril = self.exact(x).scale_tril
        return dist.MultivariateNormal(
            x.new_zeros(len(x), scale_tril.shape[-1]), scale_tril=scale_tril
        )


class MarginalsOf(nn.Module):
    """A diagonal encoder: the exact posterior's mean and marginal standard deviations."""

    def __init__(self, exact: ExactPosterior) -> None:
        super().__init__()
        self.exact = exact

    def forward(self, x: torch.Tensor) -> dist.TorchDistribution:
        q = self.exact(x)
        return dist.Normal(q.mean, q.stddev).to_event(1)


# ------------------------------------------------------------------------- full covariance


@pytest.mark.parametrize("chunk_size", [4096, 25])  # one block; two blocks
def test_ppca_q_star_is_the_closed_form_posterior_and_both_bounds_are_log_p_x(chunk_size):
    # The encoder is off (its posterior mean shifted), so q* has somewhere to go.
    vae, marginal = ppca(posterior_shift=0.5)
    x = marginal.sample((NUM_EXAMPLES,))
    gaps = inference_gaps(vae, x, chunk_size=chunk_size)
    assert gaps.full_covariance
    exact, tau = posterior(vae)(x), tolerance(gaps)
    # q* is the posterior: ELBO(q*) = log p(x) − KL(q* ‖ p(z|x)), so a q* within τ of the
    # best ELBO is within τ in KL. The KL bounds the mean's error too: ½‖μ* − μ‖² in the
    # posterior's metric is part of it.
    kl = kl_divergence(gaps.optimized_posterior(), exact)
    assert bool((kl <= tau).all()), (kl.max(), tau.min())
    assert bool(gaps.converged.any())
    whitened = torch.linalg.solve_triangular(
        exact.scale_tril, (gaps.optimized_loc - exact.loc).unsqueeze(-1), upper=False
    )
    assert bool((whitened.squeeze(-1).norm(dim=-1) <= (2 * tau).sqrt()).all())
    log_p = marginal.log_prob(x)
    assert_zero_within_se(gaps.optimized_elbo - log_p, float(tau.mean()), "ELBO(q*) − log p(x)")
    assert_zero_within_se(gaps.approximation_gap, float(tau.mean()), "approximation gap")
    # The IW bound from q* is log p(x) (its weights are all but constant).
    assert_zero_within_se(gaps.log_likelihood - log_p, float(tau.mean()), "IW − log p(x)")
    # The shifted encoder's ELBO is log p(x) − KL(q ‖ p(z|x)), in closed form per example.
    encoder_kl = kl_divergence(vae.encoder(x), exact)
    assert_zero_within_se(
        gaps.amortization_gap - encoder_kl, float(tau.mean()), "amortization gap − KL"
    )


def test_a_crippled_encoder_has_a_large_amortization_gap_and_q_star_finds_the_mean():
    vae, marginal = ppca()
    exact = vae.encoder
    vae = pv.VAE(
        vae.data_dim,
        vae.latent_dim,
        encoder=ConstantMean(exact),
        decoder=vae.decoder,
        likelihood=vae.likelihood,
    )
    x = marginal.sample((NUM_EXAMPLES,))
    # μ = 0 is up to ~26 posterior standard deviations from μ*: 600 steps travel ~30.
    gaps = inference_gaps(vae, x, num_steps=600)
    posterior_x, tau = exact(x), tolerance(gaps)
    mean, se = gaps.average(gaps.amortization_gap)
    assert mean > 10 and mean > 4 * se  # large and positive
    # In closed form, the gap is KL(q ‖ p(z|x)) − KL(q* ‖ p(z|x)), the second within τ of 0.
    encoder_kl = kl_divergence(vae.encoder(x), posterior_x)
    assert_zero_within_se(
        gaps.amortization_gap - encoder_kl, float(tau.mean()), "amortization gap − KL"
    )
    kl = kl_divergence(gaps.optimized_posterior(), posterior_x)
    assert bool((kl <= tau).all()), (kl.max(), tau.min())
    whitened = torch.linalg.solve_triangular(
        posterior_x.scale_tril, (gaps.optimized_loc - posterior_x.loc).unsqueeze(-1), upper=False
    )
    assert bool((whitened.squeeze(-1).norm(dim=-1) <= (2 * tau).sqrt()).all())
    # μ(x) is reported as the encoder's (0), μ* as the posterior's mean.
    assert bool((gaps.loc == 0).all())
    assert_zero_within_se(gaps.approximation_gap, float(tau.mean()), "approximation gap")


def test_a_budget_too_short_to_arrive_says_so():
    vae, marginal = ppca()
    exact = vae.encoder
    vae = pv.VAE(
        vae.data_dim,
        vae.latent_dim,
        encoder=ConstantMean(exact),
        decoder=vae.decoder,
        likelihood=vae.likelihood,
    )
    x = marginal.sample((NUM_EXAMPLES,))
    gaps = inference_gaps(vae, x)  # the default budget travels ~15 standard deviations
    assert torch.equal(gaps.converged, gaps.elbo_change <= gaps.tolerance)
    # In PPCA, q*'s shortfall from the best ELBO is its KL to the posterior: every q* still
    # short of it by more than τ is marked as not converged (some q* are).
    kl = kl_divergence(gaps.optimized_posterior(), exact(x))
    short = kl > tolerance(gaps)
    assert bool(short.any())
    assert not bool(gaps.converged[short].any()), kl[short & gaps.converged]


# -------------------------------------------------------------------------- diagonal family


def correlated_ppca() -> tuple[pv.VAE, dist.MultivariateNormal, torch.Tensor]:
    """PPCA whose two latent dimensions are strongly correlated a posteriori (nearly parallel
    columns of W), with a diagonal encoder; and the posterior precision Λ = (WᵀW + σ²I)/σ²."""
    vae, _ = ppca()
    weight, bias = vae.decoder.weight.detach().clone(), vae.decoder.bias.detach().clone()
    weight[:, 1] = weight[:, 0] + 1.5 * weight[:, 1]
    decoder = nn.Linear(*reversed(weight.shape))
    with torch.no_grad():
        decoder.weight.copy_(weight)
        decoder.bias.copy_(bias)
    encoder = MarginalsOf(ExactPosterior(weight, bias))
    vae = pv.VAE(
        vae.data_dim, vae.latent_dim, encoder=encoder, decoder=decoder, likelihood=vae.likelihood
    )
    covariance = weight @ weight.T + NOISE**2 * torch.eye(len(weight))
    precision = (weight.T @ weight + NOISE**2 * torch.eye(weight.shape[1])) / NOISE**2
    return vae, dist.MultivariateNormal(bias, covariance), precision


def test_a_diagonal_guide_on_a_correlated_posterior_has_the_closed_form_approximation_gap():
    vae, marginal, precision = correlated_ppca()
    x = marginal.sample((NUM_EXAMPLES,))
    # A narrow valley for a diagonal q: noisy gradients move its mean along it slowly, so the fit
    # takes 8 draws a step and twice the default steps; log p(x) more draws from a q* too
    # narrow for it.
    gaps = inference_gaps(
        vae, x, svi_particles=8, num_steps=600, num_particles=400, iw_particles=10_000
    )
    assert not gaps.full_covariance
    # The best diagonal Gaussian has the posterior's mean and variances 1/Λ_ii; its KL to the
    # posterior, the approximation gap, is ½ (Σ_i log Λ_ii − log det Λ) for every x.
    closed_form = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    tau = tolerance(gaps)
    mean, se = gaps.average(gaps.approximation_gap)
    assert closed_form > 10 * se  # a gap the test can see
    assert_zero_within_se(
        gaps.approximation_gap - closed_form, float(tau.mean()), "approximation gap − KL"
    )
    assert_zero_within_se(
        gaps.optimized_elbo - (marginal.log_prob(x) - closed_form),
        float(tau.mean()),
        "ELBO(q*) − (log p(x) − KL)",
    )
    # q* is that optimum: its means are the posterior's, its σ² are 1/Λ_ii.
    exact = posterior(vae)(x)
    optimum = dist.Normal(exact.mean, precision.diagonal().rsqrt().expand_as(exact.mean))
    q_star = dist.Normal(gaps.optimized_loc, gaps.optimized_scale)
    assert bool((kl_divergence(q_star, optimum).sum(-1) <= tau).all())
    # Every q* has arrived, and the convergence mark passes most of them: the gradients stay
    # noisy here (a diagonal q cannot match the posterior), and that jitter alone must not set
    # it off.
    assert int(gaps.converged.sum()) > NUM_EXAMPLES / 2
    # The encoder gives the marginal variances, wider than 1/Λ_ii: σ(x)/σ* > 1.
    assert bool((gaps.scale_ratio > 1).all())
    mean, se = gaps.average(gaps.amortization_gap)
    assert mean > 4 * se


# ------------------------------------------------------------------ what the estimator leaves


def test_the_model_is_left_as_it_was_and_beta_is_taken_as_1():
    vae, marginal = ppca(posterior_shift=0.5)
    vae.beta = 2.0
    vae.decoder.train(False)  # a flag of the user's, to be kept
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    modes = {name: m.training for name, m in vae.named_modules()}
    pyro.param("users_own", torch.ones(2))
    x = marginal.sample((NUM_EXAMPLES,))
    gaps = inference_gaps(vae, x)
    for name, p in vae.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.requires_grad and p.grad is None, name
    assert {name: m.training for name, m in vae.named_modules()} == modes
    assert vae.beta == 2.0
    store = pyro.get_param_store()
    assert "users_own" in store and not any(name.startswith("inference_gaps") for name in store)
    # q* is the posterior of the model, not of the β-weighted objective it was trained on.
    kl = kl_divergence(gaps.optimized_posterior(), posterior(vae)(x))
    assert bool((kl <= tolerance(gaps)).all()), kl.max()


def test_a_diagonal_encoder_gets_a_diagonal_q_star_unless_asked(tmp_path):
    vae, marginal, _ = correlated_ppca()
    x = marginal.sample((8,))
    diagonal = inference_gaps(vae, x, num_steps=10, num_particles=4, iw_particles=4)
    full = inference_gaps(
        vae, x, num_steps=10, num_particles=4, iw_particles=4, full_covariance=True
    )
    assert diagonal.optimized_scale_tril is None and not diagonal.full_covariance
    assert full.optimized_scale_tril is not None and full.optimized_scale_tril.shape == (8, 2, 2)
    for gaps in (diagonal, full):
        assert gaps.encoder_elbo.shape == gaps.elbo_change.shape == (8,)
        assert gaps.standardized_shift.shape == gaps.scale_ratio.shape == (8, 2)
        assert math.isfinite(gaps.seconds)
    figure = explain_plots.plot_inference_gaps(full, [1, 0], tmp_path / "gaps.png")
    assert (tmp_path / "gaps.png").read_bytes()[:4] == b"\x89PNG"
    bars, means, ratios = figure.axes
    stacked = " ".join(t.get_text() for t in bars.get_legend().get_texts())
    assert "amortization gap" in stacked and "approximation gap" in stacked
    assert [t.get_text() for t in means.get_legend().get_texts()] == ["μ(x) = μ*", "z_2", "z_1"]
    assert "σ(x) / σ*" in ratios.get_xlabel()


def test_an_encoder_without_sigma_is_refused():
    vae = pv.VAE(6, 2, encoder=pv.DeltaEncoder(6, 2, hidden_dims=(8,)), hidden_dims=(8,))
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    with pytest.raises(ValueError, match="σ"):
        inference_gaps(vae, x)


def test_a_local_guide_refuses_rows_other_than_copies_of_its_examples():
    examples = torch.arange(6.0).reshape(3, 2)
    guide = LocalGaussian(
        examples, lambda: (torch.zeros(3, 2), torch.ones(3, 2)), False, ("z", "data")
    )
    rows = examples.repeat(2, 1)
    assert guide(rows).shape == (6, 2)
    assert guide(rows).shape == (6, 2)  # the same rows again: checked once, still accepted
    for wrong in (examples.flip(0), examples[:2], examples.repeat(2, 1)[:5]):
        with pytest.raises(RuntimeError, match="other than its examples"):
            guide(wrong)
    # Rows accepted once and then written to are compared again.
    rows[4, 1] = -1.0
    with pytest.raises(RuntimeError, match="other than its examples"):
        guide(rows)
