"""The one training core: fit trains every parameter Pyro finds in a model and its guide (the
same set as a user's SVI loop, with the same numbers), refuses a model whose latent sites have
no guide, and gets a Bayesian linear regression's exact posterior with no VAE at all."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import binary_data
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam, pyro_method
from test_vae import (
    BayesianDecoder,
    assert_every_parameter_moved,
    snapshot,
    train_with_user_svi_loop,
)
from torch import nn

import pyro_vae as pv


def test_a_latent_site_without_a_guide_is_refused_before_any_step():
    vae = pv.VAE(12, 3, hidden_dims=(8,), decoder=BayesianDecoder(3, 12))
    before = snapshot(vae)
    with pytest.raises(
        ValueError,
        match=r"'vae_\d+\.decoder\.linear\.weight', 'vae_\d+\.decoder\.linear\.bias' have no",
    ) as e:
        pv.fit(vae, binary_data(20, 12), num_epochs=1, batch_size=10, progress=False)
    assert "guide() method" in str(e.value)  # says how to give it one
    for name, p in vae.named_parameters():
        assert torch.equal(before[name], p), name


def svi_parameters(module, *args, **kwargs) -> set[int]:
    """The ids of the tensors pyro.infer.SVI optimizes, found the way SVI.step finds them."""
    with poutine.trace(param_only=True) as capture:
        Trace_ELBO().loss_and_grads(module.model, module.guide, *args, **kwargs)
    return {id(site["value"].unconstrained()) for site in capture.trace.nodes.values()}


def test_fit_and_a_users_svi_loop_train_the_same_parameters_to_the_same_values():
    x = binary_data(24, 12)
    vae = pv.build_vae(12, 3, hidden_dims=(8,), decoder="bayesian")
    found = pv.Objective(vae, Trace_ELBO()).parameters(x, num_data=24)
    assert {id(p) for p in found} == svi_parameters(vae, x, num_data=24)
    assert {id(p) for p in found} == {id(p) for p in vae.parameters()}

    twin = copy.deepcopy(vae)
    # fit: one full batch per epoch, shuffled by its generator; SVI gets the same shuffles.
    pyro.set_rng_seed(1)
    pv.fit(
        vae,
        x,
        num_epochs=3,
        batch_size=24,
        learning_rate=0.01,
        progress=False,
        generator=torch.Generator().manual_seed(2),
    )
    pyro.set_rng_seed(1)
    svi = SVI(twin.model, twin.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    shuffles = torch.Generator().manual_seed(2)
    for _ in range(3):
        svi.step(x[torch.randperm(24, generator=shuffles)], num_data=24)
    for (name, trained), (_, by_svi) in zip(
        vae.named_parameters(), twin.named_parameters(), strict=True
    ):
        assert torch.allclose(trained, by_svi, rtol=0, atol=1e-12), name


def test_every_parameter_of_a_bayesian_vae_moves_between_epoch_1_and_epoch_3():
    x = pv.load_dataset("digits", dtype=torch.float64).x_train
    vae = pv.build_vae(64, 4, decoder="bayesian")
    after_epoch: dict[int, dict] = {}

    def keep(epoch, history):
        after_epoch[epoch] = snapshot(vae)

    pv.fit(vae, x, num_epochs=3, batch_size=128, callback=keep, progress=False)
    names = [name for name, _ in vae.named_parameters()]
    assert any(name.startswith("decoder.raw_scales") for name in names)
    assert any(name.startswith("decoder.locs") for name in names)
    assert_every_parameter_moved(after_epoch[1], vae)


class OrthogonalLinearRegression(PyroModule):
    """y = X w + noise, w ~ N(0, prior_scale² I), with a mean-field Normal guide on w."""

    def __init__(self, dim: int, prior_scale: float, noise: float) -> None:
        super().__init__()
        self.prior_scale, self.noise = prior_scale, noise
        self.loc = PyroParam(torch.zeros(dim))
        self.scale = PyroParam(torch.ones(dim), constraint=dist.constraints.positive)

    @pyro_method
    def model(self, X, y, num_data=None):
        w = pyro.sample("w", dist.Normal(0.0, self.prior_scale).expand([X.shape[1]]).to_event(1))
        with pyro.plate("data", size=num_data, subsample=X):
            pyro.sample("y", dist.Normal((X * w).sum(-1), self.noise), obs=y)

    @pyro_method
    def guide(self, X, y, num_data=None):
        pyro.sample("w", dist.Normal(self.loc, self.scale).to_event(1))


@pytest.mark.slow
def test_bayesian_linear_regression_through_fit_reaches_the_exact_posterior():
    """Orthogonal columns make the exact posterior factorize, so the mean-field optimum is the
    posterior itself: mean_j = (x_jᵀ y / σ²) / λ_j and sd_j = λ_j^(-1/2), with precision
    λ_j = x_jᵀ x_j / σ² + 1 / s². Minibatches (B < N) exercise the N/B scale."""
    num_data, dim, prior_scale, noise = 400, 3, 2.0, 0.5
    q, _ = torch.linalg.qr(torch.randn(num_data, dim))
    X = q * torch.tensor([4.0, 2.0, 1.0])  # orthogonal columns of different lengths
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + noise * torch.randn(num_data)
    precision = (X * X).sum(0) / noise**2 + 1 / prior_scale**2
    exact_mean, exact_sd = (X.T @ y / noise**2) / precision, precision.rsqrt()

    regression = OrthogonalLinearRegression(dim, prior_scale, noise)
    loss = TraceMeanField_ELBO(num_particles=16, vectorize_particles=True)
    pv.fit(regression, (X, y), num_epochs=300, batch_size=100, learning_rate=0.05, loss=loss)
    # The last iterates of a constant-step optimizer jitter around the optimum: their spread
    # is the standard error of any one of them.
    iterates: list[torch.Tensor] = []

    def record(epoch, history):
        iterates.append(torch.cat([regression.loc, regression.scale]).detach().clone())

    pv.fit(
        regression,
        (X, y),
        num_epochs=200,
        batch_size=100,
        learning_rate=0.005,
        loss=loss,
        callback=record,
    )
    stacked = torch.stack(iterates)
    estimate, spread = stacked.mean(0), stacked.std(0)
    exact = torch.cat([exact_mean, exact_sd])
    assert ((estimate - exact).abs() < 4 * spread).all(), (estimate, exact, spread)


def test_parameters_an_autoguide_creates_on_its_first_call_are_trained():
    regression = OrthogonalLinearRegression(2, 1.0, 0.5)
    guide = AutoNormal(regression.model)

    class WithAutoGuide(nn.Module):
        def model(self, X, y, num_data=None):
            regression.model(X, y, num_data)

        def guide(self, X, y, num_data=None):
            guide(X, y, num_data)

    X, y = torch.randn(50, 2), torch.randn(50)
    pv.fit(WithAutoGuide(), (X, y), num_epochs=20, batch_size=50, learning_rate=0.05)
    # AutoNormal starts every scale at 0.1 (init_scale): it moved, so it was optimized.
    assert (guide.scales.w - 0.1).abs().min() > 1e-3


def test_a_deep_copy_trains_on_its_own_with_svi_and_with_fit():
    x = binary_data(16, 12)
    original = pv.VAE(12, 3, hidden_dims=(8,))
    train_with_user_svi_loop(original, x)  # the param store now holds the original's tensors
    frozen = snapshot(original)
    for train in (
        train_with_user_svi_loop,
        lambda vae, x: pv.fit(vae, x, num_epochs=2, batch_size=8, progress=False),
    ):
        duplicate = copy.deepcopy(original)
        assert duplicate._pyro_name != original._pyro_name
        before = snapshot(duplicate)
        train(duplicate, x)
        assert_every_parameter_moved(before, duplicate)
        for name, p in original.named_parameters():
            assert torch.equal(frozen[name], p), name


def test_a_model_rebuilt_from_its_checkpoint_in_the_same_process_trains_on_its_own(tmp_path):
    x = binary_data(16, 12)
    config = {"data_dim": 12, "latent_dim": 3, "hidden_dims": [8], "decoder": "bayesian"}
    original = pv.build_vae(**config)
    pv.fit(original, x, num_epochs=1, batch_size=8, progress=False)
    pv.save_checkpoint(tmp_path / "c.pt", original, config)
    frozen = snapshot(original)
    rebuilt, _ = pv.load_checkpoint(tmp_path / "c.pt")
    for name, p in rebuilt.named_parameters():
        assert torch.equal(frozen[name], p), name  # the weight posterior came back
    train_with_user_svi_loop(rebuilt, x)
    assert_every_parameter_moved(frozen, rebuilt)
    for name, p in original.named_parameters():
        assert torch.equal(frozen[name], p), name
