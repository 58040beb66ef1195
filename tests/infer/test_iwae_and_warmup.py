"""Objectives beyond Trace_ELBO: the importance-weighted bound and IWAE training, and the KL
warm-up schedule."""

import math

import pyro
import pytest
import torch
from conftest import binary_data
from pyro.infer import RenyiELBO

import pyro_vae as pv
from pyro_vae.infer.objective import Objective


def untrained_vae() -> pv.VAE:
    # An untrained encoder is a poor proposal, so more importance samples help a lot: a bound
    # that did not rise with K would show.
    return pv.VAE(10, 2, hidden_dims=(16,))


def test_iwae_bound_is_above_the_elbo_and_rises_with_k():
    vae, x = untrained_vae(), binary_data(20, 10)
    repeats = 200
    bounds = {}
    for k in (1, 5, 50):
        draws = torch.stack([pv.log_likelihood(vae, x, num_particles=k) for _ in range(repeats)])
        bounds[k] = draws.mean(1)  # the dataset's mean bound, once per repeat
    elbo = torch.stack([pv.elbo(vae, x) for _ in range(repeats)]).mean(1)

    def difference_and_error(a, b):
        d = a - b
        return d.mean(), d.std() / math.sqrt(len(d))

    # K = 1 is the ELBO: equal in expectation.
    gap, error = difference_and_error(bounds[1], elbo)
    assert gap.abs() < 4 * error
    # Each step up in K raises the bound, by much more than the estimates' standard errors.
    for low, high in ((1, 5), (5, 50)):
        gain, error = difference_and_error(bounds[high], bounds[low])
        assert gain > 4 * error > 0, (low, high, gain, error)


@pytest.mark.slow
def test_fit_trains_iwae_on_minibatches_with_the_scale_outside_the_logsumexp():
    """docs/design.md, "IWAE and N/B": with the N/B minibatch scale inside RenyiELBO's
    log-sum-exp, the per-example loss is not −log p̂_K(x). fit's steps must estimate exactly that
    quantity."""
    vae, x = untrained_vae(), binary_data(64, 10)
    k, batch_size = 10, 8
    # A vanishing learning rate: the model stays put while the steps estimate its loss.
    history = pv.fit(
        vae,
        x,
        num_epochs=40,
        batch_size=batch_size,
        learning_rate=1e-12,
        loss=RenyiELBO(alpha=0, num_particles=k),
        progress=False,
    )
    steps = torch.tensor(history.step_loss)
    bound = torch.stack([pv.log_likelihood(vae, x, num_particles=k).mean() for _ in range(200)])
    difference = steps.mean() + bound.mean()
    error = math.sqrt(steps.var() / len(steps) + bound.var() / len(bound))
    assert difference.abs() < 4 * error, (steps.mean(), -bound.mean(), error)

    # With the scale inside (what RenyiELBO does given num_data), the estimate is far off.
    scaled_inside = [
        RenyiELBO(alpha=0, num_particles=k).loss(vae.model, vae.guide, batch, len(x)) / len(x)
        for batch in x.split(batch_size)
        for _ in range(20)
    ]
    wrong = torch.tensor(scaled_inside)
    assert (wrong.mean() + bound.mean()).abs() > 10 * error


def test_kl_warmup_raises_beta_linearly_then_restores_it():
    vae, x = untrained_vae(), binary_data(40, 10)
    vae.beta = 2.0
    seen = []
    pv.fit(
        vae,
        x,
        num_epochs=6,
        batch_size=10,  # 4 steps per epoch
        kl_warmup_epochs=4,
        callback=lambda epoch, history: seen.append(vae.beta),
        progress=False,
    )
    # β at the end of each epoch: step 4e of 16 warm-up steps, then the target.
    assert seen == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert vae.beta == 2.0


def test_kl_warmup_restores_beta_when_training_stops_early():
    vae, x = untrained_vae(), binary_data(40, 10)
    seen = []

    def stop(epoch, history):
        seen.append(vae.beta)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pv.fit(
            vae, x, num_epochs=5, batch_size=10, kl_warmup_epochs=4, callback=stop, progress=False
        )
    assert seen == [0.25]  # stopped after epoch 1 of the warm-up, with β part-way up
    assert vae.beta == 1.0


def test_warmup_beta_reaches_the_loss():
    """β during warm-up scales the KL of the loss fit optimizes: the first step's loss, taken
    at β = 1/16, matches the −β-ELBO computed by hand with the same draw of z."""
    vae, x = untrained_vae(), binary_data(16, 10)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(16, generator=generator)[:4]
    batch = x[order]
    history_steps = []
    pyro.set_rng_seed(3)
    snapshot = {k: v.clone() for k, v in vae.state_dict().items()}
    pv.fit(
        vae,
        x,
        num_epochs=1,
        batch_size=4,
        kl_warmup_epochs=4,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        callback=lambda e, h: history_steps.extend(h.step_loss),
    )
    vae.load_state_dict(snapshot)
    vae.beta = 1 / 16
    pyro.set_rng_seed(3)
    expected = pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, batch, 16) / 16
    assert abs(history_steps[0] - expected) < 1e-9 * abs(expected)


def test_iwae_loss_handed_to_ddp_has_the_value_of_pyros_loss():
    """Under DDP the loss comes out of Objective.differentiable_loss, and the loss fit records
    is that tensor's value. For RenyiELBO it is built from the surrogate Pyro back-propagates,
    whose value is not the loss (each particle is weighted by its detached normalized weight):
    its value must be Pyro's loss, scaled by N/B, for the same draws; its gradient the
    surrogate's, which is that of loss_and_grads."""
    x, num_data = binary_data(6, 10), 60
    vae = untrained_vae()
    objective = Objective(vae, RenyiELBO(alpha=0, num_particles=4))
    parameters = objective.parameters(x, num_data=num_data)
    pyro.set_rng_seed(5)
    differentiable = objective.differentiable_loss(x, num_data=num_data)
    differentiable.backward()
    gradients = [p.grad.clone() for p in parameters]
    for parameter in parameters:
        parameter.grad = None
    pyro.set_rng_seed(5)
    value = objective.loss_and_grads(x, num_data=num_data)
    pyro.set_rng_seed(5)
    pyros = RenyiELBO(alpha=0, num_particles=4).loss(vae.model, vae.guide, x) * num_data / len(x)
    assert float(differentiable.detach()) == pytest.approx(pyros, rel=1e-12)
    assert value == pytest.approx(pyros, rel=1e-12)
    for gradient, parameter in zip(gradients, parameters, strict=True):
        torch.testing.assert_close(gradient, parameter.grad, rtol=1e-10, atol=1e-12)
