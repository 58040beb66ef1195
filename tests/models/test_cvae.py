"""The conditional VAE (pyro_vae/models/cvae.py): its log p(x | c) against a linear-Gaussian
model whose conditional is known in closed form, the refusal of bad masks and conditions before
training, a learning test, and the quadrant task's masks and figure."""

import copy
import math
import re
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO
from torch import distributions as td
from torch.nn import functional as F

import pyro_vae as pv
from pyro_vae.models.cvae import ConditionalBaseline, ConditionalNormalPrior, ConditionalVAE
from pyro_vae.models.cvae_estimators import completions, conditional_log_likelihood, sample_spread
from pyro_vae.models.masks import check_mask, merge_by_mask, quadrant_mask, split_by_mask
from pyro_vae.plots import plot_completions

# ---------------------------------------------------------------- the linear-Gaussian model
#
# z | c ~ N(A c + a, diag s²),  x | z, c ~ N(W z + B c + b, σ² I), so that
# x | c ~ N(W (A c + a) + B c + b, W diag(s²) Wᵀ + σ² I) and the posterior z | x, c is Gaussian
# with a covariance that depends on neither x nor c and a mean linear in (x, c). A CVAE with
# linear networks holds every one of these exactly.

C_DIM, X_DIM, Z_DIM = 2, 3, 2
# float64 here: the constants are made at import, before conftest sets the default dtype.
_f64 = {"dtype": torch.float64}
A = torch.tensor([[0.8, -0.3], [0.2, 0.5]], **_f64)
A_SHIFT = torch.tensor([0.1, -0.4], **_f64)
S = torch.tensor([0.7, 1.3], **_f64)
W = torch.tensor([[1.0, 0.4], [-0.6, 0.9], [0.3, -1.2]], **_f64)
B = torch.tensor([[0.5, 0.0], [-0.2, 0.3], [0.1, 0.4]], **_f64)
B_SHIFT = torch.tensor([0.2, -0.1, 0.3], **_f64)
SIGMA = 0.6


def softplus_inverse(y: torch.Tensor, floor: float) -> torch.Tensor:
    return torch.log(torch.expm1(y - floor))


def exact_conditional(c: torch.Tensor) -> td.MultivariateNormal:
    """p(x | c) by hand: the reference."""
    loc = (c @ A.T + A_SHIFT) @ W.T + c @ B.T + B_SHIFT
    cov = W @ torch.diag(S**2) @ W.T + SIGMA**2 * torch.eye(X_DIM)
    return td.MultivariateNormal(loc, cov)


def exact_posterior() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """p(z | x, c) = N(M_x x + M_c c + m, Σ): (M_x, M_c, m, Σ)."""
    prior_precision = torch.diag(S**-2)
    cov = torch.linalg.inv(prior_precision + W.T @ W / SIGMA**2)
    m_x = cov @ W.T / SIGMA**2
    m_c = cov @ (prior_precision @ A - W.T @ B / SIGMA**2)
    m = cov @ (prior_precision @ A_SHIFT - W.T @ B_SHIFT / SIGMA**2)
    return m_x, m_c, m, cov


def linear_gaussian_parts() -> dict:
    """The prior, decoder and likelihood of the model above, as pyro_vae parts with linear
    networks whose weights are set to the known parameters."""
    prior = ConditionalNormalPrior(C_DIM, Z_DIM, hidden_dims=())
    decoder = pv.MLP(Z_DIM + C_DIM, (), X_DIM)
    with torch.no_grad():
        read = prior.net[0]
        read.weight.zero_()
        read.weight[:Z_DIM] = A
        read.bias[:Z_DIM] = A_SHIFT
        read.bias[Z_DIM:] = softplus_inverse(S, prior.min_scale)
        decoder[0].weight.copy_(torch.cat([W, B], dim=1))  # the decoder reads [z, c]
        decoder[0].bias.copy_(B_SHIFT)
    return {"prior": prior, "decoder": decoder, "likelihood": pv.NormalLikelihood(SIGMA)}


def exact_guide() -> pv.FullCovarianceNormalEncoder:
    """q(z | x, c) = p(z | x, c) exactly: a linear full-covariance encoder of [x, c]."""
    m_x, m_c, m, cov = exact_posterior()
    encoder = pv.FullCovarianceNormalEncoder(X_DIM + C_DIM, Z_DIM, hidden_dims=())
    tril = torch.linalg.cholesky(cov)
    rows, cols = torch.tril_indices(Z_DIM, Z_DIM, offset=-1)
    with torch.no_grad():
        read = encoder.net[0]
        read.weight.zero_()
        read.weight[:Z_DIM] = torch.cat([m_x, m_c], dim=1)
        read.bias[:Z_DIM] = m
        read.bias[Z_DIM : 2 * Z_DIM] = softplus_inverse(tril.diagonal(), encoder.min_scale)
        read.bias[2 * Z_DIM :] = tril[rows, cols]
    return encoder


def inexact_guide(inflate: float) -> pv.DiagonalNormalEncoder:
    """A diagonal q(z | x, c) at the exact posterior mean, with the posterior's marginal
    standard deviations times ``inflate``: wrong shape (no correlation), wider tails."""
    m_x, m_c, m, cov = exact_posterior()
    encoder = pv.DiagonalNormalEncoder(X_DIM + C_DIM, Z_DIM, hidden_dims=())
    with torch.no_grad():
        read = encoder.net[0]
        read.weight.zero_()
        read.weight[:Z_DIM] = torch.cat([m_x, m_c], dim=1)
        read.bias[:Z_DIM] = m
        scale = inflate * cov.diagonal().sqrt()
        read.bias[Z_DIM:] = softplus_inverse(scale, encoder.min_scale)
    return encoder


def linear_gaussian_data(num: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.randn(num, C_DIM)
    return exact_conditional(c).sample(), c


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_exact_guide_gives_log_p_x_given_c_exactly(beta):
    """With q(z | x, c) the true posterior, every importance weight is p(x | c) itself: the
    estimate equals the closed form for any K, chunked or not, and so do the losses fit
    trains with (Trace_ELBO, N/B-scaled for a minibatch, and RenyiELBO). β must not enter
    log p(x | c)."""
    cvae = ConditionalVAE(X_DIM, C_DIM, Z_DIM, encoder=exact_guide(), beta=beta,
                          **linear_gaussian_parts())  # fmt: skip
    x, c = linear_gaussian_data(5)
    expected = exact_conditional(c).log_prob(x)
    for num_particles, chunk_size in [(1, 4096), (7, 4096), (7, 10), (7, 3)]:
        estimate = conditional_log_likelihood(cvae, x, c, num_particles, chunk_size=chunk_size)
        torch.testing.assert_close(estimate, expected, rtol=0, atol=1e-10)
    if beta == 1.0:
        # The objectives fit trains: Trace_ELBO on the minibatch, scaled by N / B = 4, and
        # IWAE's RenyiELBO, its particles looped or vectorized (c broadcast over them).
        loss = Trace_ELBO().loss(cvae.model, cvae.guide, x, c, num_data=20)
        assert loss == pytest.approx(-4 * float(expected.sum()), rel=1e-12)
        for vectorize in (False, True):
            renyi = RenyiELBO(alpha=0, num_particles=3, vectorize_particles=vectorize)
            loss = renyi.loss(cvae.model, cvae.guide, x, c)
            assert loss == pytest.approx(-float(expected.sum()), rel=1e-12), vectorize


def test_importance_weights_converge_to_the_closed_form_within_standard_errors():
    """With a guide that is not the posterior, exp(estimate) is an unbiased estimate of
    p(x | c) for any K (the mean of K weights), and the K = 1 estimate is the ELBO, whose
    expectation is log p(x | c) − KL(q ‖ p(z | x, c)); both in closed form here. Checked over
    independent replicates, with 4-standard-error tolerances; the gap to log p(x | c) shrinks
    as K grows."""
    inflate = 1.5
    m_x, m_c, m, cov = exact_posterior()
    q_cov = torch.diag(inflate**2 * cov.diagonal())
    # The weights have a finite variance, so that the standard error means something, only if
    # 2 Σ⁻¹ − Σ_q⁻¹ is positive definite.
    assert bool(
        (torch.linalg.eigvalsh(2 * torch.linalg.inv(cov) - torch.linalg.inv(q_cov)) > 0).all()
    )
    cvae = ConditionalVAE(X_DIM, C_DIM, Z_DIM, encoder=inexact_guide(inflate),
                          **linear_gaussian_parts())  # fmt: skip
    x, c = linear_gaussian_data(4)
    replicates = 2000
    xs, cs = x.repeat(replicates, 1), c.repeat(replicates, 1)  # row r * 4 + i: example i
    log_p = exact_conditional(c).log_prob(x)
    posterior_mean = x @ m_x.T + c @ m_c.T + m
    kl = td.kl_divergence(
        td.MultivariateNormal(posterior_mean, q_cov), td.MultivariateNormal(posterior_mean, cov)
    )

    elbo = conditional_log_likelihood(cvae, xs, cs, num_particles=1, chunk_size=32768).reshape(
        replicates, 4
    )
    se = elbo.std(0) / math.sqrt(replicates)
    assert bool(((elbo.mean(0) - (log_p - kl)).abs() < 4 * se).all()), (elbo.mean(0), log_p - kl)
    assert bool((kl > 10 * se).all())  # the ELBO's gap is resolved: K = 1 is far from log p

    gaps = []
    for num_particles in (10, 50):
        estimate = conditional_log_likelihood(cvae, xs, cs, num_particles, chunk_size=400_000)
        ratio = torch.exp(estimate.reshape(replicates, 4) - log_p)  # p̂ / p, mean 1
        se = ratio.std(0) / math.sqrt(replicates)
        assert bool(((ratio.mean(0) - 1).abs() < 4 * se).all()), (num_particles, ratio.mean(0), se)
        gaps.append(float((log_p - estimate.reshape(replicates, 4).mean(0)).mean()))
    assert 0 < gaps[1] < gaps[0] < float(kl.mean())


def test_baseline_log_likelihood_is_its_bernoulli_cross_entropy():
    """The baseline has no latent: its estimate is exactly log p(x | c) under its Bernoulli
    output, the masked binary cross-entropy of Pyro's baseline, for any K."""
    baseline = ConditionalBaseline(6, 4, hidden_dims=(5,))
    c = torch.rand(7, 4)
    x = torch.bernoulli(torch.full((7, 6), 0.4))
    with torch.no_grad():
        logits = baseline.net(c)
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    for num_particles in (1, 3):
        torch.testing.assert_close(
            conditional_log_likelihood(baseline, x, c, num_particles), expected, rtol=0, atol=1e-12
        )
    loss = Trace_ELBO().loss(baseline.model, baseline.guide, x, c, num_data=14)
    assert float(loss) == pytest.approx(-2 * float(expected.sum()), rel=1e-12)


# ---------------------------------------------------------------- masks and conditions


def pyro_quadrant_mask(height: int, width: int, given: int) -> torch.Tensor:
    """Pyro's examples/cvae/util.py MaskImages, transcribed: the reference for the mask."""
    out = torch.zeros(height, width)
    out[height // 2 :, : width // 2] = -1
    if given == 2:
        out[:, : width // 2] = -1
    if given == 3:
        out[: height // 2, :] = -1
    return (out == -1).reshape(-1)  # -1 in Pyro's output: the pixels given as input


@pytest.mark.parametrize("shape", [(28, 28), (5, 7), (2, 2), (8, 8)])
@pytest.mark.parametrize("given", [1, 2, 3])
def test_quadrant_mask_follows_pyro(shape, given):
    mask = quadrant_mask(shape, given)
    assert torch.equal(mask, pyro_quadrant_mask(*shape, given))
    # Channels share the mask.
    assert torch.equal(quadrant_mask((3, *shape), given), mask.repeat(3))


@pytest.mark.parametrize("given", [0, 4, -1, True, 2.0, "2", None])
def test_quadrant_mask_refuses_a_number_of_quadrants_other_than_1_2_3(given):
    with pytest.raises(ValueError, match="given_quadrants must be 1, 2 or 3"):
        quadrant_mask((28, 28), given)


@pytest.mark.parametrize("shape", [(1, 8), (8, 1), (3, 1, 5), (0, 4)])
def test_quadrant_mask_refuses_images_with_an_empty_quadrant(shape):
    with pytest.raises(ValueError, match="image_shape"):
        quadrant_mask(shape, 2)


def test_masks_that_leave_nothing_to_predict_or_nothing_given_are_refused():
    images = torch.rand(3, 4)
    with pytest.raises(ValueError, match="nothing to predict"):
        split_by_mask(images, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no condition"):
        split_by_mask(images, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        split_by_mask(images, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="4 values"):
        check_mask(torch.tensor([True, False, True]), 4)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        split_by_mask(images, torch.tensor([True, False, True]))


def test_split_and_merge_are_inverse():
    images = torch.rand(3, 2, 3)  # two leading dims: merge broadcasts over them
    mask = torch.tensor([True, False, False])
    x, c = split_by_mask(images.reshape(6, 3), mask)
    assert torch.equal(x, images.reshape(6, 3)[:, 1:]) and torch.equal(
        c, images.reshape(6, 3)[:, :1]
    )
    assert torch.equal(merge_by_mask(x, c, mask), images.reshape(6, 3))
    with pytest.raises(ValueError, match="2 missing and 1 given"):
        merge_by_mask(c, x, mask)


def small_quadrant_data(num: int = 40):
    mask = quadrant_mask((4, 4), 1)
    images = torch.rand(num, 16)
    return mask, *split_by_mask(images, mask)


@pytest.mark.parametrize("kind", ["cvae", "baseline"])
def test_conditions_of_the_wrong_shape_are_refused_before_training(kind):
    _, x, c = small_quadrant_data()
    module = (
        ConditionalVAE(12, 4, 2, hidden_dims=(8,))
        if kind == "cvae"
        else ConditionalBaseline(12, 4, hidden_dims=(8,))
    )
    before = copy.deepcopy(module.state_dict())
    bad_conditions = {
        "too few features": c[:, :3],
        "too many features": torch.cat([c, c], 1),
        "images, not flattened rows": c.reshape(40, 2, 2),
    }
    for bad in bad_conditions.values():
        with pytest.raises(ValueError, match=r"condition c must have shape \(10, 4\)"):
            pv.fit(module, (x, bad), num_epochs=1, batch_size=10)
        with pytest.raises(ValueError, match=r"condition must have shape \(N, 4\)"):
            conditional_log_likelihood(module, torch.bernoulli(x), bad)
    with pytest.raises(ValueError, match="needs the condition c"):
        pv.fit(module, x, num_epochs=1, batch_size=10)
    with pytest.raises(ValueError, match="as many rows"):
        pv.fit(module, (x, c[:30]), num_epochs=1, batch_size=10)
    with pytest.raises(ValueError, match="30 rows but x has 40"):
        conditional_log_likelihood(module, torch.bernoulli(x), c[:30])
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class OnePriorForAllConditions(torch.nn.Module):
    """Takes c but returns one N(0, I) for the whole batch: batch_shape () instead of (B,)."""

    def forward(self, c: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(torch.zeros(2), 1.0).to_event(1)


def test_parts_that_ignore_the_condition_are_refused_when_built():
    with pytest.raises(ValueError, match="prior: failed when called"):
        ConditionalVAE(12, 4, 2, prior=pv.StandardNormalPrior(2))  # takes no argument
    with pytest.raises(ValueError, match=r"prior: for c expected batch_shape \(2,\)"):
        ConditionalVAE(12, 4, 2, prior=OnePriorForAllConditions())
    with pytest.raises(ValueError, match="encoder"):
        # An encoder of x alone cannot read [x, c].
        ConditionalVAE(12, 4, 2, encoder=pv.DiagonalNormalEncoder(12, 2))
    with pytest.raises(ValueError, match="likelihood"):
        ConditionalVAE(12, 4, 2, decoder=pv.MLP(6, (), 16))


# ---------------------------------------------------------------- learning


def two_mode_data(num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """c: 4 random bits. x: 4 pixels that are all 1 or all 0 by a fair coin that c does not
    reveal, then a copy of c. Given c, x takes 2 equally likely values: log p(x | c) = −log 2.
    The baseline's pixels are independent given c, so the best it can do is −4 log 2 (each coin
    pixel a fair coin, the copy exact)."""
    c = torch.bernoulli(torch.full((num, 4), 0.5), generator=generator)
    coin = torch.bernoulli(torch.full((num, 1), 0.5), generator=generator)
    return torch.cat([coin.expand(num, 4), c], 1), c


@pytest.mark.slow
def test_cvae_learns_a_two_mode_conditional_the_baseline_cannot():
    generator = torch.Generator().manual_seed(0)
    x, c = two_mode_data(1000, generator)
    x_test, c_test = two_mode_data(500, generator)
    cvae = ConditionalVAE(8, 4, 2, hidden_dims=(32,))
    baseline = ConditionalBaseline(8, 4, hidden_dims=(32,))
    budget = {"num_epochs": 20, "batch_size": 100, "learning_rate": 1e-2}
    pv.fit(cvae, (x, c), **budget)
    pv.fit(baseline, (x, c), **budget)
    cvae_nll = -conditional_log_likelihood(cvae, x_test, c_test, num_particles=200)
    baseline_nll = -conditional_log_likelihood(baseline, x_test, c_test)
    # The baseline cannot beat 4 log 2 in expectation.
    se = float(baseline_nll.std()) / math.sqrt(len(baseline_nll))
    assert float(baseline_nll.mean()) > 4 * math.log(2) - 4 * se
    # The CVAE finds the coin and reads c: near the true log 2 (0.88 when written), where a
    # model that ignored c would have to carry its 4 bits in z as well (5 log 2 = 3.5).
    assert float(cvae_nll.mean()) < 2 * math.log(2), float(cvae_nll.mean())
    # Its completions of one condition are the two modes, not their average.
    samples = cvae.sample(c_test[:1], num_samples=200)[:, 0]
    modes = torch.stack([torch.cat([torch.full((4,), value), c_test[0]]) for value in (0.0, 1.0)])
    nearest = (samples[:, None, :] - modes).abs().mean(-1).min(-1).values
    assert float(nearest.mean()) < 0.1
    assert 0.2 < float((samples[:, 0] > 0.5).double().mean()) < 0.8  # both modes drawn


# ---------------------------------------------------------------- the rest of the API


def test_copies_get_their_own_pyro_names_and_train_on_their_own():
    cvae = ConditionalVAE(12, 4, 2, hidden_dims=(8,))
    twin = copy.deepcopy(cvae)
    assert twin._pyro_name != cvae._pyro_name
    assert twin.prior._pyro_name == twin._pyro_name + ".prior"
    _, x, c = small_quadrant_data()
    before = copy.deepcopy(cvae.state_dict())
    pv.fit(twin, (x, c), num_epochs=1, batch_size=10)
    assert all(torch.equal(before[k], v) for k, v in cvae.state_dict().items())
    assert not torch.equal(before["prior.net.0.weight"], twin.state_dict()["prior.net.0.weight"])
    # Every entry of Pyro's store is the tensor of the model whose name prefixes it.
    owners = {cvae._pyro_name: cvae, twin._pyro_name: twin}
    store = pyro.get_param_store()
    assert any(re.split(r"[.$]", name)[0] == twin._pyro_name for name in store.keys())
    for name in store.keys():
        owner = owners[re.split(r"[.$]", name)[0]]
        assert any(store._params[name] is p for p in owner.parameters()), name


def test_sample_spread_is_the_spread_of_completions_per_condition():
    """The per-condition standard deviation of the completions over draws of z, averaged over
    pixels: the direct computation from the same draws; 0 when the decoder ignores z."""
    _, _, c = small_quadrant_data(5)
    cvae = ConditionalVAE(12, 4, 2, hidden_dims=(8,))
    pyro.set_rng_seed(3)
    spread = sample_spread(cvae, c, num_particles=50)
    pyro.set_rng_seed(3)
    draws = cvae.sample(c, num_samples=50)  # (50, 5, 12)
    expected = torch.stack([draws[:, i].std(0).mean() for i in range(5)])
    torch.testing.assert_close(spread, expected, rtol=0, atol=1e-12)
    assert bool((spread > 0).all())
    with torch.no_grad():
        cvae.decoder[0].weight[:, :2] = 0  # the decoder reads [z, c]: z's columns cut
    torch.testing.assert_close(  # zero up to the rounding of a mean of equal numbers
        sample_spread(cvae, c, num_particles=50), torch.zeros(5), rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="num_particles >= 2"):
        sample_spread(cvae, c, num_particles=1)


def test_completions_keep_the_given_pixels_and_fill_the_missing(tmp_path):
    mask, x, c = small_quadrant_data(6)
    cvae = ConditionalVAE(12, 4, 2, hidden_dims=(8,))
    baseline = ConditionalBaseline(12, 4, hidden_dims=(8,))
    images = merge_by_mask(x, c, mask)
    rows = completions(cvae, baseline, images, mask, (4, 4), num_completions=3)
    assert rows.samples.shape == (3, 6, 16)
    assert torch.isnan(rows.inputs[:, ~mask]).all() and torch.equal(rows.inputs[:, mask], c)
    assert torch.equal(rows.truth, images)
    for predicted in (rows.baseline, *rows.samples):
        assert torch.equal(predicted[:, mask], c)
    torch.testing.assert_close(rows.baseline[:, ~mask], baseline.predict(c))
    assert not torch.equal(rows.samples[0], rows.samples[1])  # separate draws of z
    path = tmp_path / "completions.png"
    plot_completions(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_importing_the_module_does_not_load_pyplot():
    code = "import pyro_vae.models.cvae, sys; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_cvae_loss_is_the_beta_elbo_with_beta_on_the_guide_s_z_too():
    """With β ≠ 1 the loss is −Σ [log p(x | z, c) + β (log p(z | c) − log q(z | x, c))]: β
    scales z in the guide as in the model (docs/design.md, "β"), so that training, and every
    step of a KL warm-up, optimizes the β-ELBO."""
    _, x, c = small_quadrant_data(5)
    x = torch.bernoulli(x)
    beta = 0.25
    cvae = ConditionalVAE(12, 4, 2, hidden_dims=(8,), beta=beta)
    guide = pyro.poutine.trace(cvae.guide).get_trace(x, c)
    z = guide.nodes["z"]["value"]
    log_q = cvae.encoder(torch.cat([x, c], -1)).log_prob(z)
    log_prior = cvae.prior(c).log_prob(z)
    log_lik = cvae.likelihood(cvae.decoder(torch.cat([z, c], -1))).log_prob(x)
    expected = -(log_lik + beta * (log_prior - log_q)).sum().detach()
    loss = Trace_ELBO().loss(
        pyro.poutine.replay(cvae.model, trace=guide),
        pyro.poutine.replay(cvae.guide, trace=guide),
        x,
        c,
    )
    assert loss == pytest.approx(float(expected), rel=1e-12)
    model = pyro.poutine.trace(pyro.poutine.replay(cvae.model, trace=guide)).get_trace(x, c)
    assert guide.nodes["z"]["scale"] == model.nodes["z"]["scale"] == beta


def test_sample_draws_z_from_the_conditional_prior():
    """A prior network whose p(z | c) is (3, −2) with σ ≈ 1e-4 for every c: every completion
    is the decoder's at z = (3, −2), which a draw from N(0, I) would not give."""
    _, _, c = small_quadrant_data(5)
    cvae = ConditionalVAE(12, 4, 2, hidden_dims=(8,))
    last = [m for m in cvae.prior.net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([3.0, -2.0, -30.0, -30.0]))  # μ, then σ's raw values
    completions = cvae.sample(c, num_samples=50)
    z = torch.tensor([3.0, -2.0]).expand(5, 2)
    expected = cvae.likelihood(cvae.decoder(torch.cat([z, c], -1))).mean.detach()
    assert completions.shape == (50, 5, 12)
    torch.testing.assert_close(completions, expected.expand(50, 5, 12), rtol=0, atol=1e-3)
