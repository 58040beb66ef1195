"""The compiled step (pyro_vae.infer.compiled): the same loss and gradients as Pyro's eager step
under the same random numbers, β as an input, and an eager fallback that says why."""

import copy
import itertools
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import binary_data
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

import pyro_vae as pv
import pyro_vae.infer.compiled as compiled_module
from pyro_vae.infer.compiled import CompiledStep, _compile_mode
from pyro_vae.infer.objective import Objective

DATA_DIM, LATENT_DIM, BATCH, NUM_DATA = 16, 3, 6, 30

DATA = {
    "bernoulli": lambda: binary_data(BATCH, DATA_DIM, 0.5),
    "continuous-bernoulli": lambda: torch.rand(BATCH, DATA_DIM),
    "normal": lambda: torch.randn(BATCH, DATA_DIM),
    "laplace": lambda: torch.randn(BATCH, DATA_DIM) + 5.0,
    "discretized-logistic": lambda: torch.randint(0, 256, (BATCH, DATA_DIM)) / 255.0,
}
# The VampPrior refuses encoders without a density everywhere (test_components).
REFUSED = {("vamp", "iaf"), ("vamp", "delta")}


def one_step(module, batch, *, compiled, seed=1, backend="eager", loss=None):
    """Loss, gradients and torch's random state after one step from ``torch.manual_seed(seed)``;
    the warnings it gave."""
    objective = Objective(module, Trace_ELBO() if loss is None else loss)
    parameters = objective.parameters(*batch, num_data=NUM_DATA)
    for parameter in parameters:
        parameter.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stepper = CompiledStep(objective, backend=backend) if compiled else objective
        torch.manual_seed(seed)
        value = float(stepper.loss_and_grads(*batch, num_data=NUM_DATA))
    gradients = [None if p.grad is None else p.grad.clone() for p in parameters]
    return value, gradients, torch.get_rng_state(), [str(w.message) for w in caught]


def assert_same_step(eager, compiled):
    loss, gradients, rng, _ = eager
    loss_c, gradients_c, rng_c, messages = compiled
    assert not messages, messages
    # float32 sums over a few hundred terms: agreement to ~1e-6 relative, far below the
    # change one different ε makes (checked by test_a_different_noise_is_seen).
    assert loss_c == pytest.approx(loss, rel=1e-5, abs=1e-4)
    for g, g_c in zip(gradients, gradients_c, strict=True):
        assert (g is None) == (g_c is None)
        if g is not None:
            torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-5)
    # The compiled step consumed torch's random state exactly as the eager step did.
    assert torch.equal(rng_c, rng)


def small_vae(**options):
    torch.manual_seed(0)
    return pv.build_vae(DATA_DIM, LATENT_DIM, hidden_dims=(8,), **options)


def test_one_inductor_step_gives_the_eager_loss_and_gradients():
    vae = small_vae()
    batch = (binary_data(BATCH, DATA_DIM, 0.5),)
    eager = one_step(vae, batch, compiled=False)
    assert_same_step(eager, one_step(vae, batch, compiled=True, backend="inductor"))


def test_a_different_noise_is_seen():
    # The equivalence above means something only if ε matters: another seed moves the loss
    # and the gradients far beyond the tolerance there.
    vae = small_vae()
    batch = (binary_data(BATCH, DATA_DIM, 0.5),)
    loss, gradients, _, _ = one_step(vae, batch, compiled=True, seed=1)
    loss_2, gradients_2, _, _ = one_step(vae, batch, compiled=True, seed=2)
    assert abs(loss - loss_2) > 1e-2 * abs(loss)
    assert not torch.allclose(gradients[0], gradients_2[0], rtol=1e-3)


def test_beta_is_an_input_not_a_constant_of_the_first_trace():
    vae = small_vae()
    batch = (binary_data(BATCH, DATA_DIM, 0.5),)
    objective = Objective(vae, Trace_ELBO())
    objective.parameters(*batch, num_data=NUM_DATA)
    step = CompiledStep(objective, backend="eager")
    for beta in (0.1, 0.5, 1.0):
        vae.beta = beta
        torch.manual_seed(3)
        compiled = float(step.loss_and_grads(*batch, num_data=NUM_DATA))
        torch.manual_seed(3)
        eager = float(objective.loss_and_grads(*batch, num_data=NUM_DATA))
        assert compiled == pytest.approx(eager, rel=1e-5)
    assert step.traces == 1


class OwnBeta(pyro.nn.PyroModule):
    """A model of one's own with a ``beta`` (scaling z) but no ``beta_scale()`` hook."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.decoder = (
            nn.Linear(DATA_DIM, LATENT_DIM),
            nn.Linear(LATENT_DIM, DATA_DIM),
        )
        self.beta = 1.0

    @pyro.nn.pyro_method
    def model(self, x, num_data=None):
        with pyro.plate("data", size=num_data, subsample=x):
            with pyro.poutine.scale(scale=self.beta):
                z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), LATENT_DIM), 1).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    @pyro.nn.pyro_method
    def guide(self, x, num_data=None):
        with pyro.plate("data", size=num_data, subsample=x), pyro.poutine.scale(scale=self.beta):
            pyro.sample("z", dist.Normal(self.encoder(x), 1).to_event(1))


@pytest.mark.parametrize(
    ("make", "condition_dim", "traces"),
    [
        # The CVAE has the hook, as the VAE does: one trace for every β.
        (lambda: pv.ConditionalVAE(DATA_DIM, 4, LATENT_DIM, hidden_dims=(8,)), 4, 1),
        # Without the hook β is part of the key: one trace per value.
        (OwnBeta, 0, 3),
    ],
    ids=["cvae", "own-model"],
)
def test_beta_is_an_input_exactly_for_a_model_with_the_beta_scale_hook(make, condition_dim, traces):
    module = make()
    x = binary_data(BATCH, DATA_DIM, 0.5)
    batch = (x, torch.rand(BATCH, condition_dim)) if condition_dim else (x,)
    objective = Objective(module, Trace_ELBO())
    objective.parameters(*batch, num_data=NUM_DATA)
    step = CompiledStep(objective, backend="eager")
    for beta in (0.1, 0.5, 1.0):
        module.beta = beta
        torch.manual_seed(3)
        compiled = float(step.loss_and_grads(*batch, num_data=NUM_DATA))
        torch.manual_seed(3)
        eager = float(objective.loss_and_grads(*batch, num_data=NUM_DATA))
        assert compiled == pytest.approx(eager, rel=1e-5)
    assert step.traces == traces


def test_the_last_smaller_batch_and_a_new_dataset_size_are_retraced():
    vae = small_vae()
    x = binary_data(BATCH, DATA_DIM, 0.5)
    objective = Objective(vae, Trace_ELBO())
    objective.parameters(x, num_data=NUM_DATA)
    step = CompiledStep(objective, backend="eager")
    for batch, num_data in [(x, NUM_DATA), (x[:4], NUM_DATA), (x, 2 * NUM_DATA), (x, NUM_DATA)]:
        torch.manual_seed(4)
        compiled = float(step.loss_and_grads(batch, num_data=num_data))
        torch.manual_seed(4)
        eager = float(objective.loss_and_grads(batch, num_data=num_data))
        assert compiled == pytest.approx(eager, rel=1e-5)
    assert step.traces == 3  # the fourth key is the first again


@pytest.mark.slow
def test_fit_with_warmup_gives_the_eager_losses():
    # 20 examples in batches of 8: two full batches and one of 4, β climbing at every step of
    # the first two epochs; compiled and eager draw the same shuffles, batches and ε.
    data = torch.rand(20, DATA_DIM)
    histories = []
    for compile in (False, True):
        vae = small_vae()
        torch.manual_seed(5)
        histories.append(
            pv.fit(
                vae,
                data,
                num_epochs=3,
                batch_size=8,
                kl_warmup_epochs=2,
                progress=False,
                compile=compile,
                generator=torch.Generator().manual_seed(6),
            )
        )
    eager, compiled = histories
    assert len(compiled.step_loss) == 9
    # Fused Adam and Inductor round differently from the eager step: a few ulps per step,
    # compounding over 9 steps, still far below the change of β between steps (≥ 1/6 of
    # the KL, several nats).
    assert compiled.step_loss == pytest.approx(eager.step_loss, rel=1e-4)


class DataDependentEncoder(nn.Module):
    """A diagonal encoder with Python control flow on a tensor's value: cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = pv.DiagonalNormalEncoder(DATA_DIM, LATENT_DIM, (8,))
        self.latent_dim = LATENT_DIM

    def forward(self, x):
        posterior = self.inner(x)
        if x.sum() > 0:  # always true on these data: eager and a wrongly baked graph agree
            return posterior
        return posterior


def test_dynamic_control_flow_falls_back_to_eager_with_one_warning():
    torch.manual_seed(0)
    vae = pv.VAE(DATA_DIM, LATENT_DIM, hidden_dims=(8,), encoder=DataDependentEncoder())
    batch = (binary_data(BATCH, DATA_DIM, 0.5),)
    eager = one_step(vae, batch, compiled=False)
    loss, gradients, rng, messages = one_step(vae, batch, compiled=True)
    assert len(messages) == 1
    assert "runs eager" in messages[0] and "data-dependent control flow" in messages[0]
    # Eager, so the very same numbers.
    assert loss == eager[0] and torch.equal(rng, eager[2])
    assert all(torch.equal(g, g_e) for g, g_e in zip(gradients, eager[1], strict=True))


@pytest.mark.parametrize(
    ("make_loss", "reason"),
    [
        (lambda: RenyiELBO(alpha=0, num_particles=2), "RenyiELBO"),
        (lambda: pv.M2(DATA_DIM, 2, LATENT_DIM, alpha=1.0, hidden_dims=(8,)).loss(), "TraceEnum"),
    ],
    ids=["RenyiELBO", "TraceEnum_ELBO"],
)
def test_other_estimators_run_eager_with_one_warning_naming_them(make_loss, reason):
    data = binary_data(12, DATA_DIM, 0.5)
    histories = []
    for compile in (False, True):
        vae_copy = small_vae()
        torch.manual_seed(7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            histories.append(
                pv.fit(
                    vae_copy,
                    data,
                    loss=make_loss(),
                    num_epochs=2,
                    batch_size=6,
                    progress=False,
                    compile=compile,
                )
            )
        messages = [str(w.message) for w in caught if "compile=True" in str(w.message)]
        assert len(messages) == (1 if compile else 0)
    assert reason in messages[0] and "runs eager" in messages[0]
    # Eager, so the very same numbers.
    assert histories[1].step_loss == histories[0].step_loss


def component_cases() -> list:
    return [
        pytest.param(prior, encoder, likelihood, id=f"{prior},{encoder},{likelihood}")
        for prior, encoder, likelihood in itertools.product(
            pv.PRIOR_NAMES, pv.ENCODER_NAMES, pv.LIKELIHOOD_NAMES
        )
        if (prior, encoder) not in REFUSED
    ]


@pytest.mark.parametrize(("prior", "encoder", "likelihood"), component_cases())
def test_every_component_combination_traces_to_the_eager_step(prior, encoder, likelihood):
    vae = small_vae(
        prior=prior,
        encoder=encoder,
        likelihood=likelihood,
        num_components=4 if prior in ("mixture", "vamp") else None,
    )
    torch.manual_seed(8)
    batch = (DATA[likelihood](),)
    # Every combination traces (none falls back: assert_same_step refuses any warning).
    assert_same_step(one_step(vae, batch, compiled=False), one_step(vae, batch, compiled=True))


def test_the_bayesian_decoder_traces_to_the_eager_step():
    vae = small_vae(decoder="bayesian")
    batch = (binary_data(BATCH, DATA_DIM, 0.5),)
    assert_same_step(one_step(vae, batch, compiled=False), one_step(vae, batch, compiled=True))


def meanfield_cases() -> list:
    # The combinations with a closed-form KL (the others fall back to Monte Carlo inside Pyro,
    # which Trace_ELBO's cases cover, and warn once in fit).
    return [
        pytest.param(prior, encoder, likelihood, id=f"{prior},{encoder},{likelihood}")
        for prior, encoder, likelihood in itertools.product(
            ("standard-normal", "diagonal-normal"),
            ("diagonal", "full-covariance"),
            pv.LIKELIHOOD_NAMES,
        )
    ]


@pytest.mark.parametrize(("prior", "encoder", "likelihood"), meanfield_cases())
def test_mean_field_steps_trace_to_the_eager_step(prior, encoder, likelihood):
    """TraceMeanField_ELBO: the closed-form KL is traced too, and matches eager."""
    vae = small_vae(prior=prior, encoder=encoder, likelihood=likelihood)
    assert pv.has_closed_form_kl(vae)
    torch.manual_seed(8)
    batch = (DATA[likelihood](),)
    eager = one_step(vae, batch, compiled=False, loss=TraceMeanField_ELBO())
    compiled = one_step(vae, batch, compiled=True, loss=TraceMeanField_ELBO())
    assert_same_step(eager, compiled)
    # Not Trace_ELBO's step: the analytic KL gives another loss from the same ε.
    assert eager[0] != pytest.approx(one_step(vae, batch, compiled=False)[0], rel=1e-6)


def test_the_bayesian_decoder_traces_to_the_eager_step_under_mean_field():
    vae = small_vae(decoder="bayesian")
    batch = (binary_data(BATCH, DATA_DIM, 0.5),)
    loss = TraceMeanField_ELBO()
    assert_same_step(
        one_step(vae, batch, compiled=False, loss=loss),
        one_step(vae, batch, compiled=True, loss=loss),
    )


class _ScoreFunctionModel(nn.Module):
    """A latent the guide draws without reparameterization (``has_rsample_(False)``): Pyro's
    gradient of it is the score-function term of the surrogate loss, not the loss's own."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.tensor(0.3))
        self.weight = nn.Parameter(torch.tensor(0.7))

    def model(self, x, num_data=None):
        pyro.module("score", self)
        with pyro.plate("data", num_data, subsample=x):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z * self.weight, 1.0), obs=x)

    def guide(self, x, num_data=None):
        pyro.module("score", self)
        with pyro.plate("data", num_data, subsample=x):
            pyro.sample("z", dist.Normal(self.loc, 1.0).has_rsample_(False))


def test_a_site_drawn_without_reparameterization_runs_eager_with_one_warning():
    """Its draw (torch.normal with tensor arguments) cannot be passed in as an input, so the
    step falls back, naming it, and gives eager's numbers: the score-function gradient."""
    module = _ScoreFunctionModel()
    batch = (torch.randn(BATCH),)
    eager, compiled = (one_step(module, batch, compiled=c) for c in (False, True))
    (message,) = compiled[3]
    assert "runs eager" in message and "aten.normal" in message
    assert compiled[0] == eager[0] and torch.equal(compiled[2], eager[2])
    assert all(torch.equal(a, b) for a, b in zip(compiled[1], eager[1], strict=True))
    assert eager[1][0].abs() > 0  # loc's gradient: the score-function term alone gives one


def fit_compiled(vae, *, resume=None, saved=None):
    return pv.fit(
        vae,
        torch.rand(20, DATA_DIM, generator=torch.Generator().manual_seed(9)),
        num_epochs=2,
        batch_size=5,
        progress=False,
        compile=True,
        resume=resume,
        generator=torch.Generator().manual_seed(10),
        checkpoint=None
        if saved is None
        else lambda state: saved.append(
            (copy.deepcopy(state.to_dict()), copy.deepcopy(vae.state_dict()))
        ),
        checkpoint_every=1,
    )


@pytest.mark.slow
def test_a_resumed_compiled_fit_ends_exactly_like_an_uninterrupted_one():
    reference, saved = small_vae(), []
    torch.manual_seed(11)
    reference_history = fit_compiled(reference, saved=saved)
    state, weights = saved[1]  # after step 2 of epoch 1: mid-epoch, the shuffle under way
    assert (state["epoch"], state["step"]) == (0, 2)
    resumed = small_vae()
    resumed.load_state_dict(weights)
    torch.manual_seed(99)  # everything that matters must come from the checkpoint
    history = fit_compiled(resumed, resume=pv.TrainingState.from_dict(state))
    assert history.step_loss == reference_history.step_loss
    for (name, expected), actual in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name


def test_cuda_graphs_only_for_inductor_on_cuda():
    # The choice itself; no GPU needed (a device object is enough).
    assert _compile_mode(torch.device("cpu"), "inductor") is None
    assert _compile_mode(torch.device("cpu"), "eager") is None
    assert _compile_mode(torch.device("cuda"), "inductor") == "reduce-overhead"
    assert _compile_mode(torch.device("cuda", 1), "inductor") == "reduce-overhead"
    assert _compile_mode(torch.device("cuda"), "eager") is None


def test_the_step_compiles_with_the_mode_chosen_for_the_batch_device(monkeypatch):
    # The wiring: torch.compile gets the mode _compile_mode picks for the batch's device.
    chosen, passed = [], []

    def spy_mode(device, backend):
        chosen.append((device, backend))
        return "reduce-overhead"

    def spy_compile(graph, **options):
        passed.append(options)
        return graph  # runs the traced graph as it is

    monkeypatch.setattr(compiled_module, "_compile_mode", spy_mode)
    monkeypatch.setattr(torch, "compile", spy_compile)
    vae = small_vae()
    batch = (binary_data(BATCH, DATA_DIM, 0.5),)
    eager = one_step(vae, batch, compiled=False)
    assert_same_step(eager, one_step(vae, batch, compiled=True, backend="inductor"))
    assert chosen == [(torch.device("cpu"), "inductor")]
    assert [options["mode"] for options in passed] == ["reduce-overhead"]
