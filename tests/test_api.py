"""The public API: what pyro_vae exports, and the contract every exported component keeps."""

import inspect
import pydoc

import pyro
import pytest
import torch
from pyro import poutine

import pyro_vae as pv

LATENT_DIM, DATA_DIM, BATCH = 3, 12, 5


# Every exported component, with a factory and data in its support. A component exported
# without an entry here fails test_every_exported_component_is_contract_tested.
def _encoder() -> pv.DiagonalNormalEncoder:
    return pv.DiagonalNormalEncoder(DATA_DIM, LATENT_DIM, (8,))


PRIORS = {
    "StandardNormalPrior": lambda: pv.StandardNormalPrior(LATENT_DIM),
    "DiagonalNormalPrior": lambda: pv.DiagonalNormalPrior(LATENT_DIM),
    "MixtureOfGaussiansPrior": lambda: pv.MixtureOfGaussiansPrior(LATENT_DIM, 4),
    "VampPrior": lambda: pv.VampPrior(DATA_DIM, 4, encoder=_encoder()),
    "FlowPrior": lambda: pv.FlowPrior(LATENT_DIM, 2),
}
ENCODERS = {
    "DiagonalNormalEncoder": _encoder,
    "FullCovarianceNormalEncoder": lambda: pv.FullCovarianceNormalEncoder(
        DATA_DIM, LATENT_DIM, (8,)
    ),
    "IAFEncoder": lambda: pv.IAFEncoder(DATA_DIM, LATENT_DIM, (8,), flow_depth=2),
    "DeltaEncoder": lambda: pv.DeltaEncoder(DATA_DIM, LATENT_DIM, (8,)),
}
LIKELIHOODS = {
    "BernoulliLikelihood": (
        pv.BernoulliLikelihood,
        lambda: torch.bernoulli(torch.full((BATCH, DATA_DIM), 0.5)),
    ),
    "ContinuousBernoulliLikelihood": (
        pv.ContinuousBernoulliLikelihood,
        lambda: torch.rand(BATCH, DATA_DIM),
    ),
    "NormalLikelihood": (lambda: pv.NormalLikelihood(0.5), lambda: torch.randn(BATCH, DATA_DIM)),
    "LaplaceLikelihood": (
        lambda: pv.LaplaceLikelihood(learn_scale=True, data_dim=DATA_DIM),
        lambda: torch.randn(BATCH, DATA_DIM),
    ),
    "DiscretizedLogisticLikelihood": (
        lambda: pv.DiscretizedLogisticLikelihood(256),
        lambda: torch.randint(0, 256, (BATCH, DATA_DIM)) / 255.0,
    ),
}


def test_all_is_sorted_and_complete():
    assert pv.__all__ == sorted(pv.__all__)
    for name in pv.__all__:
        assert hasattr(pv, name), name
    assert isinstance(pv.__version__, str)


def test_every_exported_component_is_contract_tested():
    # The CVAE's parts take the condition, so the VAE's contract does not apply to them:
    # tests/models/test_cvae.py checks ConditionalNormalPrior's own (a prior that ignores c).
    exported = {
        n
        for n in pv.__all__
        if n.endswith(("Prior", "Encoder", "Likelihood")) and not n.startswith("Conditional")
    }
    assert exported == set(PRIORS) | set(ENCODERS) | set(LIKELIHOODS)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_contract(name):
    prior = PRIORS[name]()
    p = prior()
    assert p.batch_shape == () and p.event_shape == (LATENT_DIM,)
    assert torch.isfinite(p.log_prob(p.sample((BATCH,)))).all()
    encoder = getattr(prior, "_encoder", None)  # the VampPrior's, which the VAE must use
    vae = pv.VAE(DATA_DIM, LATENT_DIM, prior=prior, encoder=encoder, hidden_dims=(8,))
    trace = poutine.trace(vae.model).get_trace(torch.zeros(BATCH, DATA_DIM))
    assert trace.nodes["z"]["fn"].batch_shape == (BATCH,)  # broadcast by the data plate
    assert trace.nodes["z"]["fn"].log_prob(trace.nodes["z"]["value"]).shape == (BATCH,)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_contract(name):
    encoder = ENCODERS[name]()
    q = encoder(torch.rand(BATCH, DATA_DIM))
    assert q.batch_shape == (BATCH,) and q.event_shape == (LATENT_DIM,)
    assert q.has_rsample
    z = q.rsample()
    assert torch.isfinite(q.log_prob(z)).all()
    grads = torch.autograd.grad(z.sum(), list(encoder.parameters()), allow_unused=True)
    assert all(g is not None for g in grads)
    vae = pv.VAE(DATA_DIM, LATENT_DIM, encoder=encoder, hidden_dims=(8,))
    trace = poutine.trace(vae.guide).get_trace(torch.rand(BATCH, DATA_DIM))
    site = trace.nodes["z"]
    assert site["fn"].batch_shape == (BATCH,) and site["value"].shape == (BATCH, LATENT_DIM)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihood_contract(name):
    factory, make_data = LIKELIHOODS[name]
    likelihood = factory()
    d = likelihood(torch.randn(BATCH, DATA_DIM))
    assert d.batch_shape == (BATCH,) and d.event_shape == (DATA_DIM,)
    x = make_data()
    assert torch.isfinite(d.log_prob(x)).all()
    assert d.support.check(x).all()
    vae = pv.VAE(DATA_DIM, LATENT_DIM, likelihood=likelihood, hidden_dims=(8,))
    trace = poutine.trace(vae.model).get_trace(x)
    assert trace.nodes["x"]["fn"].batch_shape == (BATCH,)
    # Pyro's training loss is minus the sum of pyro_vae's per-example ELBOs: with the same
    # seed both draw the same z.
    pyro.set_rng_seed(1)
    svi_loss = pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    expected = -pv.elbo(vae, x).sum().item()
    assert abs(svi_loss - expected) < 1e-10 * abs(expected), (svi_loss, expected)


def _public_signatures():
    """(name, signature) of every exported function and class constructor, and the public
    methods of the VAE."""
    for name in pv.__all__:
        value = getattr(pv, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            try:
                yield name, inspect.signature(value)
            except ValueError:  # a builtin without a signature
                continue
    for name, method in inspect.getmembers(pv.VAE, inspect.isfunction):
        if not name.startswith("_"):
            yield f"VAE.{name}", inspect.signature(method)


# Names version 0.1 used for what now has one name (README, Changelog).
RETIRED = {"max_rows", "max_elements", "num_draws", "num_bins", "batch_size", "num_samples"}


def test_one_vocabulary_across_the_public_api():
    """Chunk sizes are chunk_size, Monte-Carlo draws num_particles, pixel levels num_levels,
    and every progress bar defaults to None (shown only on a terminal). The exceptions are
    different things: fit's batch_size is the SGD minibatch, VAE.sample's num_samples the
    number of images asked for."""
    different_things = {("fit", "batch_size"), ("VAE.sample", "num_samples")}
    progress_defaults = {}
    for name, signature in _public_signatures():
        for parameter in signature.parameters.values():
            if parameter.name in RETIRED:
                assert (name, parameter.name) in different_things, (name, parameter.name)
            if parameter.name == "progress":
                progress_defaults[name] = parameter.default
    assert {"fit", "log_likelihood", "kl_decomposition"} <= set(progress_defaults)
    assert set(progress_defaults.values()) == {None}, progress_defaults


def test_help_on_the_vae_shows_its_own_constructor_text():
    text = pydoc.render_doc(pv.VAE, renderer=pydoc.plaintext)
    constructor = text[text.index("__init__(") :].split("\n |  \n")[0]
    assert "Initialize internal Module state" not in text
    assert "component contract" in constructor, constructor
