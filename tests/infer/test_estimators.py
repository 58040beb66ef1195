"""Per-example ELBO and the importance-weighted bound (exact cases are in test_ppca.py)."""

import pytest
import torch
from conftest import binary_data
from test_ppca import ppca

import pyro_vae as pv
from pyro_vae import checkpoint


def test_elbo_terms_with_the_exact_posterior_give_log_p_x_per_example():
    """PPCA with its exact posterior: every particle's log p(x, z) − log q(z | x) is log p(x),
    so the particles' average is log p(x) exactly, example by example, through chunks that
    split the data (9 examples in chunks of 4). A sum over particles would give 7 log p(x)."""
    vae, marginal = ppca()
    x = marginal.sample((9,))
    terms = pv.elbo_terms(vae, x, num_particles=7, chunk_size=4)
    assert terms.reconstruction.shape == terms.kl.shape == (9,)
    torch.testing.assert_close(terms.elbo, marginal.log_prob(x), rtol=1e-10, atol=1e-10)


def test_elbo_terms_average_the_particles():
    """Each term is the mean over particles of its draws: across many copies of four examples
    it matches the closed-form KL and a reference Monte-Carlo reconstruction term within
    standard errors (a sum over 5 particles would be 5 times too large)."""
    vae = pv.VAE(6, 3, hidden_dims=(16,))
    with torch.no_grad():  # μ far from 0 and σ far from 1: a KL clearly above 0
        for p in vae.encoder.parameters():
            p.mul_(3.0)
    x = binary_data(4, 6)
    copies = 500
    terms = pv.elbo_terms(vae, x.repeat(copies, 1), num_particles=5, chunk_size=512)
    kl, reconstruction = terms.kl.reshape(copies, 4), terms.reconstruction.reshape(copies, 4)
    with torch.no_grad():
        loc, scale = vae.encode(x)
        exact_kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1 - scale.pow(2).log()).sum(-1)
        z = vae.encoder(x).sample((20000,))  # (draws, 4, latent)
        log_likelihood = vae.likelihood(vae.decoder(z)).log_prob(x)  # (draws, 4)

    def se(draws):
        return draws.std(0) / len(draws) ** 0.5

    assert (exact_kl > 20 * se(kl)).all()  # the test has something to find
    assert ((kl.mean(0) - exact_kl).abs() < 4 * se(kl)).all(), (kl.mean(0), exact_kl)
    reference = log_likelihood.mean(0)
    error = (se(reconstruction).pow(2) + se(log_likelihood).pow(2)).sqrt()
    assert (reference.abs() > 20 * error).all()
    assert ((reconstruction.mean(0) - reference).abs() < 4 * error).all()


def test_elbo_of_a_beta_vae_is_the_true_elbo():
    x = binary_data(9, 12)
    vae = pv.VAE(12, 3, hidden_dims=(8,), beta=4.0)
    torch.manual_seed(1)
    with_beta = pv.elbo(vae, x)
    vae.beta = 1.0
    torch.manual_seed(1)
    torch.testing.assert_close(with_beta, pv.elbo(vae, x))


def test_importance_weighted_bound_is_above_the_elbo():
    vae = pv.VAE(12, 3, hidden_dims=(8,))
    x = binary_data(100, 12)
    gap = pv.log_likelihood(vae, x, num_particles=200) - pv.elbo(vae, x, num_particles=200)
    # E[IWAE_K] >= ELBO, strictly when q(z|x) is not the posterior (an untrained encoder).
    assert gap.mean() > 4 * gap.std() / len(x) ** 0.5


def test_importance_weighted_bound_does_no_minibatch_scaling():
    vae = pv.VAE(12, 3, hidden_dims=(8,))
    x = binary_data(30, 12)
    torch.manual_seed(3)
    whole = pv.log_likelihood(vae, x, num_particles=50)
    # Chunking over examples must not change the numbers' scale (docs/design.md, "IWAE and N/B").
    torch.manual_seed(3)
    chunked = pv.log_likelihood(vae, x, num_particles=50, chunk_size=40)
    se = (whole - chunked).std() / len(x) ** 0.5
    assert (whole - chunked).mean().abs() < 4 * se + 1e-12


@pytest.mark.parametrize("kwargs", [{"num_particles": 0}, {"chunk_size": -1}])
def test_log_likelihood_rejects_bad_counts(kwargs):
    vae = pv.VAE(12, 3, hidden_dims=(8,))
    with pytest.raises(ValueError, match="must be a positive integer"):
        pv.log_likelihood(vae, binary_data(3, 12), **kwargs)


def test_checkpoint_round_trip_gives_the_same_elbo(tmp_path):
    vae = pv.VAE(12, 3, hidden_dims=(8, 6))
    pv.fit(vae, binary_data(32, 12), num_epochs=2, batch_size=8, progress=False)
    path = tmp_path / "checkpoint.pt"
    config = {"data_dim": 12, "latent_dim": 3, "hidden_dims": [8, 6]}
    pv.save_checkpoint(path, vae, config, epoch=2)
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["epoch"] == 2 and raw["config"] == config
    loaded, _ = pv.load_checkpoint(path)
    x = binary_data(16, 12)
    torch.manual_seed(5)
    expected = pv.elbo(vae, x)
    torch.manual_seed(5)
    torch.testing.assert_close(pv.elbo(loaded, x), expected, rtol=0, atol=0)


def test_corrupt_or_mismatched_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        pv.load_checkpoint(bad)
    vae = pv.VAE(12, 3, hidden_dims=(8,))

    def written_past_save_checks(path, config):
        # save_checkpoint refuses a config that does not describe its model; a file written
        # otherwise (by hand, or by an older version) must still be refused when loaded.
        payload = {"format": checkpoint.FORMAT, "config": config, "state_dict": vae.state_dict()}
        torch.save(payload, path)
        return path

    mismatched = written_past_save_checks(
        tmp_path / "mismatched.pt", {"data_dim": 12, "latent_dim": 4, "hidden_dims": [8]}
    )
    with pytest.raises(ValueError, match="do not fit the saved config") as refused:
        pv.load_checkpoint(mismatched)
    assert "\n" not in str(refused.value) and "size mismatch" in str(refused.value)
    other_architecture = written_past_save_checks(
        tmp_path / "other.pt",
        {"data_dim": 12, "latent_dim": 3, "hidden_dims": [8], "encoder": "delta"},
    )
    with pytest.raises(ValueError, match="do not fit the saved config") as refused:
        pv.load_checkpoint(other_architecture)
    assert "\n" not in str(refused.value)
