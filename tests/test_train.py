"""fit(): it trains every parameter, lowers the loss, and refuses bad input before any work."""

import pyro
import pytest
import torch
from conftest import binary_data
from pyro.infer import RenyiELBO, TraceMeanField_ELBO
from test_model import assert_every_parameter_moved, snapshot
from torch import nn
from torch.utils.data import TensorDataset

import pyro_vae as pv


def digits_subset(num: int = 300) -> torch.Tensor:
    return pv.load_dataset("digits", dtype=torch.float64).x_train[:num]


def test_fit_moves_every_parameter_and_raises_the_elbo():
    x = pv.binarize(digits_subset(), torch.Generator().manual_seed(0))
    vae = pv.VAE(64, 4, hidden_dims=(32,))
    before = snapshot(vae)
    elbo_before = pv.elbo(vae, x, num_particles=10)
    history = pv.fit(vae, x, num_epochs=15, batch_size=32, learning_rate=3e-3, progress=False)
    elbo_after = pv.elbo(vae, x, num_particles=10)
    assert_every_parameter_moved(before, vae)
    gain = elbo_after - elbo_before
    assert gain.mean() > 4 * gain.std() / len(x) ** 0.5
    assert history.num_epochs == 15 and len(history.step_loss) == 15 * 10
    assert history.loss[-1] < history.loss[0]
    assert not history.binarized  # the data were binary already


def test_fit_binarizes_grayscale_dynamically_for_bernoulli():
    vae = pv.VAE(64, 2, hidden_dims=(16,))
    history = pv.fit(vae, digits_subset(64), num_epochs=1, batch_size=32, progress=False)
    assert history.binarized


def test_fit_accepts_a_torch_dataset_of_images_with_labels():
    images = binary_data(40, 12).reshape(40, 3, 4)
    dataset = TensorDataset(images, torch.arange(40))
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    history = pv.fit(vae, dataset, num_epochs=2, batch_size=16, progress=False)
    assert len(history.loss) == 2


def test_fit_leaves_the_global_param_store_untouched():
    pyro.param("users_own_parameter", torch.ones(2))
    pv.fit(
        pv.VAE(12, 2, hidden_dims=(8,)),
        binary_data(20, 12),
        num_epochs=1,
        batch_size=8,
        progress=False,
    )
    assert list(pyro.get_param_store().keys()) == ["users_own_parameter"]


@pytest.mark.parametrize("loss", [TraceMeanField_ELBO(), RenyiELBO(alpha=0, num_particles=3)])
def test_fit_takes_other_pyro_objectives(loss):
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    before = snapshot(vae)
    history = pv.fit(
        vae, binary_data(32, 12), num_epochs=2, batch_size=16, loss=loss, progress=False
    )
    assert all(torch.isfinite(torch.tensor(history.step_loss)))
    assert_every_parameter_moved(before, vae)


class NaNAfter(nn.Module):
    """A decoder that starts returning NaN on its n-th call."""

    def __init__(self, net: nn.Module, calls_before_nan: int) -> None:
        super().__init__()
        self.net, self.calls_left = net, calls_before_nan

    def forward(self, z):
        self.calls_left -= 1
        out = self.net(z)
        return out * float("nan") if self.calls_left < 0 else out


def test_nan_loss_names_epoch_and_step_and_keeps_the_last_finite_parameters():
    x = binary_data(40, 12)
    # One call for the construction check, then 4 steps per epoch: NaN at epoch 2, step 3.
    vae = pv.VAE(12, 2, hidden_dims=(8,), decoder=NaNAfter(nn.Linear(2, 12), 1 + 4 + 2))
    with pytest.raises(pv.TrainingDivergedError, match="epoch 2, step 3 of 4"):
        pv.fit(vae, x, num_epochs=3, batch_size=10, progress=False)
    assert all(torch.isfinite(p).all() for p in vae.parameters())


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (torch.full((8, 12), float("nan")), {}, "NaN or infinite"),
        (torch.zeros(8, 11), {}, r"shape \(N, 12\)"),
        (torch.full((8, 12), 1.3), {}, r"\[0, 1\].*feature 0 = 1.3"),
        (torch.full((8, 12), 1.3), {"binarize": False}, "outside the support"),
        (binary_data(8, 12), {"num_epochs": 0}, "num_epochs must be a positive integer"),
        (binary_data(8, 12), {"batch_size": -4}, "batch_size must be a positive integer"),
        (binary_data(8, 12), {"learning_rate": float("nan")}, "learning_rate must be"),
        (binary_data(8, 12), {"loss": "elbo"}, "loss must be a pyro.infer.ELBO"),
        ("not data", {}, "must be a torch.Tensor"),
    ],
)
def test_bad_input_is_rejected_before_any_parameter_changes(data, kwargs, message):
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    before = snapshot(vae)
    arguments = {"num_epochs": 1, "batch_size": 4, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        pv.fit(vae, data, **arguments)
    for name, p in vae.named_parameters():
        assert torch.equal(before[name], p)
