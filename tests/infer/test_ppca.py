"""Probabilistic PCA: a linear Gaussian decoder, where log p(x) and p(z | x) have closed forms.

With the exact posterior as the guide every importance weight p(x, z)/q(z | x) equals p(x), so
a one-particle ELBO and the importance-weighted bound both equal log p(x) to float precision."""

import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_vae as pv

DATA_DIM, LATENT_DIM, NOISE = 5, 2, 0.3


class ExactPosterior(nn.Module):
    """q(z | x) = p(z | x) for x = W z + b + N(0, NOISE² I), z ~ N(0, I)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        m = weight.T @ weight + NOISE**2 * torch.eye(weight.shape[1])
        self.m_inv = torch.linalg.inv(m)
        self.scale_tril = torch.linalg.cholesky(NOISE**2 * self.m_inv)

    def forward(self, x: torch.Tensor) -> dist.TorchDistribution:
        loc = (x - self.bias) @ self.weight @ self.m_inv.T
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril)


def ppca(posterior_shift: float = 0.0) -> tuple[pv.VAE, dist.MultivariateNormal]:
    weight = torch.randn(DATA_DIM, LATENT_DIM)
    bias = torch.randn(DATA_DIM)
    decoder = nn.Linear(LATENT_DIM, DATA_DIM)
    with torch.no_grad():
        decoder.weight.copy_(weight)
        decoder.bias.copy_(bias)  # the model stays put; only the posterior is shifted
    encoder = ExactPosterior(weight, bias + posterior_shift)
    vae = pv.VAE(
        DATA_DIM,
        LATENT_DIM,
        encoder=encoder,
        decoder=decoder,
        likelihood=pv.NormalLikelihood(NOISE),
    )
    marginal = dist.MultivariateNormal(bias, weight @ weight.T + NOISE**2 * torch.eye(DATA_DIM))
    return vae, marginal


def test_one_particle_elbo_equals_closed_form_log_likelihood():
    vae, marginal = ppca()
    x = marginal.sample((20,))
    torch.testing.assert_close(pv.elbo(vae, x), marginal.log_prob(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [7, 40, 4096])  # chunks cutting examples and samples
def test_importance_weighted_bound_equals_closed_form_log_likelihood(chunk_size):
    vae, marginal = ppca()
    x = marginal.sample((20,))
    estimate = pv.log_likelihood(vae, x, num_particles=13, chunk_size=chunk_size)
    torch.testing.assert_close(estimate, marginal.log_prob(x), rtol=1e-10, atol=1e-10)


def test_wrong_posterior_gives_a_strictly_lower_elbo_and_a_tighter_iw_bound():
    vae, marginal = ppca(posterior_shift=0.5)
    x = marginal.sample((200,))
    exact = marginal.log_prob(x)
    gap_elbo = exact - pv.elbo(vae, x, num_particles=20)
    gap_iw = exact - pv.log_likelihood(vae, x, num_particles=500)
    se = (gap_elbo - gap_iw).std() / len(x) ** 0.5
    assert gap_elbo.mean() > 0.05  # the ELBO misses log p(x) by KL(q ‖ p(z|x)) > 0
    assert (gap_elbo - gap_iw).mean() > 4 * se  # importance weighting closes part of the gap
