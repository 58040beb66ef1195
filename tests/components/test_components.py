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
    assert set(DATA) == set(pv.LIKELIHOOD_NAMES)
    kinds = {
        "Prior": pv.PRIOR_NAMES,
        "Encoder": pv.ENCODER_NAMES,
        "Likelihood": pv.LIKELIHOOD_NAMES,
    }
    for suffix, names in kinds.items():
        # The CVAE's parts take the condition; build_vae has no name for them.
        exported = [n for n in pv.__all__ if n.endswith(suffix) and not n.startswith("Conditional")]
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


def prior_encoder_pairs(refused: bool) -> list:
    """The (prior, encoder) pairs that build (or, with ``refused``, those that must not), with
    ids such as ``prior=vamp,encoder=full-covariance``: the names themselves hold hyphens."""
    return [
        pytest.param(prior, encoder, id=f"prior={prior},encoder={encoder}")
        for prior, encoder in itertools.product(pv.PRIOR_NAMES, pv.ENCODER_NAMES)
        if ((prior, encoder) in REFUSED) == refused
    ]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES), ids="objective={}".format)
@pytest.mark.parametrize("likelihood", pv.LIKELIHOOD_NAMES, ids="likelihood={}".format)
@pytest.mark.parametrize("prior, encoder", prior_encoder_pairs(refused=False))
def test_every_prior_encoder_likelihood_and_objective_takes_a_step(
    prior, encoder, likelihood, objective
):
    vae = pv.build_vae(
        DATA_DIM,
        LATENT_DIM,
        prior=prior,
        encoder=encoder,
        likelihood=likelihood,
        hidden_dims=(8,),
        num_components=4 if prior in ("mixture", "vamp") else None,
    )
    assert_one_step_trains_everything(vae, DATA[likelihood](), OBJECTIVES[objective]())


@pytest.mark.parametrize("prior, encoder", prior_encoder_pairs(refused=True))
def test_vamp_prior_refuses_encoders_without_a_density_everywhere(prior, encoder):
    with pytest.raises(ValueError, match="VampPrior needs posteriors with a density"):
        pv.build_vae(DATA_DIM, LATENT_DIM, prior=prior, encoder=encoder, num_components=4)


@pytest.mark.parametrize("encoder", pv.ENCODER_NAMES, ids="encoder={}".format)
@pytest.mark.parametrize("likelihood", pv.LIKELIHOOD_NAMES, ids="likelihood={}".format)
def test_convolutional_pair_takes_a_step(encoder, likelihood):
    vae = pv.build_vae(
        DATA_DIM,
        LATENT_DIM,
        encoder=encoder,
        likelihood=likelihood,
        network="conv",
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


def options_id(options: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in options.items())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prior": "gaussian"}, "unknown prior 'gaussian'; choose one of standard-normal"),
        ({"encoder": "lstm"}, "unknown encoder 'lstm'"),
        ({"likelihood": "poisson"}, "unknown likelihood 'poisson'"),
        ({"network": "conv"}, "network 'conv' needs the data's image_shape"),
        ({"network": "conv", "image_shape": (3, 3)}, "has 9 values, but data_dim is 16"),
        ({"network": "resnet"}, "unknown network 'resnet'; choose one of mlp, conv"),
        ({"decoder": "flow"}, "unknown decoder 'flow'; choose one of deterministic, bayesian"),
        # The conv layers are fixed: widths asked for would be silently ignored.
        (
            {"network": "conv", "image_shape": (4, 4), "hidden_dims": (8,)},
            "network 'conv' has fixed layers, so leave hidden_dims out",
        ),
        (
            {"network": "conv", "image_shape": (4, 4), "decoder": "bayesian"},
            "decoder 'bayesian' is an MLP: it needs network 'mlp'",
        ),
        # 0.1's names, where decoder "conv" also swapped the encoder's network.
        ({"decoder": "conv"}, "decoder 'conv' is a name of pyro_vae 0.1; write network='conv'"),
        ({"decoder": "bayesian-mlp"}, "write decoder='bayesian'"),
        ({"num_components": 3}, "num_components is for the mixture and vamp priors"),
        ({"likelihood": "normal", "likelihood_scale": "big"}, "likelihood_scale must be"),
        ({"likelihood": "discretized-logistic", "likelihood_scale": 0.1}, "learns its scale"),
        ({"encoder": "iaf", "prior": "vamp"}, "prior: VampPrior needs posteriors"),
    ],
    ids=lambda value: options_id(value) if isinstance(value, dict) else None,
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
            "num_levels": 17,
            "network": "conv",
            "image_shape": [4, 4],
            "beta": 0.5,
        },
    ],
    ids=options_id,
)
def test_checkpoint_rebuilds_every_component_exactly(tmp_path, options):
    x = DATA[options.get("likelihood", "bernoulli")]()
    if options.get("num_levels") == 17:
        x = torch.randint(0, 17, (BATCH, DATA_DIM)) / 16.0
    config = {"data_dim": DATA_DIM, "latent_dim": LATENT_DIM, **options}
    if options.get("network") != "conv":  # conv's layers are fixed
        config["hidden_dims"] = [8]
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


# ---------------------------------------------------------------- what the parts compute


def scale_rows(encoder: torch.nn.Module) -> slice:
    """The rows of the encoder's read-out layer that give the raw scales: [μ | raw σ | ...]."""
    d = encoder.latent_dim
    return slice(d, 2 * d)


def base_scale(posterior) -> torch.Tensor:
    """σ(x) of the Normal that each encoder's posterior is built on."""
    if isinstance(posterior, pyro.distributions.MultivariateNormal):
        return posterior.scale_tril.diagonal(dim1=-2, dim2=-1)
    if isinstance(posterior, pyro.distributions.TransformedDistribution):  # IAF: the base z₀
        posterior = posterior.base_dist
    return posterior.base_dist.scale


SCALED_ENCODERS = {
    "diagonal": pv.DiagonalNormalEncoder,
    "full-covariance": pv.FullCovarianceNormalEncoder,
    "iaf": pv.IAFEncoder,
}


@pytest.mark.parametrize("name", sorted(SCALED_ENCODERS))
def test_encoder_scale_is_softplus_of_the_raw_output_plus_the_floor(name):
    encoder = SCALED_ENCODERS[name](DATA_DIM, LATENT_DIM, (8,), min_scale=0.05)
    read_out = pv.components.networks.output_layer(encoder.net)
    captured = []
    handle = read_out.register_forward_hook(lambda module, args, out: captured.append(out))
    x = torch.rand(BATCH, DATA_DIM)
    scale = base_scale(encoder(x))
    handle.remove()
    raw = captured[0][:, scale_rows(encoder)]
    torch.testing.assert_close(scale, torch.nn.functional.softplus(raw) + 0.05, rtol=0, atol=0)

    # Raw outputs far below zero: softplus gives exactly 0 in float64, so σ is the floor itself.
    with torch.no_grad():
        read_out.weight[scale_rows(encoder)] = 0.0
        read_out.bias[scale_rows(encoder)] = -1e4
    assert torch.equal(base_scale(encoder(x)), torch.full((BATCH, LATENT_DIM), 0.05))


def test_iaf_encode_gives_the_mean_and_standard_deviation_of_its_draws():
    """VAE.encode estimates a flow posterior's moments from draws; σ must be their standard
    deviation (not the variance). The base σ is made small (about 0.05), so that σ and σ²
    differ by many standard errors."""
    vae = pv.VAE(DATA_DIM, LATENT_DIM, encoder=pv.IAFEncoder(DATA_DIM, LATENT_DIM, (8,)))
    with torch.no_grad():
        pv.components.networks.output_layer(vae.encoder.net).bias[scale_rows(vae.encoder)] -= 3.0
    x = binary_data(4, DATA_DIM, 0.5)
    with torch.no_grad():
        loc, scale = vae.encode(x)
        z = vae.encoder(x).sample((20000,))
    mean, std = z.mean(0), z.std(0)
    centred4 = (z - mean).pow(4).mean(0)
    # Standard errors of a sample mean and a sample std (any distribution: the std's from the
    # fourth moment), for encode's draws and for the reference draws together.
    n, big = pv.models.vae.ENCODE_PARTICLES, len(z)
    se_mean = std * (1 / n + 1 / big) ** 0.5
    se_std = ((centred4 - std.pow(4)) / (4 * std.pow(2))).sqrt() * (1 / n + 1 / big) ** 0.5
    assert ((std - std.pow(2)).abs() > 10 * se_std).all()  # σ and σ² are far apart here
    assert ((loc - mean).abs() < 4 * se_mean).all(), (loc, mean)
    assert ((scale - std).abs() < 4 * se_std).all(), (scale, std)


def test_diagonal_normal_prior_starts_at_the_standard_normal():
    prior = pv.DiagonalNormalPrior(LATENT_DIM)()
    assert torch.equal(prior.base_dist.loc, torch.zeros(LATENT_DIM))
    # softplus⁻¹(1) is stored as a float32 constant: σ = 1 to float32 rounding, not exactly.
    torch.testing.assert_close(prior.base_dist.scale, torch.ones(LATENT_DIM), rtol=0, atol=1e-8)
    z = torch.randn(BATCH, LATENT_DIM)
    standard = pv.StandardNormalPrior(LATENT_DIM)().log_prob(z)
    torch.testing.assert_close(prior.log_prob(z), standard, rtol=0, atol=1e-7)


def test_mixture_prior_starts_with_equal_weights_and_unit_scales():
    prior = pv.MixtureOfGaussiansPrior(LATENT_DIM, 4)
    p = prior()
    torch.testing.assert_close(p.mixture_distribution.probs, torch.full((4,), 0.25), rtol=0, atol=0)
    scales = p.component_distribution.base_dist.scale
    torch.testing.assert_close(scales, torch.ones(4, LATENT_DIM), rtol=0, atol=1e-8)


def vamp_log_prob_by_hand(prior: pv.VampPrior, z: torch.Tensor) -> torch.Tensor:
    """log (1/K) Σ_k q(z | u_k), straight from the encoder's posteriors at the pseudo-inputs."""
    posteriors = prior._encoder(prior.pseudo_inputs)
    log_q = posteriors.log_prob(z.unsqueeze(-2))  # (B, K)
    return torch.logsumexp(log_q, dim=-1) - torch.log(torch.tensor(float(prior.num_pseudo_inputs)))


def test_vamp_prior_is_the_equal_weight_mixture_of_its_pseudo_posteriors():
    vae = pv.build_vae(DATA_DIM, LATENT_DIM, prior="vamp", num_components=100, hidden_dims=(8,))
    z = 2 * torch.randn(BATCH, LATENT_DIM)
    with torch.no_grad():
        torch.testing.assert_close(
            vae.prior().log_prob(z), vamp_log_prob_by_hand(vae.prior, z), rtol=1e-12, atol=0
        )
        # K copies of one pseudo-input: the mixture is that one posterior, with no log K left
        # over (a mixture that lost its 1/K would be log 100 = 4.6 nats too high).
        vae.prior.pseudo_inputs.copy_(vae.prior.pseudo_inputs[:1].expand(100, -1))
        single = vae.encoder(vae.prior.pseudo_inputs[:1])
        torch.testing.assert_close(vae.prior().log_prob(z), single.log_prob(z), rtol=0, atol=1e-12)


def bayesian_decoder_cases() -> list:
    """The Bayesian decoder with every prior, every encoder and every likelihood (each varied
    alone from the defaults)."""
    cases = [("prior", name) for name in pv.PRIOR_NAMES if name != "standard-normal"]
    cases += [("encoder", name) for name in pv.ENCODER_NAMES if name != "diagonal"]
    cases += [("likelihood", name) for name in pv.LIKELIHOOD_NAMES]
    return [pytest.param(kind, name, id=f"{kind}={name}") for kind, name in cases]


@pytest.mark.parametrize("kind, name", bayesian_decoder_cases())
def test_bayesian_decoder_takes_a_step_with_every_part(kind, name):
    options = {kind: name}
    if name in ("mixture", "vamp"):
        options["num_components"] = 4
    vae = pv.build_vae(DATA_DIM, LATENT_DIM, hidden_dims=(8,), decoder="bayesian", **options)
    x = DATA[options.get("likelihood", "bernoulli")]()
    assert_one_step_trains_everything(vae, x, Trace_ELBO())
    assert any(n.startswith("decoder.raw_scales") for n, _ in vae.named_parameters())


def test_the_network_is_one_choice_that_the_encoder_and_decoder_both_follow():
    """An image_shape alone swaps nothing: the encoder and decoder are MLPs unless
    network="conv", and then both are convolutional."""
    mlp = pv.build_vae(DATA_DIM, LATENT_DIM, image_shape=IMAGE_SHAPE, hidden_dims=(8,))
    assert isinstance(mlp.encoder.net, pv.MLP) and isinstance(mlp.decoder, pv.MLP)
    conv = pv.build_vae(DATA_DIM, LATENT_DIM, image_shape=IMAGE_SHAPE, network="conv")
    assert isinstance(conv.encoder.net, pv.ConvNet) and isinstance(conv.decoder, pv.DeconvNet)


@pytest.mark.parametrize("flow", ["prior", "encoder"])
def test_flow_hidden_dims_sets_the_autoregressive_widths_of_both_flows(flow):
    """flow_hidden_dims means the same in FlowPrior and IAFEncoder: each layer's
    autoregressive network's hidden widths; hidden_dims is only ever the MLP's."""
    if flow == "prior":
        networks = [layer.arn for layer in pv.FlowPrior(LATENT_DIM, 2, (7, 5)).layers]
    else:
        encoder = pv.IAFEncoder(DATA_DIM, LATENT_DIM, (8,), flow_hidden_dims=(7, 5))
        networks = [layer.nn for layer in encoder.layers]
        assert encoder.net[0].out_features == 8  # hidden_dims: the encoder's MLP
    assert len(networks) == 2
    for network in networks:
        assert [linear.out_features for linear in network.layers[:-1]] == [7, 5]
