"""The KL term of the ELBO: Pyro's estimates against the analytic Gaussian formula

    KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ_i (μ_i² + σ_i² − 1 − log σ_i²),

and the reparameterization z = μ(x) + σ(x)·ε behind the Monte-Carlo estimate."""

import warnings

import pyro
import pytest
import torch
from conftest import binary_data
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import kl_divergence

import pyro_vae as pv


def analytic_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The textbook formula, written with log σ² (not log σ), per example."""
    return 0.5 * (loc.pow(2) + scale.pow(2) - 1 - scale.pow(2).log()).sum(-1)


def make_vae(**kwargs) -> pv.VAE:
    vae = pv.VAE(6, 3, hidden_dims=(16,), **kwargs)
    # Spread the encoder's outputs so that μ is far from 0 and σ far from 1: a KL that is
    # clearly non-zero, with a different value for every example.
    with torch.no_grad():
        for p in vae.encoder.parameters():
            p.mul_(3.0)
    return vae


def test_monte_carlo_kl_from_traces_agrees_with_formula_within_standard_errors():
    vae = make_vae()
    x = binary_data(5, 6)
    num_draws = 20000
    repeated = x.repeat(num_draws, 1)  # row k * 5 + i is draw k for example i
    with torch.no_grad():
        guide_trace = poutine.trace(vae.guide).get_trace(repeated)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(
            repeated
        )
        log_q = guide_trace.nodes["z"]["fn"].log_prob(guide_trace.nodes["z"]["value"])
        log_p = model_trace.nodes["z"]["fn"].log_prob(model_trace.nodes["z"]["value"])
        draws = (log_q - log_p).reshape(num_draws, 5)
        loc, scale = vae.encode(x)
    estimate = draws.mean(0)
    standard_error = draws.std(0) / num_draws**0.5
    exact = analytic_kl(loc, scale)
    assert (exact > 1.0).all()  # the test has something to find
    assert (standard_error < 0.05 * exact).all()  # and enough draws to find it
    assert ((estimate - exact).abs() < 4 * standard_error).all(), (estimate, exact)


def test_mean_field_elbo_equals_formula_to_float_precision():
    vae = make_vae()
    x = binary_data(5, 6)
    # Hide the observation: what remains of TraceMeanField_ELBO's loss is its analytic KL.
    kl_only_model = poutine.block(vae.model, hide=["x"])
    loss = TraceMeanField_ELBO().loss(kl_only_model, vae.guide, x)
    loc, scale = vae.encode(x)
    assert abs(loss - analytic_kl(loc, scale).sum().item()) < 1e-10


def test_mean_field_kl_is_scaled_by_beta_and_by_minibatch():
    vae = make_vae(beta=2.5)
    x = binary_data(5, 6)
    kl_only_model = poutine.block(vae.model, hide=["x"])
    loss = TraceMeanField_ELBO().loss(kl_only_model, vae.guide, x, num_data=40)
    loc, scale = vae.encode(x)
    expected = 2.5 * (40 / 5) * analytic_kl(loc, scale).sum().item()
    assert abs(loss - expected) < 1e-9 * expected


def test_torch_kl_divergence_equals_formula():
    vae = make_vae()
    x = binary_data(5, 6)
    q = vae.encoder(x)
    p = vae.prior().expand(q.batch_shape)
    loc, scale = vae.encode(x)
    torch.testing.assert_close(kl_divergence(q, p), analytic_kl(loc, scale), rtol=1e-12, atol=0)


def test_reparameterization_point_cloud_has_mean_mu_and_std_sigma():
    vae = make_vae()
    x = binary_data(1, 6)
    num_draws = 50000
    loc, scale = vae.encode(x)
    site = poutine.trace(vae.guide).get_trace(x.expand(num_draws, 6)).nodes["z"]
    z = site["value"]
    mean, std = z.mean(0), z.std(0)
    se_mean = std / num_draws**0.5
    se_std = std / (2 * (num_draws - 1)) ** 0.5  # the sample std's standard error, Gaussian z
    assert ((mean - loc[0]).abs() < 4 * se_mean).all()
    assert ((std - scale[0]).abs() < 4 * se_std).all()

    # Gradients reach the encoder through z: dz/dμ = 1 and dz/dσ = ε = (z − μ)/σ, exactly.
    q = site["fn"].base_dist
    d_loc, d_scale = torch.autograd.grad(z.sum(), (q.loc, q.scale), retain_graph=True)
    torch.testing.assert_close(d_loc, torch.ones_like(z))
    torch.testing.assert_close(d_scale, ((z - q.loc) / q.scale).detach())
    grads = torch.autograd.grad(z.pow(2).mean(), list(vae.encoder.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_guide_samples_are_different_per_example_because_mu_sigma_are_outputs():
    vae = make_vae()
    loc, scale = vae.encode(binary_data(4, 6, p=0.5))
    # μ(x) and σ(x) are per-example outputs, not parameters of the model.
    assert loc.shape == scale.shape == (4, 3)
    assert torch.unique(loc, dim=0).shape[0] == 4
    parameter_names = [name for name, _ in vae.named_parameters()]
    assert not any("loc" in n or "scale" in n for n in parameter_names)
    pyro.clear_param_store()


# ---------------------------------------------------------------- registered closed-form KLs


def random_full_covariance_posterior(batch: int, dim: int) -> torch.distributions.Distribution:
    loc = 2 * torch.randn(batch, dim)
    scale_tril = torch.randn(batch, dim, dim).tril(-1) + torch.diag_embed(torch.rand(batch, dim))
    return pyro.distributions.MultivariateNormal(loc, scale_tril=scale_tril + 0.3 * torch.eye(dim))


def diagonal_prior(batch: int, dim: int) -> torch.distributions.Distribution:
    loc, scale = torch.randn(dim), 0.5 + torch.rand(dim)
    return pyro.distributions.Normal(loc, scale).to_event(1).expand((batch,))


def test_registered_full_covariance_kl_equals_torch_mvn_formula():
    q, p = random_full_covariance_posterior(4, 3), diagonal_prior(4, 3)
    # The same prior written as a full-covariance Normal: torch's own MVN-vs-MVN formula.
    p_as_mvn = torch.distributions.MultivariateNormal(
        p.base_dist.loc, scale_tril=torch.diag_embed(p.base_dist.scale)
    )
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(q, p_as_mvn), rtol=1e-12, atol=0)


def test_registered_full_covariance_kl_agrees_with_monte_carlo_within_standard_errors():
    q, p = random_full_covariance_posterior(4, 3), diagonal_prior(4, 3)
    num_draws = 40000
    z = q.sample((num_draws,))
    draws = q.log_prob(z) - p.log_prob(z)
    standard_error = draws.std(0) / num_draws**0.5
    exact = kl_divergence(q, p)
    assert (standard_error < 0.05 * exact).all()
    assert ((draws.mean(0) - exact).abs() < 4 * standard_error).all(), (draws.mean(0), exact)


def test_mean_field_elbo_uses_the_registered_kl_for_a_full_covariance_encoder():
    vae = pv.VAE(6, 3, encoder=pv.FullCovarianceNormalEncoder(6, 3, (16,)), hidden_dims=(16,))
    with torch.no_grad():  # off the initial (diagonal) posterior: correlations, μ far from 0
        for p in vae.encoder.parameters():
            p.normal_()
    x = binary_data(5, 6)
    kl_only_model = poutine.block(vae.model, hide=["x"])
    losses = [TraceMeanField_ELBO().loss(kl_only_model, vae.guide, x) for _ in range(2)]
    q = vae.encoder(x)
    assert (q.scale_tril.tril(-1).abs() > 0.1).any()
    exact = kl_divergence(q, vae.prior().expand(q.batch_shape)).sum().item()
    # Exact, so two evaluations agree with each other and with the formula: no Monte Carlo.
    assert abs(losses[0] - exact) < 1e-10 and abs(losses[1] - exact) < 1e-10


CLOSED_FORM = {
    ("standard-normal", "diagonal"),
    ("standard-normal", "full-covariance"),
    ("standard-normal", "delta"),  # Pyro's KL(δ_v ‖ p) = −log p(v), the MAP penalty
    ("diagonal-normal", "diagonal"),
    ("diagonal-normal", "full-covariance"),
    ("diagonal-normal", "delta"),
    ("mixture", "delta"),
    ("flow", "delta"),
}


# The VampPrior refuses the IAF and Delta encoders at construction (test_components).
BUILDABLE = [
    pytest.param(prior, encoder, id=f"prior={prior},encoder={encoder}")
    for prior in pv.PRIOR_NAMES
    for encoder in pv.ENCODER_NAMES
    if not (prior == "vamp" and encoder in ("iaf", "delta"))
]


@pytest.mark.parametrize("prior, encoder", BUILDABLE)
def test_mean_field_says_when_it_falls_back_to_monte_carlo(prior, encoder):
    options = {"num_components": 2} if prior in ("mixture", "vamp") else {}
    vae = pv.build_vae(6, 3, prior=prior, encoder=encoder, hidden_dims=(8,), **options)
    closed = (prior, encoder) in CLOSED_FORM
    assert pv.has_closed_form_kl(vae) == closed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pv.fit(
            vae,
            binary_data(8, 6),
            num_epochs=2,
            batch_size=4,
            progress=False,
            loss=TraceMeanField_ELBO(),
        )
    messages = [str(w.message) for w in caught if "TraceMeanField_ELBO" in str(w.message)]
    assert len(messages) == (0 if closed else 1), messages  # once per fit, not per step
    if not closed:
        assert "Monte Carlo" in messages[0]


def test_beta_scales_the_kl_term_of_trace_elbo_exactly():
    x = binary_data(5, 6)
    vae = make_vae()
    losses = {}
    for beta in (1.0, 2.0, 3.0):
        vae.beta = beta
        pyro.set_rng_seed(7)  # the same z for every β
        losses[beta] = pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x)
    # loss(β) = −reconstruction + β · (log q − log p): linear in β, with slope the KL draw.
    slope = losses[2.0] - losses[1.0]
    assert slope > 1.0  # the KL draw is clearly positive here
    assert abs((losses[3.0] - losses[2.0]) - slope) < 1e-9 * abs(slope)
