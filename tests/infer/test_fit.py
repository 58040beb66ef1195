"""fit(): it trains every parameter, lowers the loss, and refuses bad input before any work."""

import copy

import pyro
import pytest
import torch
from conftest import binary_data
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from test_vae import assert_every_parameter_moved, snapshot
from torch import nn
from torch.utils.data import TensorDataset

import pyro_vae as pv
from pyro_vae.infer.objective import Objective


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


class BinaryContinuousBernoulli(pv.ContinuousBernoulliLikelihood):
    """Not a Bernoulli, but a likelihood that declares binary data."""

    binary_data = True


@pytest.mark.parametrize(
    ("likelihood", "binarized"),
    [(pv.ContinuousBernoulliLikelihood, False), (BinaryContinuousBernoulli, True)],
)
def test_the_likelihood_s_binary_data_decides_the_dynamic_binarization(likelihood, binarized):
    vae = pv.VAE(64, 2, hidden_dims=(16,), likelihood=likelihood())
    history = pv.fit(vae, digits_subset(64), num_epochs=1, batch_size=32, progress=False)
    assert history.binarized == binarized


def test_fit_accepts_a_torch_dataset_of_images_with_labels():
    images = binary_data(40, 12).reshape(40, 3, 4)
    dataset = TensorDataset(images, torch.arange(40))
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    history = pv.fit(vae, dataset, num_epochs=2, batch_size=16, progress=False)
    assert len(history.loss) == 2


def test_fit_uses_the_param_store_as_svi_does_and_leaves_unrelated_entries_alone():
    pyro.param("users_own_parameter", torch.ones(2))
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    pv.fit(vae, binary_data(20, 12), num_epochs=1, batch_size=8, progress=False)
    store = pyro.get_param_store()
    assert torch.equal(store["users_own_parameter"], torch.ones(2))
    # The VAE's entries are its own tensors, under its own Pyro name, as SVI leaves them.
    own = {id(p) for p in vae.parameters()}
    entries = [name for name in store.keys() if name != "users_own_parameter"]
    assert entries and all(name.startswith(vae._pyro_name) for name in entries)
    assert all(id(store._params[name]) in own for name in entries)


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
    # One call for the construction check, one for fit's look at the model and guide before
    # training, then 4 steps per epoch: NaN at epoch 2, step 3.
    vae = pv.VAE(12, 2, hidden_dims=(8,), decoder=NaNAfter(nn.Linear(2, 12), 1 + 1 + 4 + 2))
    with pytest.raises(pv.TrainingDivergedError, match="epoch 2, step 3 of 4"):
        pv.fit(vae, x, num_epochs=3, batch_size=10, progress=False)
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def _sgd(parameters, lr=0.1, **options):
    return torch.optim.SGD(parameters, lr=lr, **options)


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
        (binary_data(8, 12), {"optimizer": "sgd"}, "optimizer must be a function"),
        (binary_data(8, 12), {"optimizer": lambda ps: ps}, "return a torch.optim.Optimizer"),
        (binary_data(8, 12), {"optimizer": lambda ps: _sgd(ps[:1])}, "lacks 7 of the 8"),
        # A late read needs an optimizer that skips a non-finite step on the device.
        (binary_data(8, 12), {"optimizer": _sgd, "log_every": 2}, "need a fused optimizer"),
        # Layouts and devices no operator of the model has kernels for, named up front.
        (binary_data(8, 12).to_sparse(), {}, r"data is a sparse_coo tensor.*to_dense\(\)"),
        (torch.zeros(8, 12, device="meta"), {}, "data is on the meta device.*no values"),
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


@pytest.mark.parametrize(
    ("options", "log_every"), [({}, None), ({"fused": True}, 3)], ids=["sgd", "fused-late-read"]
)
def test_fit_trains_with_the_optimizer_its_factory_makes(options, log_every):
    x = binary_data(20, 12)
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    by_hand = copy.deepcopy(vae)  # the same weights, under a Pyro name of its own
    made = []

    def factory(parameters):
        made.append(_sgd(parameters, **options))
        return made[-1]

    torch.manual_seed(0)
    shuffle = torch.Generator().manual_seed(1)
    pv.fit(vae, x, num_epochs=1, batch_size=20, optimizer=factory, generator=shuffle,
           log_every=log_every, progress=False)  # fmt: skip
    (optimizer,) = made
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["params"] == list(vae.parameters())
    # SGD's one step, by hand: the same batch (fit's shuffle of all 20) and the same draws of z.
    batch = x[torch.randperm(20, generator=torch.Generator().manual_seed(1))]
    objective = Objective(by_hand, Trace_ELBO())
    objective.parameters(batch, num_data=20)
    torch.manual_seed(0)
    objective.loss_and_grads(batch, num_data=20)
    for (name, trained), start in zip(vae.named_parameters(), by_hand.parameters(), strict=True):
        assert start.grad is not None and start.grad.abs().max() > 0, name
        torch.testing.assert_close(trained, (start - 0.1 * start.grad).detach(), msg=name)


class _Killed(Exception):
    """Stands in for a kill: raised from the checkpoint callback."""


def _fit_with_checkpoints(weights=None, resume=None, kill_at=None, seed=0, optimizer=None):
    pyro.set_rng_seed(seed)
    vae = pv.VAE(10, 2, hidden_dims=(8,))
    if weights is not None:
        vae.load_state_dict(weights)
    saved = []

    def checkpoint(state):
        # What the script writes to disk: copies, taken at this instant.
        saved.append((copy.deepcopy(state.to_dict()), copy.deepcopy(vae.state_dict())))
        if len(saved) == kill_at:
            raise _Killed

    x = torch.rand(50, 10, generator=torch.Generator().manual_seed(5))  # binarized each batch
    history = pv.fit(
        vae,
        x,
        num_epochs=3,
        batch_size=8,  # 7 steps per epoch
        kl_warmup_epochs=2,
        checkpoint=checkpoint,
        checkpoint_every=3,
        resume=resume,
        generator=torch.Generator().manual_seed(seed + 1),
        progress=False,
        optimizer=optimizer,
    )
    return vae, history, saved


@pytest.mark.parametrize(
    "optimizer",
    # The default Adam, and a factory's SGD whose momentum must come back from the checkpoint.
    [None, lambda parameters: _sgd(parameters, lr=0.01, momentum=0.9)],
    ids=["adam", "sgd-momentum"],
)
def test_resume_in_the_middle_of_an_epoch_ends_exactly_like_an_uninterrupted_fit(optimizer):
    reference, reference_history, _ = _fit_with_checkpoints(optimizer=optimizer)
    with pytest.raises(_Killed):
        _fit_with_checkpoints(kill_at=4, optimizer=optimizer)
    _, _, saved = _fit_with_checkpoints(kill_at=None, optimizer=optimizer)
    # The fourth checkpoint: global steps 3 and 6, the end of epoch 1, then step 2 of epoch 2.
    state, weights = saved[3]
    assert (state["epoch"], state["step"]) == (1, 2)
    assert state["optimizer"]["state"]  # Adam's moments, or SGD's momentum
    # Another seed and a fresh model: everything that matters must come from the checkpoint.
    resumed, history, _ = _fit_with_checkpoints(
        weights=weights, resume=pv.TrainingState.from_dict(state), seed=99, optimizer=optimizer
    )
    for (name, expected), actual in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name
    assert history.step_loss == reference_history.step_loss
    assert history.loss == reference_history.loss


def test_gradient_that_is_not_finite_stops_training_before_the_step(monkeypatch):
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    real = torch.nn.utils.get_total_norm
    calls = []

    def poisoned(grads, *args, **kwargs):  # the third step's gradient overflows
        calls.append(1)
        return torch.tensor(float("inf")) if len(calls) == 3 else real(grads, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", poisoned)
    saved = []
    with pytest.raises(pv.TrainingDivergedError, match="gradient norm is inf at epoch 1, step 3"):
        pv.fit(
            vae,
            binary_data(40, 6),
            num_epochs=1,
            batch_size=10,
            progress=False,
            checkpoint=lambda state: saved.append(copy.deepcopy(vae.state_dict())),
            checkpoint_every=1,
        )
    assert len(saved) == 2  # after steps 1 and 2; nothing of the diverged step 3
    assert any(not torch.equal(before[k], v) for k, v in saved[-1].items())
    for k, v in vae.state_dict().items():
        assert torch.equal(saved[-1][k], v), k  # step 3 was not applied


def test_clip_norm_bounds_the_gradient_norm(monkeypatch):
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    norms = []
    real_step = torch.optim.Adam.step

    def record_then_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record_then_step)
    pv.fit(vae, binary_data(40, 6), num_epochs=2, batch_size=10, clip_norm=0.5, progress=False)
    assert len(norms) == 8 and max(norms) <= 0.5 + 1e-9
    assert max(norms) > 0.49  # the clip was active: unclipped norms here are far above 0.5


def test_a_second_ctrl_c_stops_at_once():
    """The first Ctrl-C asks fit to finish its step and checkpoint; a second one, from a user
    who will not wait (say, for an epoch's evaluation), raises at once."""
    import os
    import signal

    from pyro_vae.infer.step import sigint_flag

    before = signal.getsignal(signal.SIGINT)  # a background CI job may start with it ignored
    with sigint_flag(enabled=True) as interrupted:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupted.is_set()  # the handler ran, and nothing was raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_each_epoch_loss_is_the_mean_of_that_epochs_step_losses():
    """history.loss[e] is epoch e's own mean, not a running mean since the start: the loss
    falls while training, so the two differ from the second epoch on."""
    x = binary_data(40, 12)
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    history = pv.fit(vae, x, num_epochs=3, batch_size=10, learning_rate=1e-2, progress=False)
    steps = history.step_loss
    assert len(steps) == 12 and len(history.loss) == 3
    for epoch, loss in enumerate(history.loss):
        own = steps[4 * epoch : 4 * epoch + 4]
        assert loss == pytest.approx(sum(own) / 4, rel=1e-12)
    assert history.loss[2] != pytest.approx(sum(steps) / len(steps), rel=1e-3)


def test_sparse_data_in_a_tuple_and_a_model_on_the_meta_device_are_refused_naming_them():
    x = binary_data(8, 12)
    cvae = pv.ConditionalVAE(12, 4, 2, hidden_dims=(8,))
    with pytest.raises(ValueError, match=r"data\[1\] is a sparse_coo tensor.*data\[1\]\.to_dense"):
        pv.fit(cvae, (x, torch.rand(8, 4).to_sparse()), num_epochs=1, batch_size=4)
    meta = pv.VAE(12, 2, hidden_dims=(8,)).to("meta")
    with pytest.raises(ValueError, match="the model is on the meta device"):
        pv.fit(meta, x, num_epochs=1, batch_size=4, progress=False)


@pytest.mark.parametrize("stream", [False, True], ids=["tensor", "dataset"])
def test_a_batch_larger_than_the_data_is_all_of_it_however_large(stream):
    # 2**64 is an int argparse and fit accept; torch's index arithmetic overflows on it.
    x = binary_data(30, 16, 0.5)
    data = TensorDataset(x) if stream else x
    histories = []
    for batch_size in (30, 2**64):
        torch.manual_seed(0)  # the same initial weights for both
        vae = pv.build_vae(16, 2, hidden_dims=(8,))
        histories.append(
            pv.fit(
                vae,
                data,
                num_epochs=2,
                batch_size=batch_size,
                progress=False,
                generator=torch.Generator().manual_seed(1),
            )
        )
    whole, huge = histories
    assert len(huge.step_loss) == 2  # one step per epoch
    assert huge.step_loss == whole.step_loss
