"""Typed reads of a Pyro trace's sites.

Pyro types a site's ``fn`` as any callable and its ``value`` as optional. At a sample site the
``fn`` is the distribution sampled and the value is set once the site has run; these helpers
say so to the type checker, and fail loudly if a site is not what the caller expects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message


def site_distribution(site: Message) -> torch.distributions.Distribution:
    """The distribution a sample site drew from (or scored its observation with)."""
    fn = site["fn"]
    if not isinstance(fn, torch.distributions.Distribution):
        raise TypeError(f"site {site['name']!r} has no distribution: its fn is {fn!r}")
    return fn


def site_value(site: Message) -> Tensor:
    """The value a sample site took."""
    value = site["value"]
    if not isinstance(value, Tensor):
        raise TypeError(f"site {site['name']!r} has no tensor value: it has {value!r}")
    return value
