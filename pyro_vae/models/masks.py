"""The quadrant-completion task of Pyro's ``examples/cvae``: which pixels of an image are given
(the condition c) and which are to be predicted (x), and the images split and merged by such a
mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyro_vae.components.networks import check_image_shape
from pyro_vae.models import contract

QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
# Pyro's examples/cvae/util.py (MaskImages): 1 given quadrant is the bottom-left, 2 the left
# half, 3 all but the bottom-right.
_GIVEN = {1: ("bottom-left",), 2: ("top-left", "bottom-left"), 3: QUADRANTS[:3]}


def quadrant_mask(image_shape: Sequence[int], given_quadrants: int) -> Tensor:
    """Which pixels of a flattened image are given (``True``) and which are to be predicted
    (``False``), for Pyro's quadrant task: 1 given quadrant is the bottom-left, 2 the left half,
    3 all but the bottom-right. The halves split at ``height // 2`` and ``width // 2`` as in
    Pyro's example; every channel gets the same mask.

    :param image_shape: ``(height, width)`` or ``(channels, height, width)``, each side at
        least 2 (so that no quadrant is empty).
    :param int given_quadrants: 1, 2 or 3.
    :returns: a bool tensor of ``channels * height * width`` elements.
    """
    # type(...) is int: True and 2.0 compare equal to 1 and 2 but are not a count of quadrants.
    if type(given_quadrants) is not int or given_quadrants not in _GIVEN:
        raise ValueError(
            f"given_quadrants must be 1, 2 or 3 (0 leaves nothing to condition on, 4 nothing "
            f"to predict), got {given_quadrants!r}"
        )
    channels, height, width = check_image_shape(image_shape)
    if height < 2 or width < 2:
        raise ValueError(
            f"image_shape {tuple(image_shape)}: height and width must be at least 2, so that "
            "every quadrant has pixels"
        )
    rows, cols = height // 2, width // 2
    spans = {
        "top-left": (slice(None, rows), slice(None, cols)),
        "top-right": (slice(None, rows), slice(cols, None)),
        "bottom-left": (slice(rows, None), slice(None, cols)),
        "bottom-right": (slice(rows, None), slice(cols, None)),
    }
    mask = torch.zeros(height, width, dtype=torch.bool)
    for quadrant in _GIVEN[given_quadrants]:
        mask[spans[quadrant]] = True
    return mask.expand(channels, height, width).reshape(-1)


def check_mask(mask: object, data_dim: int | None = None) -> Tensor:
    """``mask`` must be a 1-d bool tensor (``True``: given) with at least one given pixel and
    at least one to predict, of ``data_dim`` elements when that is given; returned unchanged."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 1:
        got = (
            f"{mask.dtype} of shape {tuple(mask.shape)}"
            if isinstance(mask, Tensor)
            else type(mask).__name__
        )
        raise ValueError(f"mask must be a 1-d bool tensor (True where given), got {got}")
    if data_dim is not None and mask.numel() != data_dim:
        raise ValueError(
            f"mask has {mask.numel()} elements but the images have {data_dim} values each"
        )
    num_given = int(mask.sum())
    if num_given == mask.numel():
        raise ValueError("mask gives every pixel: it leaves nothing to predict")
    if num_given == 0:
        raise ValueError(
            "mask gives no pixel: there is no condition (for that, use an unconditional "
            "pyro_vae.VAE)"
        )
    return mask


def split_by_mask(images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, c)``: the pixels to predict and the given pixels of ``images`` ``(N, D)``, each
    ``(N, ·)`` in the images' pixel order; the tuple that :func:`~pyro_vae.infer.fit.fit` takes."""
    mask = check_mask(mask)
    images = contract.check_form(images, "images", mask.numel())
    mask = mask.to(images.device)
    return images[:, ~mask], images[:, mask]


def merge_by_mask(x: Tensor, c: Tensor, mask: Tensor) -> Tensor:
    """The images ``(..., D)`` whose missing pixels are ``x`` and given pixels ``c`` (the
    inverse of :func:`split_by_mask`); leading dimensions broadcast."""
    mask = check_mask(mask)
    num_missing, num_given = int((~mask).sum()), int(mask.sum())
    if x.shape[-1] != num_missing or c.shape[-1] != num_given:
        raise ValueError(
            f"the mask has {num_missing} missing and {num_given} given pixels; got x with "
            f"{x.shape[-1]} and c with {c.shape[-1]} values per image"
        )
    shape = torch.broadcast_shapes(x.shape[:-1], c.shape[:-1])
    images = x.new_empty(*shape, mask.numel())
    images[..., ~mask.to(x.device)] = x.expand(*shape, num_missing)
    images[..., mask.to(x.device)] = c.expand(*shape, num_given)
    return images
