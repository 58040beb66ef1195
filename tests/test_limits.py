"""Sizes and values at the edges: memory that stays bounded for any number of draws or
samples, and arguments that would make ``fit`` train nothing, or fail deep inside torch, refused
up front with a ValueError that says why (issue 13)."""

import importlib
import math
import re
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import binary_data

import pyro_vae as pv
from pyro_vae.infer import estimators as evaluate
from pyro_vae.models import vae as model

# The module, not the function pv.explain that shares its name.
explain = importlib.import_module("pyro_vae.explain")


class _Enough(Exception):
    """Stops a computation that would go on for hours once its first passes were watched."""


class _TooBig(Exception):
    """Raised in place of an allocation above the bound a test sets: the test fails without
    the machine allocating it."""


@pytest.fixture
def guarded_normal(monkeypatch):
    """Every Normal log-density and draw is checked against ``limit`` elements *before* torch
    allocates it; ``calls`` lists their sizes, and ``stop_after`` calls end the computation."""
    normal = torch.distributions.Normal
    watch = {"limit": math.inf, "stop_after": math.inf, "calls": []}

    def check(numel: int) -> None:
        watch["calls"].append(numel)
        if numel > watch["limit"]:
            raise _TooBig(f"{numel} elements in one pass")
        if len(watch["calls"]) > watch["stop_after"]:
            raise _Enough

    log_prob, rsample = normal.log_prob, normal.rsample

    def guarded_log_prob(self, value):
        check(math.prod(torch.broadcast_shapes(value.shape, self.loc.shape)))
        return log_prob(self, value)

    def guarded_rsample(self, sample_shape=()):
        check(math.prod(sample_shape) * self.loc.numel())
        return rsample(self, sample_shape)

    def guarded_sample(self, sample_shape=()):  # Normal.sample: rsample, no grad
        with torch.no_grad():
            return guarded_rsample(self, sample_shape)

    monkeypatch.setattr(normal, "log_prob", guarded_log_prob)
    monkeypatch.setattr(normal, "rsample", guarded_rsample)
    monkeypatch.setattr(normal, "sample", guarded_sample)
    return watch


# ------------------------------------------------------------------ memory for any K


@pytest.mark.parametrize(
    ("num_data", "num_particles", "chunk_size"),
    [(50, 40, 64), (7, 1000, 500), (2000, 10**9, 2**12)],
    ids=["N*K above the chunk", "K above the chunk", "a K that would take 10^13 values at once"],
)
def test_kl_decomposition_never_computes_more_than_its_chunk(
    guarded_normal, num_data, num_particles, chunk_size
):
    """(draw, posterior) log-densities per pass stay within chunk_size, each over the latent
    dimensions, whatever N and K. The last case would hold 2000 x 10^9 x 2 values at once;
    it stops after its first passes."""
    latent_dim = 2
    vae = pv.VAE(6, latent_dim, hidden_dims=(8,))
    x = binary_data(num_data, 6)
    guarded_normal["limit"] = chunk_size * latent_dim
    guarded_normal["stop_after"] = 200 if num_particles > 10**6 else math.inf
    try:
        pv.kl_decomposition(vae, x, num_particles=num_particles, chunk_size=chunk_size)
    except _Enough:
        pass
    # Every example's posterior was scored against draws: the passes did reach the N^2 work.
    assert max(guarded_normal["calls"]) > chunk_size * latent_dim // 2


def test_kl_decomposition_in_chunks_keeps_its_value():
    """Chunked over examples, particles and posteriors, the estimator is the same one: its
    draws differ, so it is compared in distribution, within standard errors, with one pass over
    everything."""
    vae = pv.VAE(6, 3, hidden_dims=(8,))
    x = binary_data(40, 6)
    whole = pv.kl_decomposition(vae, x, num_particles=50, chunk_size=2**24)
    chunked = pv.kl_decomposition(vae, x, num_particles=50, chunk_size=30)
    for name in ("average_kl", "mutual_information", "marginal_kl"):
        se = math.hypot(getattr(whole, f"{name}_se"), getattr(chunked, f"{name}_se"))
        assert abs(getattr(whole, name) - getattr(chunked, name)) < 4 * se, name
    # The identity of the decomposition holds exactly for the chunked estimates too.
    assert chunked.average_kl == pytest.approx(
        chunked.mutual_information + chunked.marginal_kl, abs=1e-12
    )


def _python_memory_growth(monkeypatch, target, name, make_result, call):
    """Python memory held after 2000 calls of ``target.name`` less that after 100: a list that
    keeps every call's result grows by its 1900 entries, running sums do not."""
    marks = []

    def watched(*args, **kwargs):
        marks.append(None)
        if len(marks) in (100, 2000):
            marks[-1] = tracemalloc.get_traced_memory()[0]
        if len(marks) == 2000:
            raise _Enough
        return make_result(*args, **kwargs)

    monkeypatch.setattr(target, name, watched)
    tracemalloc.start()
    try:
        with pytest.raises(_Enough):
            call()
    finally:
        tracemalloc.stop()
    return marks[1999] - marks[99]


def test_log_likelihood_plans_its_chunks_as_it_goes(monkeypatch):
    """K = 3 million particles in passes of one row: the passes are made one at a time, not
    listed up front (a list of 3 million chunks holds hundreds of MB before any work)."""
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    x = binary_data(1, 6)
    rows = []
    real = evaluate._one_particle

    def counting(vae, batch, weights="sample"):
        rows.append(len(batch))
        if len(rows) == 20:
            raise _Enough
        return real(vae, batch, weights)

    monkeypatch.setattr(evaluate, "_one_particle", counting)
    tracemalloc.start()
    try:
        with pytest.raises(_Enough):
            pv.log_likelihood(vae, x, num_particles=3 * 10**6, chunk_size=1, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == [1] * 20
    assert peak < 2**20, f"{peak} bytes of Python objects"


def test_elbo_terms_keeps_running_sums_not_every_particle(monkeypatch):
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    x = binary_data(50, 6)

    def particle(vae, batch, weights="sample"):
        n = len(batch)
        return torch.ones(n), torch.full((n,), 2.0), torch.tensor(3.0)

    growth = _python_memory_growth(
        monkeypatch,
        evaluate,
        "_one_particle",
        particle,
        lambda: pv.elbo_terms(vae, x, num_particles=10**9),
    )
    assert growth < 50_000, f"{growth} bytes more after 1900 particles"


def test_elbo_terms_averages_particles_and_passes_exactly(monkeypatch):
    """The running sums give the same averages as the stacked draws did: particle k of a
    pass returns (k, 2k, 10k + pass) for every example."""
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    x = binary_data(5, 6)
    calls = []

    def particle(vae, batch, weights="sample"):
        calls.append(len(batch))
        k = float(len(calls))
        return torch.full((len(batch),), k), torch.full((len(batch),), 2 * k), torch.tensor(10 * k)

    monkeypatch.setattr(evaluate, "_one_particle", particle)
    terms = pv.elbo_terms(vae, x, num_particles=4, chunk_size=3)
    assert calls == [3, 3, 3, 3, 2, 2, 2, 2]
    expected = torch.tensor([2.5, 2.5, 2.5, 6.5, 6.5])  # means of 1..4 and of 5..8
    torch.testing.assert_close(terms.reconstruction, expected)
    torch.testing.assert_close(terms.kl, 2 * expected)
    torch.testing.assert_close(terms.global_kl, torch.tensor(45.0))  # mean of 10, 20, ..., 80


def test_weight_spread_keeps_running_moments(monkeypatch):
    vae = pv.build_vae(6, 2, decoder="bayesian", hidden_dims=(8,))
    x = binary_data(4, 6)
    growth = _python_memory_growth(
        monkeypatch,
        vae,
        "decode",
        lambda z, weights="sample": torch.randn(len(z), 6),
        lambda: pv.weight_spread(vae, x, num_particles=10**9),
    )
    assert growth < 50_000, f"{growth} bytes more after 1900 draws"


def test_weight_spread_moments_equal_those_of_the_draws(monkeypatch):
    vae = pv.build_vae(6, 2, decoder="bayesian", hidden_dims=(8,))
    x = binary_data(4, 6)
    logits = torch.randn(7, 4, 6) * 3 + 1
    draws = torch.stack([vae.likelihood(one).mean for one in logits])
    given = iter(logits)
    monkeypatch.setattr(vae, "decode", lambda z, weights="sample": next(given))
    mean, std = pv.weight_spread(vae, x, num_particles=7)
    torch.testing.assert_close(mean, draws.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(std, draws.std(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_particles", [10**9, 10**20])
def test_explain_draws_in_passes_of_bounded_size(monkeypatch, tmp_path, num_particles):
    """num_particles = 10^9 or 10^20 (``--num-particles 1e20``): the point cloud and the KL
    section each run the guide (and the model) on at most DRAW_CHUNK copies of an input per
    pass, the passes' sizes made one at a time (a list of them all would not fit in memory);
    stopped after its first passes."""
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    x = binary_data(8, 6)
    sizes = []
    guide, model_ = vae.guide, vae.model

    def watched(program):
        def run(x, *args, **kwargs):
            sizes.append(len(x))
            if len(x) > explain.DRAW_CHUNK:
                raise _TooBig(f"{len(x)} draws in one pass")
            if len(sizes) > 5:
                raise _Enough
            return program(x, *args, **kwargs)

        return run

    monkeypatch.setattr(vae, "guide", watched(guide))
    monkeypatch.setattr(vae, "model", watched(model_))
    with pytest.raises(_Enough):
        pv.explain(vae, x, torch.zeros(8), (2, 3), ["a"], tmp_path, num_particles=num_particles)
    assert sizes == [explain.DRAW_CHUNK] * 6


def test_explain_moments_in_passes_equal_those_of_all_the_draws(monkeypatch, tmp_path):
    """With passes of 64 draws, 150 draws give the report the mean and standard deviation of
    all 150: the point-cloud table's "mean of z" and "std of z" are those of the draws."""
    monkeypatch.setattr(explain, "DRAW_CHUNK", 64)
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    x = binary_data(8, 6)
    drawn = []
    guide = vae.guide

    def recording(x, *args, **kwargs):
        z = guide(x, *args, **kwargs)
        drawn.append(z)
        return z

    monkeypatch.setattr(vae, "guide", recording)
    report = pv.explain(vae, x, torch.zeros(8), (2, 3), ["a"], tmp_path, num_particles=150)
    cloud = torch.cat(drawn[:3])  # the point cloud's passes come first: 64 + 64 + 22
    assert [len(z) for z in drawn[:3]] == [64, 64, 22]
    row = next(
        line for line in report.read_text().splitlines() if line.startswith("| z_1 |")
    ).split("|")
    assert float(row[3]) == pytest.approx(float(cloud[:, 0].mean()), abs=6e-4)
    assert float(row[6]) == pytest.approx(float(cloud[:, 0].std()), abs=6e-4)


@pytest.mark.parametrize("sizes", [[10], [3, 4, 3], [1, 1, 8], [7, 1, 1, 1]], ids=str)
def test_moments_merged_across_passes_are_those_of_all_values(sizes):
    values = torch.randn(10, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([0.0, 100.0, -3.0])
    moments = explain._Moments()
    for part in values.split(sizes):
        moments.add(part)
    torch.testing.assert_close(moments.mean, values.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(moments.std, values.std(0), rtol=0, atol=1e-12)


def test_sample_decodes_in_chunks_with_one_draw_of_the_weights(monkeypatch):
    monkeypatch.setattr(model, "SAMPLE_CHUNK", 4)
    vae = pv.build_vae(6, 2, decoder="bayesian", hidden_dims=(8,))
    rows, guide_calls = [], []
    decoder_forward, weight_guide = vae.decoder.forward, vae.decoder.guide

    def forward(z):
        rows.append(len(z))
        return decoder_forward(z)

    def guide():
        guide_calls.append(None)
        return weight_guide()

    monkeypatch.setattr(vae.decoder, "forward", forward)
    monkeypatch.setattr(vae.decoder, "guide", guide)
    samples = vae.sample(10)
    assert samples.shape == (10, 6) and rows == [4, 4, 2]
    assert len(guide_calls) == 1  # one set of weights shared by all the samples


def test_sample_refuses_a_result_too_large_to_allocate_with_its_size():
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    with pytest.raises(
        ValueError, match=r"num_samples=4611686018427387904 asks for 2.21e\+20 bytes"
    ):
        vae.sample(2**62)


# ------------------------------------------------------------------ values that train nothing


@pytest.mark.parametrize(
    ("dtype", "argument", "value", "refused"),
    [
        (torch.float32, "learning_rate", 1e-320, True),
        (torch.float32, "learning_rate", 1e-39, True),  # a float32 subnormal
        (torch.float32, "learning_rate", 2e-38, False),
        (torch.float64, "learning_rate", 1e-39, False),
        (torch.float64, "learning_rate", 1e-320, True),
        (torch.float32, "clip_norm", 1e-300, True),
        (torch.float64, "clip_norm", 1e-300, False),
        (torch.float64, "clip_norm", 1e-310, True),
    ],
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_steps_below_the_dtypes_smallest_normal_number_are_refused(dtype, argument, value, refused):
    vae = pv.VAE(6, 2, hidden_dims=(8,)).to(dtype)
    x = binary_data(8, 6).to(dtype)
    arguments = {"num_epochs": 1, "batch_size": 4, "progress": False, argument: value}
    if refused:
        with pytest.raises(
            ValueError, match=rf"^{argument}={value!r} is below the smallest normal"
        ):
            pv.fit(vae, x, **arguments)
    else:
        assert pv.fit(vae, x, **arguments).num_epochs == 1


# ------------------------------------------------------------------ data the model cannot score


def test_a_float16_model_is_refused_and_float16_data_are_converted():
    x = binary_data(2000, 16)
    with pytest.raises(ValueError, match=r"parameters are torch.float16.*\.float\(\)"):
        pv.fit(pv.VAE(16, 2, hidden_dims=(8,)).half(), x.half(), num_epochs=1, batch_size=100)
    vae = pv.VAE(16, 2, hidden_dims=(8,)).float()
    history = pv.fit(vae, x.half(), num_epochs=1, batch_size=100, progress=False)
    assert math.isfinite(history.loss[0])


@pytest.mark.parametrize("scale", [1e38, 1e30])
def test_data_the_model_cannot_score_are_blamed_not_the_learning_rate(scale):
    """Finite float32 data whose log-density overflows: the first step, from the initial
    parameters, says so, before any parameter changes."""
    torch.set_default_dtype(torch.float32)
    vae = pv.build_vae(4, 2, likelihood="normal", hidden_dims=(8,))
    before = [p.detach().clone() for p in vae.parameters()]
    x = binary_data(20, 4) * scale
    largest = re.escape(f"largest magnitude is {scale:.3g}")
    with pytest.raises(
        ValueError, match=rf"first step, from the initial parameters.*{largest}"
    ) as info:
        pv.fit(vae, x, num_epochs=1, batch_size=5, progress=False)
    assert "learning_rate" not in str(info.value) and not isinstance(
        info.value, pv.TrainingDivergedError
    )
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters(), strict=True))


# ------------------------------------------------------------------ generators


class _MetaGenerator(torch.Generator):
    """A generator that says it lives on another device (torch 2.14 builds no meta or, here,
    CUDA generator)."""

    @property
    def device(self) -> torch.device:
        return torch.device("meta")


@pytest.mark.parametrize(
    ("generator", "message"),
    [
        (np.random.default_rng(0), r"torch.Generator \(or None\), got numpy.random.*Generator"),
        (5, "torch.Generator \\(or None\\), got builtins.int: 5"),
        ("cpu", "got builtins.str"),
        (_MetaGenerator(), r"generator is on meta but the model and data are on cpu"),
    ],
    ids=["numpy", "int", "str", "other-device"],
)
def test_a_generator_that_is_not_a_torch_generator_on_the_data_device_is_refused(
    generator, message
):
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    before = [p.detach().clone() for p in vae.parameters()]
    with pytest.raises(ValueError, match=message):
        pv.fit(vae, binary_data(8, 6), num_epochs=1, batch_size=4, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters(), strict=True))
