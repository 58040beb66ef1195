"""Per-example ELBO and the importance-weighted bound (exact cases are in test_ppca.py)."""

import pytest
import torch
from conftest import binary_data

import pyro_vae as pv


def test_elbo_terms_add_up_and_are_per_example():
    vae = pv.VAE(12, 3, hidden_dims=(8,))
    x = binary_data(9, 12)
    terms = pv.elbo_terms(vae, x, num_particles=3, batch_size=4)
    assert terms.reconstruction.shape == terms.kl.shape == (9,)
    torch.testing.assert_close(terms.elbo, terms.reconstruction - terms.kl)
    assert (terms.reconstruction < 0).all()  # log-probabilities of binary data


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
    gap = pv.log_likelihood(vae, x, num_samples=200) - pv.elbo(vae, x, num_particles=200)
    # E[IWAE_K] >= ELBO, strictly when q(z|x) is not the posterior (an untrained encoder).
    assert gap.mean() > 4 * gap.std() / len(x) ** 0.5


def test_importance_weighted_bound_does_no_minibatch_scaling():
    vae = pv.VAE(12, 3, hidden_dims=(8,))
    x = binary_data(30, 12)
    torch.manual_seed(3)
    whole = pv.log_likelihood(vae, x, num_samples=50)
    # Chunking over examples must not change the numbers' scale (DESIGN.md §4, trap 6).
    torch.manual_seed(3)
    chunked = pv.log_likelihood(vae, x, num_samples=50, max_rows=40)
    se = (whole - chunked).std() / len(x) ** 0.5
    assert (whole - chunked).mean().abs() < 4 * se + 1e-12


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"max_rows": -1}])
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
    mismatched = tmp_path / "mismatched.pt"
    pv.save_checkpoint(mismatched, vae, {"data_dim": 12, "latent_dim": 4, "hidden_dims": [8]})
    with pytest.raises(ValueError, match="do not fit the saved config") as refused:
        pv.load_checkpoint(mismatched)
    assert "\n" not in str(refused.value) and "size mismatch" in str(refused.value)
    other_architecture = tmp_path / "other.pt"
    pv.save_checkpoint(
        other_architecture,
        vae,
        {"data_dim": 12, "latent_dim": 3, "hidden_dims": [8], "encoder": "delta"},
    )
    with pytest.raises(ValueError, match="do not fit the saved config") as refused:
        pv.load_checkpoint(other_architecture)
    assert "\n" not in str(refused.value)
