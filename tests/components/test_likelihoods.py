"""Likelihoods are normalized distributions over the data they accept."""

import pytest
import torch

import pyro_vae as pv
from pyro_vae.components.distributions import DiscretizedLogistic


@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_discretized_logistic_probabilities_of_all_levels_sum_to_one(num_levels):
    # Locations inside, at the edge of and far outside [0, 1]; scales from sharp to flat.
    loc = torch.tensor([0.3, 0.0, 1.0, -3.0, 4.0, 0.5])
    scale = torch.tensor([0.05, 1e-3, 0.2, 0.5, 2.0, 1e-4])
    d = DiscretizedLogistic(loc, scale, num_levels)
    levels = torch.linspace(0, 1, num_levels).unsqueeze(-1)  # (num_levels, 1) broadcasts over loc
    log_probs = d.log_prob(levels.expand(num_levels, len(loc)))
    assert torch.isfinite(log_probs).all()
    torch.testing.assert_close(log_probs.exp().sum(0), torch.ones(len(loc)), rtol=0, atol=1e-12)
    torch.testing.assert_close(d.mean, (log_probs.exp() * levels).sum(0), rtol=1e-12, atol=1e-12)


def test_discretized_logistic_samples_follow_its_probabilities():
    d = DiscretizedLogistic(torch.tensor(0.4), torch.tensor(0.15), 17)
    num_draws = 100000
    draws = d.sample((num_draws,))
    assert d.support.check(draws).all()
    levels = torch.linspace(0, 1, 17)
    probs = d.log_prob(levels).exp()
    counts = (draws.unsqueeze(-1) - levels).abs().lt(1e-9).sum(0).double()
    expected = probs * num_draws
    standard_error = (num_draws * probs * (1 - probs)).sqrt()
    assert ((counts - expected).abs() <= 4 * standard_error + 1).all()


def test_discretized_logistic_support_is_its_grid():
    d = DiscretizedLogistic(torch.zeros(4), torch.ones(4), 256)
    on_grid = torch.tensor([0.0, 1 / 255, 128 / 255, 1.0], dtype=torch.float32)
    assert d.support.check(on_grid).all()  # float32 pixels, as the datasets store them
    off_grid = torch.tensor([0.3, -1 / 255, 1.01, 0.5])
    assert not d.support.check(off_grid).any()


def test_vae_refuses_data_off_the_likelihood_grid():
    vae = pv.VAE(4, 2, likelihood=pv.DiscretizedLogisticLikelihood(17), hidden_dims=(8,))
    with pytest.raises(ValueError, match=r"feature 1 = 0\.3"):
        vae.validate_data(torch.tensor([[0.0, 0.3, 0.5, 1.0]]))
    vae.validate_data(torch.tensor([[0.0, 5 / 16, 0.5, 1.0]]))


def test_continuous_bernoulli_density_integrates_to_one():
    likelihood = pv.ContinuousBernoulliLikelihood()
    logits = torch.tensor([[-4.0, -0.3, 0.0, 0.01, 2.5]])
    grid = torch.linspace(0, 1, 200001)
    values = likelihood(logits.expand(len(grid), 5)).base_dist.log_prob(grid.unsqueeze(-1))
    assert torch.isfinite(values).all()
    integral = torch.trapezoid(values.exp(), grid, dim=0)
    torch.testing.assert_close(integral, torch.ones(5), rtol=0, atol=1e-8)


@pytest.mark.parametrize("family", [pv.NormalLikelihood, pv.LaplaceLikelihood])
def test_location_scale_likelihoods_fixed_shared_and_per_feature_scales(family):
    loc = torch.randn(3, 4)
    fixed = family(0.5)
    assert not list(fixed.parameters())
    assert torch.equal(fixed(loc).base_dist.scale, torch.full((3, 4), 0.5))
    shared = family(0.5, learn_scale=True)
    assert [p.shape for p in shared.parameters()] == [torch.Size([])]
    torch.testing.assert_close(shared(loc).base_dist.scale, torch.full((3, 4), 0.5))
    per_feature = family(0.5, learn_scale=True, data_dim=4)
    assert [p.shape for p in per_feature.parameters()] == [torch.Size([4])]
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        family(-1.0)
    with pytest.raises(ValueError, match="pass learn_scale=True"):
        family(0.5, data_dim=4)


LEARNT_SCALES = {
    "normal-shared": lambda: pv.NormalLikelihood(0.5, learn_scale=True),
    "normal-per-feature": lambda: pv.NormalLikelihood(0.5, learn_scale=True, data_dim=4),
    "laplace-shared": lambda: pv.LaplaceLikelihood(0.5, learn_scale=True),
    "discretized-logistic-shared": lambda: pv.DiscretizedLogisticLikelihood(17, scale=0.5),
    "discretized-logistic-per-feature": lambda: pv.DiscretizedLogisticLikelihood(
        17, scale=0.5, data_dim=4
    ),
}


@pytest.mark.parametrize("name", sorted(LEARNT_SCALES))
def test_learned_scale_starts_where_asked_and_never_falls_below_its_floor(name):
    """scale = softplus(raw) + 1e-3: the floor keeps the density bounded on features that never
    vary. Driven far below zero, the raw parameter gives the floor exactly."""
    likelihood = LEARNT_SCALES[name]()
    (raw,) = likelihood.parameters()
    torch.testing.assert_close(likelihood.scale, torch.full(raw.shape, 0.5), rtol=1e-15, atol=0)
    with torch.no_grad():
        raw.fill_(-1e4)  # softplus(-1e4) is exactly 0 in float64
    assert torch.equal(likelihood.scale, torch.full(raw.shape, 1e-3))
    loc = torch.zeros(3, 4)
    assert torch.equal(likelihood(loc).base_dist.scale, torch.full((3, 4), 1e-3))
