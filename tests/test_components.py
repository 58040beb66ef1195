"""Every component combination trains, by name or by object, and rebuilds from a checkpoint."""

import itertools

import pyro
import pytest
import torch
from conftest import binary_data
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

import pyro_vae as pv

DATA_DIM, LATENT_DIM, BATCH = 16, 3, 6
IMAGE_SHAPE = (4, 4)

# Data each likelihood accepts: binary, grayscale in [0, 1], reals, 8-bit levels.
DATA = {
    "bernoulli": lambda: binary_data(BATCH, DATA_DIM, 0.5),
    "continuous-bernoulli": lambda: torch.rand(BATCH, DATA_DIM),
    "normal": lambda: torch.randn(BATCH, DATA_DIM),
    # Laplace's gradient in its location is a sum of signs, which can cancel to exactly zero
    # on centred data; shifted data keep every sign the same.
    "laplace": lambda: torch.randn(BATCH, DATA_DIM) + 5.0,
    "discretized-logistic": lambda: torch.randint(0, 256, (BATCH, DATA_DIM)) / 255.0,
}
OBJECTIVES = {
    "Trace_ELBO": lambda: Trace_ELBO(),
    "TraceMeanField_ELBO": lambda: TraceMeanField_ELBO(),
    "IWAE": lambda: RenyiELBO(alpha=0, num_particles=3),
}
# The VampPrior is a mixture of the encoder's posteriors, so it needs posteriors with a
# density at every z; with these encoders it must refuse, saying so.
REFUSED = {("vamp", "iaf"), ("vamp", "delta")}


def test_names_cover_every_exported_component():
    assert set(DATA) == set(pv.LIKELIHOODS)
    kinds = {"Prior": pv.PRIORS, "Encoder": pv.ENCODERS, "Likelihood": pv.LIKELIHOODS}
    for suffix, names in kinds.items():
        exported = [n for n in pv.__all__ if n.endswith(suffix)]
        built = set()
        for name in names:
            options = {suffix.lower(): name}
            if name == "vamp":
                options["num_components"] = 2
            vae = pv.build_vae(DATA_DIM, LATENT_DIM, hidden_dims=(8,), **options)
            built.add(type(getattr(vae, suffix.lower())).__name__)
        assert built == set(exported), suffix


def assert_one_step_trains_everything(vae: pv.VAE, x: torch.Tensor, loss) -> None:
    with pyro.get_param_store().scope():
        value = loss.loss_and_grads(vae.model, vae.guide, x)
    assert torch.isfinite(torch.tensor(value))
    for name, parameter in vae.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} has a zero gradient"


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("likelihood", pv.LIKELIHOODS)
@pytest.mark.parametrize(
    "prior, encoder", list(itertools.product(pv.PRIORS, pv.ENCODERS)), ids="-".join
)
def test_every_prior_encoder_likelihood_and_objective_takes_a_step(
    prior, encoder, likelihood, objective
):
    def build():
        return pv.build_vae(
            DATA_DIM,
            LATENT_DIM,
            prior=prior,
            encoder=encoder,
            likelihood=likelihood,
            hidden_dims=(8,),
            num_components=4 if prior in ("mixture", "vamp") else None,
        )

    if (prior, encoder) in REFUSED:
        with pytest.raises(ValueError, match="VampPrior needs posteriors with a density"):
            build()
        return
    assert_one_step_trains_everything(build(), DATA[likelihood](), OBJECTIVES[objective]())


@pytest.mark.parametrize("encoder", pv.ENCODERS)
@pytest.mark.parametrize("likelihood", pv.LIKELIHOODS)
def test_convolutional_pair_takes_a_step(encoder, likelihood):
    vae = pv.build_vae(
        DATA_DIM,
        LATENT_DIM,
        encoder=encoder,
        likelihood=likelihood,
        decoder="conv",
        image_shape=IMAGE_SHAPE,
    )
    assert isinstance(vae.decoder, pv.DeconvNet)
    assert isinstance(vae.encoder.net, pv.ConvNet)
    assert_one_step_trains_everything(vae, DATA[likelihood](), Trace_ELBO())


@pytest.mark.parametrize("image_shape", [(8, 8), (28, 28), (1, 5, 7), (3, 9, 4)])
def test_conv_networks_fit_images_of_any_size(image_shape):
    size = torch.Size(image_shape).numel()
    encoder_net, decoder_net = pv.ConvNet(image_shape, 6), pv.DeconvNet(4, image_shape)
    assert encoder_net(torch.rand(5, size)).shape == (5, 6)
    # Leading particle dimensions pass through.
    assert decoder_net(torch.randn(2, 5, 4)).shape == (2, 5, size)


def test_fit_trains_a_vamp_prior_and_its_shared_encoder():
    x = binary_data(40, DATA_DIM)
    vae = pv.build_vae(DATA_DIM, LATENT_DIM, prior="vamp", num_components=5, hidden_dims=(8,))
    assert vae.prior._encoder is vae.encoder
    # The encoder is referenced, not owned: its weights are in the state dict once.
    assert not any(k.startswith("prior.") and "net" in k for k in vae.state_dict())
    before = {k: v.clone() for k, v in vae.named_parameters()}
    pv.fit(vae, x, num_epochs=2, batch_size=10, progress=False)
    assert all(not torch.equal(before[k], v) for k, v in vae.named_parameters())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prior": "gaussian"}, "unknown prior 'gaussian'; choose one of standard-normal"),
        ({"encoder": "lstm"}, "unknown encoder 'lstm'"),
        ({"likelihood": "poisson"}, "unknown likelihood 'poisson'"),
        ({"decoder": "conv"}, "decoder 'conv' needs the data's image_shape"),
        ({"decoder": "conv", "image_shape": (3, 3)}, "has 9 values, but data_dim is 16"),
        ({"num_components": 3}, "num_components is for the mixture and vamp priors"),
        ({"likelihood": "normal", "likelihood_scale": "big"}, "likelihood_scale must be"),
        ({"likelihood": "discretized-logistic", "likelihood_scale": 0.1}, "learns its scale"),
        ({"encoder": "iaf", "prior": "vamp"}, "prior: VampPrior needs posteriors"),
    ],
)
def test_build_vae_refuses_bad_names_and_combinations(options, message):
    with pytest.raises(ValueError, match=message):
        pv.build_vae(DATA_DIM, LATENT_DIM, **options)


@pytest.mark.parametrize(
    "options",
    [
        {"prior": "mixture", "num_components": 3, "encoder": "full-covariance"},
        {"prior": "vamp", "num_components": 3, "likelihood": "continuous-bernoulli"},
        {"prior": "flow", "encoder": "iaf", "flow_depth": 3, "likelihood": "laplace"},
        {"prior": "diagonal-normal", "encoder": "delta", "likelihood": "normal"},
        {
            "likelihood": "discretized-logistic",
            "likelihood_scale": "learned-per-feature",
            "num_bins": 17,
            "decoder": "conv",
            "image_shape": [4, 4],
            "beta": 0.5,
        },
    ],
)
def test_checkpoint_rebuilds_every_component_exactly(tmp_path, options):
    x = DATA[options.get("likelihood", "bernoulli")]()
    if options.get("num_bins") == 17:
        x = torch.randint(0, 17, (BATCH, DATA_DIM)) / 16.0
    config = {"data_dim": DATA_DIM, "latent_dim": LATENT_DIM, "hidden_dims": [8], **options}
    vae = pv.build_vae(**config)
    pv.fit(vae, x, num_epochs=2, batch_size=3, progress=False)  # move away from the init
    pv.save_checkpoint(tmp_path / "c.pt", vae, config)
    loaded, payload = pv.load_checkpoint(tmp_path / "c.pt")
    assert payload["config"] == config
    for part in ("prior", "encoder", "decoder", "likelihood"):
        assert type(getattr(loaded, part)) is type(getattr(vae, part)), part
    assert loaded.beta == vae.beta
    loaded = loaded.to(torch.float64)
    pyro.set_rng_seed(1)
    expected = pv.elbo(vae, x)
    pyro.set_rng_seed(1)
    torch.testing.assert_close(pv.elbo(loaded, x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("image_shape", [None, IMAGE_SHAPE])
def test_full_covariance_encoder_starts_diagonal_and_learns_correlations(image_shape):
    encoder = pv.FullCovarianceNormalEncoder(DATA_DIM, LATENT_DIM, (8,), image_shape=image_shape)
    x = binary_data(40, DATA_DIM)
    assert torch.equal(encoder(x).scale_tril.tril(-1), torch.zeros(40, LATENT_DIM, LATENT_DIM))
    vae = pv.VAE(DATA_DIM, LATENT_DIM, encoder=encoder, hidden_dims=(8,))
    pv.fit(vae, x, num_epochs=3, batch_size=10, progress=False)
    assert (encoder(x).scale_tril.tril(-1).abs() > 0).any()
