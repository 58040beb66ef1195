"""How the latent space is used: active units, KL per dimension, and the decomposition
average KL = I(x; z) + KL(q(z) ‖ p(z)), each against a case with a known answer."""

import math

import pyro.distributions as dist
import pytest
import torch
from conftest import binary_data
from test_ppca import LATENT_DIM, ppca
from torch import nn

import pyro_vae as pv


class IgnoresX(nn.Module):
    """A collapsed encoder: q(z | x) = N(0, I) whatever x is, the prior itself."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.unused = nn.Linear(1, 1)  # a parameter, as encoders have

    def forward(self, x: torch.Tensor) -> dist.TorchDistribution:
        zeros = x.new_zeros(x.shape[0], self.latent_dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def test_collapsed_model_has_no_information_no_active_units_and_no_kl():
    vae = pv.VAE(6, 3, encoder=IgnoresX(3), hidden_dims=(8,))
    x = binary_data(50, 6)
    decomposition = pv.kl_decomposition(vae, x, num_particles=4)
    assert abs(decomposition.mutual_information) < 1e-12
    assert abs(decomposition.marginal_kl) < 1e-12
    assert abs(decomposition.average_kl) < 1e-12
    units = pv.active_units(vae, x)
    assert units.num_active == 0 and torch.equal(units.variance, torch.zeros(3))
    assert torch.equal(pv.kl_per_dimension(vae, x), torch.zeros(50, 3))


class GaussianChannel(nn.Module):
    """q(z_i | x) = N(ρ_i x_i, 1 − ρ_i²): for x ~ N(0, I) this is the exact posterior of a
    linear Gaussian model (probabilistic PCA with an identity loading), so the aggregate
    posterior is the prior N(0, I), KL(q(z) ‖ p(z)) = 0, and
    I(x; z) = −½ Σ_i log(1 − ρ_i²)."""

    def __init__(self, rho: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rho", rho)

    def forward(self, x: torch.Tensor) -> dist.TorchDistribution:
        scale = (1 - self.rho.pow(2)).sqrt().expand(x.shape)
        return dist.Normal(self.rho * x, scale).to_event(1)


def test_gaussian_channel_matches_the_closed_forms():
    rho = torch.tensor([0.6, 0.3])
    vae = pv.VAE(2, 2, encoder=GaussianChannel(rho), likelihood=pv.NormalLikelihood(1.0))
    x = torch.randn(4000, 2)
    exact_information = -0.5 * torch.log1p(-rho.pow(2)).sum().item()
    estimate = pv.kl_decomposition(vae, x, num_particles=4)
    # The empirical q(z) holds each draw's own component: a positive bias of order e^I / N in
    # the marginal KL (and the same, negative, in I), about 3e-4 nats here.
    bias = math.exp(exact_information) / len(x)
    assert abs(estimate.mutual_information - exact_information) < (
        4 * estimate.mutual_information_se + 2 * bias
    )
    assert abs(estimate.marginal_kl) < 4 * estimate.marginal_kl_se + 2 * bias
    # The average KL against its closed form over the same examples.
    exact_average = pv.kl_per_dimension(vae, x).sum(-1).mean().item()
    assert abs(estimate.average_kl - exact_average) < 4 * estimate.average_kl_se
    # Both dimensions carry information: Var(E[z_i | x]) = ρ_i².
    units = pv.active_units(vae, x)
    assert units.num_active == 2
    standard_error = rho.pow(2) * math.sqrt(2 / len(x))  # of a Gaussian sample variance
    assert ((units.variance - rho.pow(2)).abs() < 4 * standard_error).all()


def test_ppca_average_kl_and_information_match_the_exact_posterior():
    """PPCA with its exact posterior N(M x, Σ): the average KL matches the closed form over
    the same examples, and I(x; z) = −½ log det Σ within its standard error and the
    estimator's bias of order e^I / N (about 0.02 nats here)."""
    vae, marginal = ppca()
    x = marginal.sample((3000,))
    covariance = vae.encoder.scale_tril @ vae.encoder.scale_tril.T
    exact_information = -0.5 * torch.logdet(covariance).item()
    estimate = pv.kl_decomposition(vae, x, num_particles=2)
    posterior = vae.encoder(x)
    prior = dist.MultivariateNormal(torch.zeros(LATENT_DIM), torch.eye(LATENT_DIM))
    exact_average = torch.distributions.kl_divergence(posterior, prior).mean().item()
    assert abs(estimate.average_kl - exact_average) < 4 * estimate.average_kl_se
    bias = math.exp(exact_information) / len(x)
    assert abs(estimate.mutual_information - exact_information) < (
        4 * estimate.mutual_information_se + 2 * bias
    )
    assert pv.active_units(vae, x).num_active == LATENT_DIM


def test_kl_per_dimension_sums_to_the_closed_form_kl():
    vae = pv.VAE(6, 3, hidden_dims=(16,))
    with torch.no_grad():
        for p in vae.encoder.parameters():
            p.mul_(3.0)
    x = binary_data(20, 6)
    per_dimension = pv.kl_per_dimension(vae, x)
    loc, scale = vae.encode(x)
    formula = 0.5 * (loc.pow(2) + scale.pow(2) - 1 - scale.pow(2).log())
    torch.testing.assert_close(per_dimension, formula, rtol=1e-12, atol=1e-12)


def test_estimators_refuse_posteriors_they_cannot_use():
    x = binary_data(10, 6)
    full = pv.build_vae(6, 3, encoder="full-covariance", hidden_dims=(8,))
    with pytest.raises(ValueError, match="KL per dimension needs a diagonal Normal"):
        pv.kl_per_dimension(full, x)
    pv.kl_decomposition(full, x)  # a full covariance has a density everywhere: fine
    for encoder in ("delta", "iaf"):
        vae = pv.build_vae(6, 3, encoder=encoder, hidden_dims=(8,))
        with pytest.raises(ValueError, match="needs posteriors with a density at any z"):
            pv.kl_decomposition(vae, x)
    with pytest.raises(ValueError, match="at least two examples"):
        pv.active_units(full, x[:1])


@pytest.mark.parametrize("chunk_size", [7, 100, 2**24])
def test_kl_decomposition_does_not_depend_on_chunking(chunk_size):
    vae = pv.VAE(6, 3, hidden_dims=(8,))
    x = binary_data(30, 6)
    torch.manual_seed(3)
    reference = pv.kl_decomposition(vae, x, chunk_size=2**24)
    torch.manual_seed(3)
    chunked = pv.kl_decomposition(vae, x, chunk_size=chunk_size)
    # Chunks draw z in a different order, so compare in distribution: within standard errors.
    assert abs(chunked.mutual_information - reference.mutual_information) < 4 * math.hypot(
        chunked.mutual_information_se, reference.mutual_information_se
    )


class OneInformativeExample(nn.Module):
    """q(z | x) = N(x[:2], s²) with s = 0.5 where x[2] = 1 and s = 1 where x[2] = 0: examples of
    zeros get the prior N(0, I) itself, whose KL draws are exactly 0."""

    def forward(self, x: torch.Tensor) -> dist.TorchDistribution:
        scale = torch.where(x[:, 2:3] == 1, 0.5, 1.0).expand(-1, 2)
        return dist.Normal(x[:, :2], scale).to_event(1)


@pytest.mark.parametrize("chunk", [3, 4, 7], ids="chunks of {} examples".format)
def test_kl_decomposition_counts_the_last_partial_chunk(chunk):
    """Seven examples, six of them with q(z | x) = p(z); the seventh, last, with a KL of a few
    nats. In chunks of 3 or 4 it sits in a partial last chunk, which must count: the average KL
    is that example's KL / 7, within the standard error of its draws."""
    vae = pv.VAE(3, 2, encoder=OneInformativeExample(), likelihood=pv.NormalLikelihood(1.0))
    x = torch.zeros(7, 3)
    x[6] = torch.tensor([2.0, -1.5, 1.0])
    num_particles = 2000
    estimate = pv.kl_decomposition(
        vae, x, num_particles=num_particles, chunk_size=chunk * len(x) * num_particles
    )
    last, prior = vae.encoder(x[6:]), vae.prior()
    exact = torch.distributions.kl_divergence(last, prior.expand(last.batch_shape)).item()
    z = last.sample((100000,))
    draws = last.log_prob(z) - prior.log_prob(z)  # the last example's KL draws
    standard_error = draws.std().item() / math.sqrt(num_particles) / len(x)
    assert exact / len(x) > 20 * standard_error  # the test has something to find
    assert abs(estimate.average_kl - exact / len(x)) < 4 * standard_error
