"""The Bayesian decoder: weights sampled once per step outside the data plate, their KL counted
once (not times N/B), the posterior predictive, log p(x) conditional on the posterior-mean
weights, and the pairs it refuses."""

import pytest
import torch
from conftest import binary_data
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence
from torch.nn import functional as F

import pyro_vae as pv


def bayesian_vae(latent_dim: int = 3, data_dim: int = 12, hidden_dims=(8,)) -> pv.VAE:
    return pv.build_vae(data_dim, latent_dim, hidden_dims=hidden_dims, decoder="bayesian")


def test_weights_are_sampled_once_outside_the_data_plate_in_model_and_guide():
    vae = bayesian_vae()
    x = binary_data(6, 12)
    guide_trace = poutine.trace(vae.guide).get_trace(x, num_data=60)
    model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x, num_data=60)
    sites = vae.decoder.site_names()
    assert sites == ["decoder.0.weight", "decoder.0.bias", "decoder.1.weight", "decoder.1.bias"]
    for trace in (guide_trace, model_trace):
        for name in sites:
            assert trace.nodes[name]["cond_indep_stack"] == ()  # global: one draw per step
            assert trace.nodes[name]["scale"] == 1.0  # not multiplied by N/B
        assert trace.nodes["z"]["scale"] == 10.0
    assert model_trace.nodes["x"]["scale"] == 10.0
    # The model used the guide's draw of the weights.
    for name in sites:
        assert torch.equal(model_trace.nodes[name]["value"], guide_trace.nodes[name]["value"])


def tiny_linear_vae() -> pv.VAE:
    """One latent, one feature: the decoder is x_logit = w z + b, w and b Bayesian."""
    vae = pv.build_vae(1, 1, hidden_dims=(), decoder="bayesian", prior_scale=0.7)
    with torch.no_grad():
        vae.decoder.locs["0_weight"].fill_(0.8)
        vae.decoder.raw_scales["0_weight"].fill_(-1.0)
    return vae


def weight_kl(vae: pv.VAE) -> torch.Tensor:
    """KL(q(w) ‖ p(w)) summed over every weight, by torch's closed form."""
    total = torch.zeros(())
    for key in vae.decoder.locs:
        q = vae.decoder.posterior(key)
        p = torch.distributions.Normal(torch.zeros_like(q.loc), vae.decoder.prior_scale)
        total = total + kl_divergence(q, p).sum()
    return total


def test_the_weights_kl_counts_once_per_step_and_the_local_terms_n_over_b_times():
    """TraceMeanField_ELBO's loss is (N/B)·(local terms) + KL(q(w) ‖ p(w)) exactly. Under the
    same random draws, two dataset sizes N1, N2 give two losses, and
    (N2·L1 − N1·L2) / (N2 − N1) isolates the part that does not scale: the weights' KL."""
    vae = tiny_linear_vae()
    x = binary_data(5, 1)
    losses = {}
    for num_data in (10, 1000):
        torch.manual_seed(3)
        losses[num_data] = TraceMeanField_ELBO().differentiable_loss(
            vae.model, vae.guide, x, num_data
        )
    unscaled = (1000 * losses[10] - 10 * losses[1000]) / (1000 - 10)
    assert torch.allclose(unscaled, weight_kl(vae), rtol=1e-10, atol=0)


def test_elbo_terms_reports_the_weights_kl_separately_within_its_standard_error():
    vae = tiny_linear_vae()
    x = binary_data(4, 1)
    draws = torch.stack([pv.elbo_terms(vae, x).global_kl for _ in range(400)])
    se = draws.std() / len(draws) ** 0.5
    assert (draws.mean() - weight_kl(vae)).abs() < 4 * se
    terms = pv.elbo_terms(vae, x, num_data=40)
    assert terms.num_data == 40
    assert torch.allclose(terms.elbo, terms.reconstruction - terms.kl - terms.global_kl / 40)


def test_a_deterministic_decoder_has_no_global_kl():
    terms = pv.elbo_terms(pv.VAE(12, 3, hidden_dims=(8,)), binary_data(4, 12))
    assert terms.global_kl == 0
    assert torch.equal(terms.elbo, terms.reconstruction - terms.kl)


def test_decoding_with_mean_weights_is_the_network_at_the_guides_means():
    vae = tiny_linear_vae()
    z = torch.randn(7, 1)
    locs = vae.decoder.locs
    expected = F.linear(z, locs["0_weight"], locs["0_bias"])
    assert torch.allclose(vae.decode(z, weights="mean"), expected, rtol=1e-12, atol=0)


def test_the_posterior_predictive_draws_weights_whose_average_is_the_mean_network():
    """For a linear decoder, E_q(w)[w z + b] = E[w] z + E[b]: the average of decodes with drawn
    weights must match the mean-weight decode within 4 standard errors."""
    vae = tiny_linear_vae()
    z = torch.tensor([[0.5], [-2.0]])
    draws = torch.stack([vae.decode(z) for _ in range(2000)])
    assert draws.std(0).min() > 0  # each call draws new weights
    se = draws.std(0) / len(draws) ** 0.5
    assert ((draws.mean(0) - vae.decode(z, weights="mean")).abs() < 4 * se).all()
    assert vae.sample(5).shape == (5, 1) and vae.reconstruct(torch.ones(3, 1)).shape == (3, 1)
    with pytest.raises(ValueError, match="weights must be 'sample' or 'mean'"):
        vae.decode(z, weights="median")


def test_log_likelihood_is_conditional_on_the_posterior_mean_weights():
    bayesian = bayesian_vae()
    deterministic = pv.VAE(12, 3, hidden_dims=(8,), encoder=bayesian.encoder)
    with torch.no_grad():
        for layer, linear in ((0, deterministic.decoder[0]), (1, deterministic.decoder[2])):
            linear.weight.copy_(bayesian.decoder.locs[f"{layer}_weight"])
            linear.bias.copy_(bayesian.decoder.locs[f"{layer}_bias"])
    x = binary_data(6, 12)
    torch.manual_seed(5)
    conditional = pv.log_likelihood(bayesian, x, num_particles=20)
    torch.manual_seed(5)
    expected = pv.log_likelihood(deterministic, x, num_particles=20)
    assert torch.allclose(conditional, expected, rtol=1e-12, atol=0)


def test_iwae_is_refused_with_global_latents_saying_why():
    with pytest.raises(ValueError, match=r"RenyiELBO \(IWAE\) cannot train .* N/B times"):
        pv.fit(
            bayesian_vae(),
            binary_data(8, 12),
            num_epochs=1,
            batch_size=4,
            loss=RenyiELBO(alpha=0, num_particles=2),
            progress=False,
        )


def test_prior_scale_belongs_to_the_bayesian_decoder():
    with pytest.raises(ValueError, match="prior_scale is the weight prior of decoder"):
        pv.build_vae(12, 3, prior_scale=2.0)
    with pytest.raises(ValueError, match="prior_scale must be a finite number > 0"):
        pv.build_vae(12, 3, decoder="bayesian", prior_scale=-1.0)
    assert pv.build_vae(12, 3, decoder="bayesian", prior_scale=2.0).decoder.prior_scale == 2


@pytest.mark.parametrize("objective", [Trace_ELBO, TraceMeanField_ELBO], ids=lambda c: c.__name__)
def test_fit_lowers_the_loss_of_a_bayesian_vae(objective):
    x = pv.binarize(
        pv.load_dataset("digits", dtype=torch.float64).x_train[:256],
        torch.Generator().manual_seed(0),
    )
    vae = pv.build_vae(64, 4, hidden_dims=(32,), decoder="bayesian")
    history = pv.fit(
        vae, x, num_epochs=20, batch_size=64, learning_rate=3e-3, loss=objective(), progress=False
    )
    first, last = torch.tensor(history.step_loss[:4]), torch.tensor(history.step_loss[-4:])
    assert last.mean() < first.mean() - 4 * (first.var() / 4 + last.var() / 4).sqrt()


def test_explain_report_shows_the_weight_uncertainty_with_its_measured_spread(tmp_path):
    vae = bayesian_vae(data_dim=16)
    x = binary_data(8, 16)
    torch.manual_seed(7)
    report = pv.explain(vae, x, torch.arange(8) % 2, (4, 4), ["a", "b"], tmp_path, num_particles=50)
    text = report.read_text()
    assert "## 7. What the decoder's weight uncertainty does" in text
    assert (tmp_path / "weight_uncertainty.png").read_bytes()[:4] == b"\x89PNG"
    _, std = pv.weight_spread(vae, x)
    assert std.min() > 0
    reported = float(text.split("Average pixel-wise std")[1].split("**")[1])
    # Two estimates from 100 draws each: a standard deviation from n draws has a relative
    # standard error of 1/sqrt(2(n-1)) (at most, before averaging over pixels), so their
    # difference is within 4·sqrt(2) of that.
    relative_se = 1 / (2 * 99) ** 0.5
    assert abs(reported - float(std.mean())) < 4 * 2**0.5 * relative_se * float(std.mean())


@pytest.mark.parametrize("init_scale", [0.01, 0.5])
def test_the_weight_guide_starts_at_sigma_init_scale(init_scale):
    """q(w)'s standard deviation starts at init_scale itself for every weight and bias (not a
    transform of it, such as log(1 + init_scale): 0.00995 for 0.01, 0.405 for 0.5)."""
    decoder = pv.BayesianMLP(3, (5,), 4, init_scale=init_scale)
    trace = poutine.trace(decoder.guide).get_trace()
    for name in decoder.site_names():
        scale = trace.nodes[name]["fn"].base_dist.scale
        torch.testing.assert_close(scale, torch.full_like(scale, init_scale), rtol=1e-12, atol=0)


def test_the_bayesian_vae_s_weight_guide_starts_at_sigma_0_01():
    vae = bayesian_vae()
    for key in vae.decoder.locs:
        scale = vae.decoder.posterior(key).scale
        torch.testing.assert_close(scale, torch.full_like(scale, 0.01), rtol=1e-12, atol=0)
