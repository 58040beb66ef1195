"""A model of one's own (issue 24, item 4): fit takes a (model, guide) pair of functions, refuses
a model without num_data or without the N/B scale in a message that shows the plate, takes a
TensorDataset's tensors as the model's arguments, and the README's worked example (a Bayesian
linear regression with AutoNormal) runs as written and finds the exact posterior."""

from __future__ import annotations

import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from torch.utils.data import Dataset, TensorDataset

import pyro_vae as pv

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The first python block of the README's section "A model of your own"."""
    section = README.read_text().split("### A model of your own", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


def test_the_readme_example_runs_as_written_and_finds_the_exact_posterior():
    """The model is conjugate: w | x, y ~ N(Λ⁻¹ xᵀy / σ², Λ⁻¹) with Λ = xᵀx / σ² + I / s²
    (σ = 1, s = 0.5). A mean-field Normal's optimum for a Normal posterior has the exact mean
    and the scales Λ_ii^(-1/2). The tolerance is the posterior's own SD: the last iterate of
    the README's run jitters about the optimum by 0.3 of it at most (4 seeds measured), and a
    model weighed by the batch alone (num_data = B) lands 5 SDs away."""
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    x, y, guide = namespace["x"], namespace["y"], namespace["guide"]
    precision = x.T @ x + torch.eye(3) / 0.5**2
    covariance = torch.linalg.inv(precision)
    exact_mean, posterior_sd = covariance @ (x.T @ y), covariance.diagonal().sqrt()
    mean = guide.median()["w"].detach()
    assert ((mean - exact_mean).abs() < posterior_sd).all(), (mean, exact_mean, posterior_sd)
    # The scales: those of the mean-field optimum, to the jitter measured (within 15%).
    ratio = guide.scales.w.detach() / precision.diagonal().rsqrt()
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio


def regression(x, y, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", size=num_data, subsample=x):
        pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def regression_data(num: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(num, 2)
    return x, x @ torch.tensor([1.0, -1.0]) + torch.randn(num)


def test_fit_takes_a_pair_of_functions_and_trains_the_autoguide():
    guide = AutoNormal(regression)
    pv.fit((regression, guide), regression_data(), num_epochs=5, batch_size=10, learning_rate=0.05)
    # AutoNormal starts every scale at 0.1 (init_scale): they moved, so they were trained.
    assert (guide.scales.w - 0.1).abs().min() > 1e-3


def test_one_function_is_refused_with_how_to_pass_the_pair():
    with pytest.raises(ValueError, match=r"fit\(\(model, guide\), data") as raised:
        pv.fit(regression, regression_data(), num_epochs=1, batch_size=10)
    assert "regression" in str(raised.value) and "AutoNormal" in str(raised.value)
    with pytest.raises(ValueError, match=r"fit\(\(model, guide\), data"):
        pv.fit(object(), regression_data(), num_epochs=1, batch_size=10)


def test_a_model_or_guide_without_num_data_gets_the_contract_and_the_plate():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    def guide(x, y):
        pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    for pair, role in (((model, AutoNormal(model)), "model"), ((regression, guide), "guide")):
        with pytest.raises(ValueError) as raised:
            pv.fit(pair, regression_data(), num_epochs=1, batch_size=10)
        message = str(raised.value)
        assert message.startswith(f"the {role} ") and "takes no num_data" in message
        assert "model(*batch, num_data=N)" in message
        assert 'pyro.plate("data", size=num_data, subsample=x)' in message


def test_a_plate_over_the_batch_alone_is_refused_on_a_minibatch():
    def model(x, y, num_data=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", len(x)):  # forgets num_data: weighs B rows, not N
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    guide = AutoNormal(model)
    with pytest.raises(ValueError, match="not scaled by N/B") as raised:
        pv.fit((model, guide), regression_data(), num_epochs=1, batch_size=10)
    assert 'pyro.plate("data", size=num_data, subsample=x)' in str(raised.value)
    # The whole data in one batch needs no scale: trained as it is.
    pyro.clear_param_store()
    pv.fit((model, AutoNormal(model)), regression_data(), num_epochs=1, batch_size=40)


@pytest.mark.parametrize(
    "plate",
    [
        lambda x, num_data: pyro.plate("data", size=num_data, subsample=x),
        lambda x, num_data: pyro.plate("data", num_data, subsample_size=len(x)),
    ],
    ids=["subsample", "subsample_size"],
)
def test_both_plate_idioms_the_message_shows_weigh_a_batch_by_n_over_b(plate):
    """The model's log-density of a batch of B of N rows is the prior's plus N/B times the
    batch's log-likelihood, as the contract says; and fit accepts the model."""

    def model(x, y, num_data=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with plate(x, num_data):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    x, y = regression_data(40)
    w = torch.tensor([0.3, -0.2])
    batch = (x[:8], y[:8])
    trace = poutine.trace(poutine.condition(model, {"w": w})).get_trace(*batch, num_data=40)
    expected = (
        dist.Normal(0.0, 1.0).log_prob(w).sum()
        + 40 / 8 * dist.Normal(batch[0] @ w, 1.0).log_prob(batch[1]).sum()
    )
    assert torch.allclose(trace.log_prob_sum(), expected)
    pv.fit((model, AutoNormal(model)), (x, y), num_epochs=1, batch_size=8, progress=False)


def test_a_tensor_dataset_is_the_models_arguments_as_a_tuple_is():
    x, y = regression_data()
    trained = []
    for data in ((x, y), TensorDataset(x, y)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoNormal(regression)
        pv.fit(
            (regression, guide),
            data,
            num_epochs=3,
            batch_size=10,
            progress=False,
            generator=torch.Generator().manual_seed(1),
        )
        trained.append(torch.cat([guide.locs.w.detach(), guide.scales.w.detach()]))
    assert torch.equal(trained[0], trained[1])


def test_another_dataset_for_a_model_without_data_dim_says_to_pass_a_tensor_dataset():
    class Rows(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(2), torch.zeros(())

    with pytest.raises(ValueError, match="TensorDataset"):
        pv.fit((regression, AutoNormal(regression)), Rows(), num_epochs=1, batch_size=2)
