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


def binary_data(num: int, dim: int, p: float = 0.3) -> torch.Tensor:
    """Random binary data in the default dtype."""
    return torch.bernoulli(torch.full((num, dim), p))
