"""What fit hands to the optimizer: gradients of the right objective at the right scale, and
freshly binarized batches."""

import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import pyro_vae as pv

DATA_DIM, LATENT_DIM, NUM_PARTICLES = 6, 2, 3


class FrozenNoiseNormal(dist.Normal):
    """N(loc, scale²) whose reparameterized draw uses a given ε: z = loc + scale · ε."""

    def __init__(self, loc, scale, noise):
        super().__init__(loc, scale)
        self.noise = noise

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return FrozenNoiseNormal(
            self.loc.expand(shape), self.scale.expand(shape), self.noise.expand(shape)
        )

    def rsample(self, sample_shape=()):
        return (self.loc + self.scale * self.noise).expand(
            self._extended_shape(torch.Size(sample_shape))
        )


class FrozenNoiseEncoder(nn.Module):
    """A diagonal Normal encoder whose i-th call draws z with the (i mod K)-th of K fixed noise
    vectors. An objective with K particles calls it K times per step and sees each noise once:
    the IWAE bound is symmetric in its particles, so every step computes the same function of
    the weights, and the gradients can be compared exactly."""

    def __init__(self, noises: torch.Tensor) -> None:
        super().__init__()
        self.inner = pv.DiagonalNormalEncoder(DATA_DIM, LATENT_DIM, (8,))
        self.latent_dim = LATENT_DIM
        self.noises = noises
        self.calls = 0

    def forward(self, x):
        q = self.inner(x).base_dist
        noise = self.noises[self.calls % len(self.noises)]
        self.calls += 1
        return FrozenNoiseNormal(q.loc, q.scale, noise.expand(q.loc.shape)).to_event(1)


def gradients(parameters) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in parameters])


@pytest.mark.parametrize(
    "make_loss",
    [
        pytest.param(lambda: RenyiELBO(alpha=0, num_particles=NUM_PARTICLES), id="IWAE"),
        pytest.param(lambda: Trace_ELBO(num_particles=NUM_PARTICLES), id="Trace_ELBO"),
    ],
)
def test_each_step_hands_the_optimizer_the_gradient_of_the_whole_datasets_loss(make_loss):
    """fit's gradient is that of (N/B) · loss(minibatch): for IWAE, the log-sum-exp over the
    particles of the unscaled minibatch, then times N/B (docs: "IWAE and N/B"). With N equal
    rows and a frozen draw of the noise, (N/B) · loss(minibatch) is the loss of the whole data,
    exactly, whatever the minibatch, the last smaller one included (10 rows in steps of 4, 4,
    2). Gradients are read in an optimizer pre-step hook, which then zeroes them: Adam with a
    zero gradient moves nothing, so every step sees the same weights."""
    noises = torch.randn(NUM_PARTICLES, LATENT_DIM)
    vae = pv.VAE(DATA_DIM, LATENT_DIM, encoder=FrozenNoiseEncoder(noises), hidden_dims=(8,))
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]).expand(10, DATA_DIM).clone()
    parameters = list(vae.parameters())

    seen = []

    def record_and_zero(optimizer, args, kwargs):
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        assert {id(p) for p in trained} == {id(p) for p in parameters}
        seen.append(gradients(parameters).clone())
        for p in trained:
            p.grad.zero_()

    before = [p.detach().clone() for p in parameters]
    handle = register_optimizer_step_pre_hook(record_and_zero)
    try:
        pv.fit(vae, x, num_epochs=1, batch_size=4, loss=make_loss(), progress=False)
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, parameters, strict=True))
    assert len(seen) == 3

    for p in parameters:
        p.grad = None
    make_loss().loss_and_grads(vae.model, vae.guide, x)  # the whole data, no scaling
    expected = gradients(parameters)
    assert expected.abs().max() > 1.0  # gradients far from zero: the scale is measurable
    for step, gradient in enumerate(seen, start=1):
        torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12, msg=f"step {step}")


class RecordingEncoder(nn.Module):
    """A diagonal Normal encoder that keeps every batch it reads while gradients are on (the
    training steps, not any check fit makes up front)."""

    def __init__(self, data_dim: int) -> None:
        super().__init__()
        self.inner = pv.DiagonalNormalEncoder(data_dim, LATENT_DIM, (8,))
        self.latent_dim = LATENT_DIM
        self.batches: list[torch.Tensor] = []

    def forward(self, x):
        if torch.is_grad_enabled():
            self.batches.append(x.detach().clone())
        return self.inner(x)


def test_fit_binarizes_every_batch_afresh_with_the_pixel_values_as_probabilities():
    """Dynamic binarization: x ~ Bernoulli(pixels), drawn anew for every batch. 64 equal rows
    of 8 grey levels from 0.1 to 0.9, over 4 epochs: each feature's frequency of ones matches
    its grey level within standard errors, and no two epochs see the same set of rows."""
    levels = torch.linspace(0.1, 0.9, 8)
    x = levels.expand(64, 8).clone()
    vae = pv.VAE(8, LATENT_DIM, encoder=RecordingEncoder(8), hidden_dims=(8,))
    history = pv.fit(vae, x, num_epochs=4, batch_size=16, progress=False)
    assert history.binarized
    seen = torch.cat(vae.encoder.batches)
    assert seen.shape == (4 * 64, 8)
    assert set(seen.unique().tolist()) == {0.0, 1.0}
    standard_error = (levels * (1 - levels) / len(seen)).sqrt()
    assert ((seen.mean(0) - levels).abs() < 4 * standard_error).all(), seen.mean(0)
    # Each epoch's rows in a canonical order: a fixed binarization would repeat them.
    epochs = [sorted(map(tuple, epoch.tolist())) for epoch in seen.split(64)]
    assert all(epochs[i] != epochs[j] for i in range(4) for j in range(i))
