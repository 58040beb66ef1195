"""Plain torch networks. Nothing probabilistic lives here: the distributions are built in
:mod:`pyro_vae.components.encoders` and :mod:`pyro_vae.components.likelihoods` from what these
networks compute."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import Tensor, nn

# The widths of every MLP here when none are given: one hidden layer of 400 units (the
# encoders', decoders' and classifiers' default, and scripts/train.py's --hidden-dims).
DEFAULT_HIDDEN_DIMS = (400,)


class MLP(nn.Sequential):
    """A multilayer perceptron: ``Linear -> activation`` for each hidden layer, then a final
    ``Linear`` with no activation (its output feeds a distribution's parameters).

    :param int in_dim: input features.
    :param hidden_dims: widths of the hidden layers; empty for a linear map.
    :param int out_dim: output features.
    :param activation: a module class for the hidden non-linearity.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        activation: type[nn.Module] = nn.Softplus,
    ) -> None:
        dims = [in_dim, *hidden_dims]
        layers: list[nn.Module] = []
        for d_in, d_out in pairwise(dims):
            layers += [nn.Linear(d_in, d_out), activation()]
        layers.append(nn.Linear(dims[-1], out_dim))
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim


def _downsampled(size: int) -> int:
    # A 3x3 convolution with stride 2 and padding 1 maps n pixels to ceil(n / 2).
    return (size + 1) // 2


class ConvNet(nn.Module):
    """A small convolutional network from flattened images to ``out_dim`` features: two
    stride-2 convolutions (``channels``), then a linear read-out. Works for images of any size.

    :param image_shape: ``(channels, height, width)`` of one image; the input is
        ``(..., channels * height * width)``.
    :param int out_dim: output features.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        out_dim: int,
        channels: Sequence[int] = (32, 64),
        activation: type[nn.Module] = nn.Softplus,
    ) -> None:
        super().__init__()
        self.image_shape = check_image_shape(image_shape)
        c, h, w = self.image_shape
        layers: list[nn.Module] = []
        for c_in, c_out in pairwise([c, *channels]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), activation()]
            h, w = _downsampled(h), _downsampled(w)
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.linear = nn.Linear(channels[-1] * h * w, out_dim)
        self.in_dim = c * self.image_shape[1] * self.image_shape[2]
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        # Leading dimensions (a particle dimension, say) are folded into the batch and back.
        leading = x.shape[:-1]
        images = x.reshape(-1, *self.image_shape)
        return self.linear(self.conv(images)).reshape(*leading, self.out_dim)


class DeconvNet(nn.Module):
    """The mirror of :class:`ConvNet`: a linear layer to a coarse feature map, then stride-2
    transposed convolutions back to the image size (cropped when the size is odd), flattened.

    :param int in_dim: input features (the latent size).
    :param image_shape: ``(channels, height, width)`` of the output image; the output is
        ``(..., channels * height * width)``, one value per pixel (the likelihood's parameter).
    """

    def __init__(
        self,
        in_dim: int,
        image_shape: Sequence[int],
        channels: Sequence[int] = (64, 32),
        activation: type[nn.Module] = nn.Softplus,
    ) -> None:
        super().__init__()
        self.image_shape = check_image_shape(image_shape)
        c, h, w = self.image_shape
        for _ in channels:
            h, w = _downsampled(h), _downsampled(w)
        self.coarse_shape = (channels[0], h, w)
        self.linear = nn.Sequential(nn.Linear(in_dim, channels[0] * h * w), activation())
        layers: list[nn.Module] = []
        for c_in, c_out in pairwise(channels):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), activation()]
        # The last layer has no activation: its outputs are logits or locations.
        layers.append(nn.ConvTranspose2d(channels[-1], c, 4, stride=2, padding=1))
        self.deconv = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = c * self.image_shape[1] * self.image_shape[2]

    def forward(self, z: Tensor) -> Tensor:
        leading = z.shape[:-1]
        coarse = self.linear(z.reshape(-1, z.shape[-1])).reshape(-1, *self.coarse_shape)
        _, height, width = self.image_shape
        images = self.deconv(coarse)[..., :height, :width]
        return images.reshape(*leading, self.out_dim)


def check_image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(channels, height, width)`` from ``(height, width)`` (one channel) or ``(channels,
    height, width)``; any other length, or a size below 1, is refused."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(
            f"image_shape must be (height, width) or (channels, height, width) of positive "
            f"sizes, got {shape}"
        )
    return shape


def feature_network(
    in_dim: int,
    out_dim: int,
    hidden_dims: Sequence[int],
    image_shape: Sequence[int] | None = None,
) -> nn.Module:
    """The network an encoder reads x through: an :class:`MLP` with ``hidden_dims``, or a
    :class:`ConvNet` when ``image_shape`` is given (``hidden_dims`` is then unused)."""
    if image_shape is None:
        return MLP(in_dim, hidden_dims, out_dim)
    net = ConvNet(image_shape, out_dim)
    if net.in_dim != in_dim:
        raise ValueError(f"image_shape {tuple(image_shape)} has {net.in_dim} values, not {in_dim}")
    return net


def output_layer(net: object) -> nn.Linear:
    """The final linear layer of an :class:`MLP` or a :class:`ConvNet`: the read-out whose
    rows produce the network's outputs."""
    if isinstance(net, ConvNet):
        layer: object = net.linear
    elif isinstance(net, nn.Sequential):
        layer = net[-1]
    else:
        layer = None
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(net).__name__} does not end in a linear layer")
    return layer
