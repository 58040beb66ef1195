"""Unit tests run in float64 with fixed seeds and an empty Pyro param store."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def float64_seeded_clean_store():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(previous)
    pyro.clear_param_store()


@pytest.fixture
def float32():
    """For the tests that run the scripts: they run in torch's default float32, as from a
    shell (the fixture above sets float64 first, and restores the default afterwards)."""
    torch.set_default_dtype(torch.float32)


def binary_data(num: int, dim: int, p: float = 0.3) -> torch.Tensor:
    """Random binary data in the default dtype."""
    return torch.bernoulli(torch.full((num, dim), p))
