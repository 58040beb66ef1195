"""Property-based: random shapes, dtypes and values fed to the public functions. Each call
either works or raises a ValueError with a one-line message; never an error from deep inside
torch or Pyro."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_vae as pv

DATA_DIM, LATENT_DIM = 4, 2
DTYPES = [torch.float64, torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]
SPECIAL = [0.0, 1.0, 0.5, -1.0, 2.0, math.nan, math.inf, -math.inf, 1e300, -0.0]

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
values = st.one_of(st.sampled_from(SPECIAL), st.floats(-3, 3))


@st.composite
def tensors(draw):
    """Mostly (N, DATA_DIM) so that the value checks are reached; sometimes any shape."""
    shape = draw(st.one_of(st.integers(0, 6).map(lambda n: (n, DATA_DIM)), shapes))
    dtype = draw(st.sampled_from(DTYPES))
    numel = math.prod(shape)
    kind = draw(st.sampled_from(["binary", "unit", "any"]))
    if kind == "binary":
        flat = [float(draw(st.booleans())) for _ in range(numel)]
    elif kind == "unit":
        flat = [draw(st.floats(0, 1)) for _ in range(numel)]
    else:
        flat = [draw(values) for _ in range(numel)]
    data = torch.tensor(flat, dtype=torch.float64).reshape(shape)
    if dtype.is_floating_point:
        return data.to(dtype)
    return torch.nan_to_num(data, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1).to(dtype)


def calls(vae: pv.VAE):
    return {
        "validate_data": lambda x: vae.validate_data(x),
        "encode": lambda x: vae.encode(x),
        "reconstruct": lambda x: vae.reconstruct(x),
        "elbo": lambda x: pv.elbo(vae, x),
        "elbo_terms": lambda x: pv.elbo_terms(vae, x),
        "log_likelihood": lambda x: pv.log_likelihood(vae, x, num_particles=3),
        "binarize": lambda x: pv.binarize(x),
        "fit": lambda x: pv.fit(vae, x, num_epochs=1, batch_size=2, progress=False),
    }


def assert_works_or_says_why(call, *args) -> None:
    try:
        call(*args)
    except ValueError as error:
        message = str(error)
        assert message and "\n" not in message, repr(message)


@pytest.mark.parametrize("function", sorted(calls(pv.VAE(DATA_DIM, LATENT_DIM))))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=tensors())
def test_data_functions_work_or_raise_a_one_line_value_error(function, x):
    vae = pv.VAE(DATA_DIM, LATENT_DIM, hidden_dims=(8,))
    assert_works_or_says_why(calls(vae)[function], x)


numbers = st.one_of(
    st.integers(-3, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([None, True, "3", 2.5, [2]]),
)


@settings(max_examples=150, deadline=None)
@given(data_dim=numbers, latent_dim=numbers, beta=numbers)
def test_vae_arguments_work_or_raise_a_one_line_value_error(data_dim, latent_dim, beta):
    assert_works_or_says_why(lambda: pv.VAE(data_dim, latent_dim, beta=beta, hidden_dims=(4,)))


@settings(max_examples=150, deadline=None)
@given(
    num_epochs=numbers,
    batch_size=numbers,
    learning_rate=numbers,
    kl_warmup_epochs=numbers,
    clip_norm=numbers,
    checkpoint_every=numbers,
)
def test_fit_arguments_work_or_raise_a_one_line_value_error(
    num_epochs, batch_size, learning_rate, kl_warmup_epochs, clip_norm, checkpoint_every
):
    vae = pv.VAE(DATA_DIM, LATENT_DIM, hidden_dims=(4,))
    x = torch.bernoulli(torch.full((4, DATA_DIM), 0.5))
    if isinstance(num_epochs, int) and num_epochs > 2:
        num_epochs = 2  # keep it quick; larger values take the same path

    def call():
        pv.fit(
            vae,
            x,
            num_epochs=num_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            kl_warmup_epochs=kl_warmup_epochs,
            clip_norm=clip_norm,
            checkpoint_every=checkpoint_every,
            progress=False,
        )

    try:
        call()
    except pv.TrainingDivergedError:
        pass  # a huge learning rate may legitimately diverge; the error names the step
    except ValueError as error:
        assert "\n" not in str(error)


@settings(max_examples=100, deadline=None)
@given(
    prior=st.sampled_from([*pv.PRIOR_NAMES, "gaussian", ""]),
    encoder=st.sampled_from([*pv.ENCODER_NAMES, "lstm"]),
    likelihood=st.sampled_from([*pv.LIKELIHOOD_NAMES, 3]),
    latent_dim=st.integers(-1, 3),
    num_components=st.sampled_from([None, 0, 2, -1]),
    flow_depth=st.integers(-1, 2),
)
def test_build_vae_works_or_raises_a_one_line_value_error(
    prior, encoder, likelihood, latent_dim, num_components, flow_depth
):
    assert_works_or_says_why(
        lambda: pv.build_vae(
            DATA_DIM,
            latent_dim,
            prior=prior,
            encoder=encoder,
            likelihood=likelihood,
            num_components=num_components,
            flow_depth=flow_depth,
            hidden_dims=(4,),
        )
    )


def more_calls(vae: pv.VAE):
    """The rest of the public functions that take data."""
    return {
        "kl_per_dimension": lambda x: pv.kl_per_dimension(vae, x),
        "kl_decomposition": lambda x: pv.kl_decomposition(vae, x, num_particles=2),
        "active_units": lambda x: pv.active_units(vae, x),
        "weight_spread": lambda x: pv.weight_spread(vae, x, num_particles=3),
    }


@pytest.mark.parametrize("function", sorted(more_calls(pv.VAE(DATA_DIM, LATENT_DIM))))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=tensors())
def test_more_data_functions_work_or_raise_a_one_line_value_error(function, x):
    vae = pv.VAE(DATA_DIM, LATENT_DIM, hidden_dims=(8,))
    assert_works_or_says_why(more_calls(vae)[function], x)


# Counts and chunk sizes: small, zero, negative, of the wrong type; and for sample, sizes whose
# result could never be allocated (a ValueError giving the size, not torch's out-of-memory).
counts = st.one_of(st.integers(-3, 12), st.sampled_from([None, True, 2.5, "3", 0]))
sample_sizes = st.one_of(counts, st.sampled_from([2**62, 2**70, 10**30]))


@settings(max_examples=120, deadline=None)
@given(
    function=st.sampled_from(
        ["log_likelihood", "elbo", "elbo_terms", "kl_decomposition", "kl_per_dimension"]
    ),
    count=counts,
    chunk=counts,
)
def test_counts_and_chunk_sizes_work_or_raise_a_one_line_value_error(function, count, chunk):
    vae = pv.VAE(DATA_DIM, LATENT_DIM, hidden_dims=(4,))
    x = torch.bernoulli(torch.full((5, DATA_DIM), 0.5))
    if function == "kl_per_dimension":
        assert_works_or_says_why(lambda: pv.kl_per_dimension(vae, x, chunk_size=chunk))
        return
    call = getattr(pv, function)
    assert_works_or_says_why(lambda: call(vae, x, num_particles=count, chunk_size=chunk))


@settings(max_examples=60, deadline=None)
@given(num_samples=sample_sizes, weights=st.sampled_from(["sample", "mean", "median", 1]))
def test_sample_works_or_raises_a_one_line_value_error(num_samples, weights):
    vae = pv.build_vae(DATA_DIM, LATENT_DIM, decoder="bayesian", hidden_dims=(4,))
    assert_works_or_says_why(lambda: vae.sample(num_samples, weights))


class _OtherDevice(torch.Generator):
    """A generator that says it lives on another device: this torch builds no meta generator,
    and a CUDA one needs CUDA."""

    @property
    def device(self) -> torch.device:
        return torch.device("meta")


generators = st.sampled_from(
    [
        None,
        "torch",
        "numpy",
        5,
        "cpu",
        "other-device",
        1.5,
    ]
)


@settings(max_examples=60, deadline=None)
@given(
    generator=generators,
    model_dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    data_dtype=st.sampled_from([torch.float64, torch.float32, torch.float16]),
    learning_rate=st.sampled_from([1e-3, 1e-39, 1e-320, 5e-324, 1e-300]),
    scale=st.sampled_from([1.0, 1e30, 1e38]),
)
def test_fit_with_any_generator_dtype_and_scale_works_or_raises_a_one_line_value_error(
    generator, model_dtype, data_dtype, learning_rate, scale
):
    made = {
        "torch": torch.Generator().manual_seed(0),
        "numpy": np.random.default_rng(0),
        "other-device": _OtherDevice(),
    }
    vae = pv.build_vae(DATA_DIM, LATENT_DIM, likelihood="normal", hidden_dims=(4,))
    vae = vae.to(model_dtype)
    x = (torch.bernoulli(torch.full((6, DATA_DIM), 0.5)) * scale).to(data_dtype)
    try:
        pv.fit(
            vae,
            x,
            num_epochs=1,
            batch_size=3,
            learning_rate=learning_rate,
            generator=made.get(generator, generator),
            progress=False,
        )
    except ValueError as error:
        assert str(error) and "\n" not in str(error)
        # Nothing but the model's dtype or the data's scale may make the first step fail,
        # and then the message is about them, not the learning rate.
        assert "learning_rate" not in str(error) or "learning_rate=" in str(error), str(error)
