"""The VAE's model and guide: shapes, the component contract, and training through a user's own
SVI loop (docs/design.md: Pyro names, global latents, β)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import binary_data
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_vae as pv


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_every_parameter_moved(before: dict, module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"


def train_with_user_svi_loop(vae: pv.VAE, x: torch.Tensor, num_steps: int = 5) -> None:
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(num_steps):
        svi.step(x)


def test_shapes_of_encode_reconstruct_sample():
    vae = pv.VAE(12, 3, hidden_dims=(8, 8))
    x = binary_data(4, 12)
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (4, 3)
    assert (scale > 0).all()
    reconstruction = vae.reconstruct(x)
    assert reconstruction.shape == (4, 12)
    assert ((reconstruction >= 0) & (reconstruction <= 1)).all()
    assert vae.sample(7).shape == (7, 12)


def test_model_and_guide_sites_live_in_the_data_plate_scaled_to_num_data():
    vae = pv.VAE(12, 3, hidden_dims=(8,))
    x = binary_data(4, 12)
    guide_trace = poutine.trace(vae.guide).get_trace(x, num_data=100)
    model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x, 100)
    for trace, names in ((model_trace, ("z", "x")), (guide_trace, ("z",))):
        for name in names:
            site = trace.nodes[name]
            assert [f.name for f in site["cond_indep_stack"]] == ["data"]
            assert site["scale"] == 25.0
    assert model_trace.nodes["x"]["is_observed"]
    assert model_trace.nodes["z"]["fn"].batch_shape == (4,)


def test_num_data_smaller_than_batch_is_rejected():
    vae = pv.VAE(12, 3, hidden_dims=(8,))
    with pytest.raises(ValueError, match="num_data=2 is smaller than the batch of 4"):
        vae.model(binary_data(4, 12), num_data=2)


def test_user_svi_loop_trains_every_parameter():
    vae = pv.VAE(12, 3, hidden_dims=(8,))
    before = snapshot(vae)
    train_with_user_svi_loop(vae, binary_data(16, 12))
    assert_every_parameter_moved(before, vae)


def test_two_models_in_one_process_both_train_without_clearing_the_param_store():
    x = binary_data(16, 12)
    first = pv.VAE(12, 3, hidden_dims=(8,))
    first_before = snapshot(first)
    train_with_user_svi_loop(first, x)
    second = pv.VAE(12, 3, hidden_dims=(8,))  # same architecture, so same child names
    second_before = snapshot(second)
    train_with_user_svi_loop(second, x)
    assert_every_parameter_moved(first_before, first)
    assert_every_parameter_moved(second_before, second)


def test_beta_scales_the_z_site_in_model_and_guide():
    vae = pv.VAE(12, 3, hidden_dims=(8,), beta=0.25)
    x = binary_data(4, 12)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x)
    assert guide_trace.nodes["z"]["scale"] == 0.25
    assert model_trace.nodes["z"]["scale"] == 0.25
    assert model_trace.nodes["x"]["scale"] == 1.0


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_beta_must_be_positive_and_finite(beta):
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        pv.VAE(12, 3, beta=beta)


class BayesianDecoder(PyroModule):
    """A linear decoder whose weights are global latent variables with a Normal prior."""

    def __init__(self, latent_dim: int, data_dim: int) -> None:
        super().__init__()
        self.linear = PyroModule[nn.Linear](latent_dim, data_dim)
        self.linear.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([data_dim, latent_dim]).to_event(2)
        )
        self.linear.bias = PyroSample(dist.Normal(0.0, 1.0).expand([data_dim]).to_event(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


def test_bayesian_decoder_weights_are_sampled_once_outside_the_data_plate():
    vae = pv.VAE(12, 3, hidden_dims=(8,), decoder=BayesianDecoder(3, 12))
    x = binary_data(6, 12)
    trace = poutine.trace(vae.model).get_trace(x, num_data=60)
    weight_sites = [n for n in trace.nodes if n.endswith(("linear.weight", "linear.bias"))]
    assert len(weight_sites) == 2
    for name in weight_sites:
        assert trace.nodes[name]["cond_indep_stack"] == ()  # global: not scaled by N/B
        assert trace.nodes[name]["scale"] == 1.0
    assert trace.nodes["x"]["fn"].batch_shape == (6,)
    assert torch.isfinite(trace.log_prob_sum())

    # The extension a user writes: the amortized guide for z plus a guide for the weights.
    weights_guide = AutoNormal(poutine.block(vae.model, expose=weight_sites))

    def guide(x, num_data=None):
        weights_guide(x, num_data)
        vae.guide(x, num_data)

    svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x, 60) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


class WrongEventPrior(nn.Module):
    def forward(self):
        return dist.Normal(torch.zeros(3), 1.0)  # batch (3,), event (): forgot .to_event(1)


class WrongEventEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(12, 3)

    def forward(self, x):
        return dist.Normal(self.net(x), 1.0)


class NotReparameterizedEncoder(WrongEventEncoder):
    def forward(self, x):
        return dist.Bernoulli(logits=self.net(x)).to_event(1)


class WrongBatchDecoder(nn.Module):
    def forward(self, z):
        return z.sum(0)


class WrongEventLikelihood(nn.Module):
    def forward(self, logits):
        return dist.Bernoulli(logits=logits[..., :5]).to_event(1)


@pytest.mark.parametrize(
    ("keyword", "part", "message"),
    [
        ("prior", WrongEventPrior(), r"^prior: .*event_shape"),
        ("encoder", WrongEventEncoder(), r"^encoder: .*event_shape"),
        ("encoder", NotReparameterizedEncoder(), r"^encoder: .*has_rsample"),
        ("decoder", WrongBatchDecoder(), r"^decoder: "),
        ("likelihood", WrongEventLikelihood(), r"^likelihood: .*event_shape \(12,\)"),
    ],
)
def test_parts_breaking_the_contract_are_rejected_naming_the_part(keyword, part, message):
    with pytest.raises(ValueError, match=message):
        pv.VAE(12, 3, hidden_dims=(8,), **{keyword: part})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.tensor([[0.0, 1.0, float("nan")]]), "NaN or infinite values"),
        (torch.tensor([[0.0, float("inf"), 1.0]]), "NaN or infinite values"),
        (torch.zeros(2, 4), r"shape \(N, 3\)"),
        (torch.zeros(2, 3, 1), r"shape \(N, 3\)"),
        (torch.zeros(0, 3), "empty"),
        (torch.zeros(2, 3, dtype=torch.long), "floating dtype"),
        (torch.tensor([[0.0, 1.3, 1.0]]), r"outside the support .*feature 1 = 1.3"),
        ([[0.0, 1.0, 1.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_data_is_rejected_naming_the_problem(data, message):
    vae = pv.VAE(3, 2, hidden_dims=(4,))
    with pytest.raises(ValueError, match=message):
        vae.validate_data(data)


@pytest.mark.parametrize(
    ("bad", "message"),
    [(float("nan"), r"NaN or infinite values \(first in example 1002\)"),
     (0.5, r"outside the support .*first in example 1002: feature 2 = 0.5")],
)  # fmt: skip
def test_a_chunk_of_a_larger_set_names_its_bad_row_by_its_place_in_the_whole_set(bad, message):
    # A set checked a chunk at a time (a streamed training file) counts rows from first_row.
    chunk = torch.zeros(5, 3)
    chunk[2, 2] = bad
    vae = pv.VAE(3, 2, hidden_dims=(4,))
    with pytest.raises(ValueError, match=message):
        vae.validate_data(chunk, first_row=1000)
