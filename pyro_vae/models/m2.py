"""The semi-supervised VAE "M2" of Kingma et al. (2014) as a Pyro model and guide, trained by
:func:`~pyro_vae.infer.fit.fit` like any other model:

- model: y ~ p(y) (uniform over ``num_labels`` classes), z ~ p(z),
  x ~ p(x | y, z) = likelihood(decoder(z, y));
- guide: y ~ q(y | x) = Categorical(classifier(x)), z ~ q(z | x, y) = encoder(x, y).

The data are one tensor of images and one of labels, with :data:`UNLABELLED` (-1) where the label
is unknown: ``fit(m2, (x, y), loss=m2.loss(), ...)``. For an unlabelled row the guide's y site is
marked ``infer={"enumerate": "parallel"}``, so ``TraceEnum_ELBO`` sums y out exactly,

    U(x) = Σ_y q(y | x) [log p(x, y, z_y) − log q(z_y | x, y)] + H(q(y | x)),

with one draw z_y ~ q(z | x, y) for each y; nothing here writes that sum. A labelled row observes
y in the model (its bound is L(x, y) = log p(x, y, z) − log q(z | x, y)) and adds the
classification term α · log q(y | x) as an observed site of the model, "y_aux", scaled by α
(Kingma et al.'s J^α). Pyro's ``ss_vae_M2`` example observes the same site in a second model
with a loss of its own; here it is a site of the one model, so that one ``fit`` trains it all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO
from pyro.nn import pyro_method
from pyro.poutine.util import is_validation_enabled
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_vae._checks import check_positive_float, check_positive_int
from pyro_vae.components.encoders import DiagonalNormalEncoder
from pyro_vae.components.likelihoods import BernoulliLikelihood
from pyro_vae.components.networks import MLP, DeconvNet, feature_network
from pyro_vae.components.priors import StandardNormalPrior
from pyro_vae.infer.batches import EpochOrder, FewInEveryBatch, Shuffled
from pyro_vae.models import contract
from pyro_vae.models.base import NamedPyroModule, PyroProgram, check_num_data, data_plate
from pyro_vae.models.labels import (
    UNLABELLED,
    check_label_tensor,
    default_alpha,
    labelled_per_batch,
)


class M2(PyroProgram):
    """The semi-supervised VAE M2 (Kingma et al. 2014): p(y) p(z) p(x | y, z), guide
    q(y | x) q(z | x, y).

    **Every batch holds labelled rows; each part is scaled by its own count.** ``fit`` takes
    each epoch's order from :meth:`epoch_order`: every batch holds ``labelled_per_batch``
    labelled rows (B_l) beside B_u = B − B_l unlabelled ones, an epoch being one pass over the
    unlabelled rows while the labelled ones are dealt in fresh shuffles. The labelled rows'
    sites are scaled by N_l / B_l and the unlabelled rows' by N_u / B_u (N_l is
    ``num_labelled``, N_u = N − N_l). Each labelled slot is a uniform draw from the N_l
    labelled rows and each unlabelled row is seen once an epoch, so each part of the loss (the
    labelled bound Σ_l L(x, y), the unlabelled bound Σ_u U(x) and the classification term
    α Σ_l log q(y | x)) is estimated without bias: the expected loss is Kingma et al.'s J^α.
    A uniform shuffle would put no labelled row in most batches when labels are rare, and the
    classification term would arrive as rare spikes (docs/design.md, "Why M2 fell").
    Within a batch, labelled and unlabelled rows go through separate sites in separate plates
    ("labelled", "unlabelled"): y is enumerated only where it is unknown, so a labelled row is
    counted once and not once per class.

    **Parts.** ``classifier(x)`` gives q(y | x)'s logits ``(..., K)``; ``encoder`` maps the
    concatenation of x and the one-hot y to q(z | x, y) (the package's encoder contract, with
    ``data_dim + K`` inputs); ``decoder`` maps the concatenation of z and the one-hot y to the
    likelihood's parameters. Defaults: MLPs of ``hidden_dims`` (the decoder's reversed) and a
    :class:`~pyro_vae.components.encoders.DiagonalNormalEncoder`; with ``image_shape``, a
    :class:`~pyro_vae.components.networks.ConvNet` classifier, a convolutional encoder that
    reads y as K extra image channels (constant planes, 1 for the class), and a
    :class:`~pyro_vae.components.networks.DeconvNet` decoder from (z, y). Likelihood default
    Bernoulli (``fit`` then binarizes grayscale data dynamically), prior default N(0, I).

    :param int data_dim: features per example.
    :param int num_labels: the number of classes K.
    :param int latent_dim: the size of z.
    :param int num_labelled: N_l, the labelled rows of the training data (the scale of the
        labelled sites; training refuses data with another count). :meth:`from_data` sets it.
    :param int labelled_per_batch: labelled rows in each batch; ``None``:
        :func:`~pyro_vae.models.labels.labelled_per_batch`'s rule.
    :param float alpha: the weight of log q(y | x) per labelled example;
        :func:`~pyro_vae.models.labels.default_alpha` gives N / N_l, which :meth:`from_data`
        uses by default (:func:`~pyro_vae.models.labels.paper_alpha` the paper's 0.1 · N / N_l).
    :param hidden_dims: widths of the default MLPs.
    :param image_shape: ``(height, width)`` or ``(channels, height, width)``: convolutional
        default networks.
    """

    pyro_kind = "m2"

    def __init__(
        self,
        data_dim: int,
        num_labels: int,
        latent_dim: int,
        *,
        alpha: float,
        num_labelled: int | None = None,
        labelled_per_batch: int | None = None,
        hidden_dims: Sequence[int] = (500,),
        image_shape: Sequence[int] | None = None,
        classifier: nn.Module | None = None,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        likelihood: nn.Module | None = None,
        prior: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.data_dim = check_positive_int("data_dim", data_dim)
        self.num_labels = check_positive_int("num_labels", num_labels)
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {num_labels}")
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.alpha = check_positive_float("alpha", alpha)
        self.num_labelled = (
            None if num_labelled is None else check_positive_int("num_labelled", num_labelled)
        )
        self.labelled_per_batch = (
            None
            if labelled_per_batch is None
            else check_positive_int("labelled_per_batch", labelled_per_batch)
        )
        hidden_dims = tuple(hidden_dims)
        for width in hidden_dims:
            check_positive_int("hidden_dims entries", width)
        k = num_labels
        # With images, y enters the encoder as K constant planes beside the image's channels,
        # so that the package's ConvNet reads (x, y) unchanged; an MLP reads them concatenated.
        self.label_planes = 1
        encoder_shape = None
        if image_shape is not None:
            shape = tuple(int(s) for s in image_shape)
            shape = (1, *shape) if len(shape) == 2 else shape
            if len(shape) != 3 or min(shape) <= 0 or math.prod(shape) != data_dim:
                raise ValueError(
                    f"image_shape {tuple(image_shape)} does not describe images of "
                    f"data_dim={data_dim} values"
                )
            self.label_planes = shape[1] * shape[2]
            encoder_shape = (shape[0] + k, shape[1], shape[2])
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.classifier = (
            feature_network(data_dim, k, hidden_dims, image_shape)
            if classifier is None
            else classifier
        )
        encoder_in = data_dim + k * self.label_planes
        self.encoder = (
            DiagonalNormalEncoder(encoder_in, latent_dim, hidden_dims, image_shape=encoder_shape)
            if encoder is None
            else encoder
        )
        if decoder is None:
            decoder = (
                MLP(latent_dim + k, tuple(reversed(hidden_dims)), data_dim)
                if image_shape is None
                else DeconvNet(latent_dim + k, image_shape)
            )
        self.decoder = decoder
        self.likelihood = BernoulliLikelihood() if likelihood is None else likelihood
        self.prior = StandardNormalPrior(latent_dim) if prior is None else prior
        self.data_support = self._check_parts()

    @classmethod
    def from_data(
        cls,
        x: Tensor,
        labels: Tensor,
        latent_dim: int,
        *,
        alpha: float | None = None,
        **kwargs: Any,
    ) -> M2:
        """An M2 sized from the training data: ``data_dim`` from ``x``, ``num_labels`` from
        the largest label, ``num_labelled`` from the labels, and ``alpha`` N / N_l
        (:func:`~pyro_vae.models.labels.default_alpha`) unless given.
        ``labels`` is the tensor M2 will train on, with :data:`UNLABELLED` rows; pass
        ``num_labels=`` when the labelled rows might miss the last class."""
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError("x must be a tensor (N, data_dim)")
        labels = check_label_tensor(labels, "labels")
        known = labels[labels != UNLABELLED]
        if len(known) == 0:
            raise ValueError("labels has no labelled row: M2 needs some labels")
        num_labels = kwargs.pop("num_labels", int(known.max()) + 1)
        if alpha is None:
            alpha = default_alpha(len(labels), len(known))
        return cls(
            x.shape[1], num_labels, latent_dim, alpha=alpha, num_labelled=len(known), **kwargs
        )

    @staticmethod
    def loss(**kwargs: Any) -> TraceEnum_ELBO:
        """The estimator M2 trains with: ``TraceEnum_ELBO`` with one plate level (the batch),
        which sums the enumerated y out. Keywords go to it (``num_particles``, say).

        Its warning for a trace with no enumerated site is off: a batch whose rows are all
        labelled has none, rightly."""
        kwargs.setdefault("strict_enumeration_warning", False)
        return TraceEnum_ELBO(max_plate_nesting=1, **kwargs)

    # ------------------------------------------------------------------ the Pyro program

    def _scales(self, labelled: Tensor, num_data: int | None) -> tuple[float, float]:
        """The subsample scales of the batch's labelled and unlabelled rows: each part's count
        in the data over its count in the batch, N_l / B_l and (N − N_l) / B_u (the class
        docstring says why); applied by hand, as the two plates have sizes of their own."""
        if num_data is None:
            return 1.0, 1.0
        check_num_data(len(labelled), num_data)
        if self.num_labelled is None:
            raise ValueError(
                "M2.num_labelled is not set: training on batches (num_data given) scales the "
                "labelled rows by N_l / B_l; build the M2 with M2.from_data or num_labelled="
            )
        batch_labelled = int(labelled.sum())
        batch_unlabelled = len(labelled) - batch_labelled
        num_unlabelled = num_data - self.num_labelled
        return (
            self.num_labelled / max(batch_labelled, 1),
            num_unlabelled / max(batch_unlabelled, 1),
        )

    @pyro_method
    def model(self, x: Tensor, y: Tensor, num_data: int | None = None) -> None:
        """p(y) p(z) p(x | y, z), and α · log q(y | x) for the labelled rows.

        :param x: a batch ``(B, data_dim)``.
        :param y: its labels ``(B,)``, :data:`UNLABELLED` where unknown.
        :param num_data: the dataset size N: the labelled rows' sites are scaled by
            N_l / B_l and the unlabelled rows' by (N − N_l) / B_u (the class docstring says
            why); ``None``: the batch is all the data.
        """
        prior, decoder, likelihood, classifier = (
            self.prior,
            self.decoder,
            self.likelihood,
            self.classifier,
        )
        if is_validation_enabled():
            self.check_labels(y, len(x))
        labelled = y != UNLABELLED
        scale_labelled, scale_unlabelled = self._scales(labelled, num_data)
        p_y = dist.Categorical(logits=x.new_zeros(self.num_labels))
        if not bool(labelled.all()):
            x_u = x[~labelled]
            with pyro.plate("unlabelled", len(x_u)), poutine.scale(scale=scale_unlabelled):
                z = pyro.sample("z_unlabelled", prior())
                # Its value is the guide's: each class in turn, summed over by
                # TraceEnum_ELBO with q(y | x)'s weights.
                y_u = pyro.sample("y_unlabelled", p_y)
                params = decoder(self._decoder_input(z, y_u))
                pyro.sample("x_unlabelled", likelihood(params), obs=x_u)
        if bool(labelled.any()):
            x_l, y_l = x[labelled], y[labelled]
            with pyro.plate("labelled", len(x_l)), poutine.scale(scale=scale_labelled):
                z = pyro.sample("z_labelled", prior())
                pyro.sample("y_labelled", p_y, obs=y_l)
                params = decoder(self._decoder_input(z, y_l))
                pyro.sample("x_labelled", likelihood(params), obs=x_l)
                # The classification term: log q(y | x) of the observed label, weighted α.
                with poutine.scale(scale=self.alpha):
                    pyro.sample("y_aux", dist.Categorical(logits=classifier(x_l)), obs=y_l)

    @pyro_method
    def guide(self, x: Tensor, y: Tensor, num_data: int | None = None) -> None:
        """q(y | x) q(z | x, y); y is enumerated where it is unknown. Arguments as
        :meth:`model`."""
        encoder, classifier = self.encoder, self.classifier
        labelled = y != UNLABELLED
        scale_labelled, scale_unlabelled = self._scales(labelled, num_data)
        if not bool(labelled.all()):
            x_u = x[~labelled]
            with pyro.plate("unlabelled", len(x_u)), poutine.scale(scale=scale_unlabelled):
                y_u = pyro.sample(
                    "y_unlabelled",
                    dist.Categorical(logits=classifier(x_u)),
                    infer={"enumerate": "parallel"},
                )
                pyro.sample("z_unlabelled", encoder(self._encoder_input(x_u, y_u)))
        if bool(labelled.any()):
            x_l, y_l = x[labelled], y[labelled]
            with pyro.plate("labelled", len(x_l)), poutine.scale(scale=scale_labelled):
                pyro.sample("z_labelled", encoder(self._encoder_input(x_l, y_l)))

    def epoch_order(self, x: Tensor, y: Tensor, *, batch_size: int) -> EpochOrder:
        """How ``fit`` orders each epoch: every batch holds labelled rows
        (:class:`~pyro_vae.infer.batches.FewInEveryBatch`, ``labelled_per_batch`` of them, the
        rule of :func:`~pyro_vae.models.labels.labelled_per_batch` unless set) and an epoch is
        one pass over the unlabelled rows. Data all labelled, or all unlabelled: a shuffle."""
        labelled = y != UNLABELLED
        few, other = labelled.nonzero().squeeze(1), (~labelled).nonzero().squeeze(1)
        if len(few) == 0 or len(other) == 0 or batch_size < 2:
            return Shuffled(len(y))
        per_batch = self.labelled_per_batch or labelled_per_batch(batch_size, len(few), len(other))
        return FewInEveryBatch(few, other, batch_size, min(per_batch, len(few), batch_size - 1))

    def _one_hot(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        return F.one_hot(y, self.num_labels).to(dtype)

    def _encoder_input(self, x: Tensor, y: Tensor) -> Tensor:
        """(x, one-hot y) as one tensor, broadcast over y's enumeration dimension."""
        one_hot = self._one_hot(y, x.dtype)
        if self.label_planes > 1:
            one_hot = one_hot.repeat_interleave(self.label_planes, dim=-1)
        return _concat(x, one_hot)

    def _decoder_input(self, z: Tensor, y: Tensor) -> Tensor:
        return _concat(z, self._one_hot(y, z.dtype))

    # ------------------------------------------------------------------ using a trained M2

    def label_posterior(self, x: Tensor) -> dist.Categorical:
        """q(y | x), the classifier."""
        return dist.Categorical(logits=self.classifier(self._check_batch(x)))

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """The most probable class under q(y | x), ``(B,)``."""
        return self.label_posterior(x).logits.argmax(-1)

    @torch.no_grad()
    def accuracy(self, x: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
        """The fraction of rows whose most probable class under q(y | x) is their label."""
        labels = self.check_labels(labels, len(x))
        if bool((labels == UNLABELLED).any()):
            raise ValueError("accuracy needs every label known")
        right = sum(
            int((self.classify(xs) == ys).sum())
            for xs, ys in zip(x.split(batch_size), labels.split(batch_size), strict=True)
        )
        return right / len(x)

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """μ and σ of q(z | x, y), ``(B, latent_dim)`` each (y a class per row)."""
        posterior = self.encoder(self._encoder_input(self._check_batch(x), y))
        return posterior.mean, posterior.stddev

    @torch.no_grad()
    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        """The likelihood's mean at (z, y): for figures of y fixed and z varied, or z fixed and
        y varied (style transfer)."""
        return self.likelihood(self.decoder(self._decoder_input(z, y))).mean

    # ------------------------------------------------------------------ checks

    def _check_parts(self) -> constraints.Constraint:
        b, k = contract.CHECK_BATCH, self.num_labels
        with torch.no_grad():
            x = torch.zeros(b, self.data_dim)
            y = torch.zeros(b, dtype=torch.long)
            logits = contract.call_part("classifier", self.classifier, x)
            if not isinstance(logits, Tensor) or tuple(logits.shape) != (b, k):
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(
                    f"classifier: must return logits ({b}, {k}) for x ({b}, {self.data_dim}), "
                    f"got {got}"
                )
            encoder_in = self._encoder_input(x, y)
            posterior = contract.call_part("encoder", self.encoder, encoder_in)
            contract.check_shapes(
                "encoder",
                posterior,
                batch_shape=(b,),
                event_shape=(self.latent_dim,),
                given=f"(x, y) of shape {tuple(encoder_in.shape)}",
            )
            if not posterior.has_rsample:
                raise ValueError("encoder: q(z | x, y) must be reparameterized (has_rsample)")
            prior = contract.call_part("prior", self.prior)
            contract.check_shapes(
                "prior", prior, batch_shape=(), event_shape=(self.latent_dim,), given="()"
            )
            decoder_in = self._decoder_input(posterior.rsample(), y)
            params = contract.call_part("decoder", self.decoder, decoder_in)
            observation = contract.call_part("likelihood", self.likelihood, params)
            contract.check_shapes(
                "likelihood",
                observation,
                batch_shape=(b,),
                event_shape=(self.data_dim,),
                given=f"decoder output for (z, y) of shape {tuple(decoder_in.shape)}",
            )
        return observation.support

    def check_labels(self, labels: object, num_rows: int) -> Tensor:
        """``labels`` must be an integer tensor ``(num_rows,)`` of classes 0..K-1 or
        :data:`UNLABELLED`; the error names the first offending row and its value."""
        labels = check_label_tensor(labels, "labels")
        if len(labels) != num_rows:
            raise ValueError(f"labels has {len(labels)} rows, the data {num_rows}")
        bad = (labels < UNLABELLED) | (labels >= self.num_labels)
        if bool(bad.any()):
            index = int(bad.nonzero()[0])
            raise ValueError(
                f"labels[{index}] = {int(labels[index])} is not a class of this M2 "
                f"(0..{self.num_labels - 1}) nor {UNLABELLED} (unlabelled)"
            )
        return labels

    def validate_inputs(self, x: Tensor, labels: Tensor, *rest: Tensor) -> None:
        """What ``fit`` calls with all its data before training: the labels must be known
        classes or :data:`UNLABELLED` (:meth:`check_labels`)."""
        if rest:
            raise ValueError(f"M2 trains on (x, labels), got {2 + len(rest)} tensors")
        self.check_labels(labels, len(x))
        known = int((labels != UNLABELLED).sum())
        if self.num_labelled is not None and known != self.num_labelled:
            raise ValueError(
                f"the labels have {known} labelled rows, but this M2 was built for "
                f"num_labelled={self.num_labelled} (the count its batches are scaled by)"
            )


class SupervisedClassifier(NamedPyroModule):
    """The supervised-only baseline of M2: y ~ Categorical(classifier(x)) observed, nothing
    latent, trained by ``fit`` on labelled rows alone (``Trace_ELBO``: the loss is then the
    cross-entropy). Give it the very network M2 starts with (``copy.deepcopy(m2.classifier)``)
    for a comparison of like with like."""

    pyro_kind = "classifier"

    def __init__(self, classifier: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_labels = check_positive_int("num_labels", num_labels)

    @pyro_method
    def model(self, x: Tensor, y: Tensor, num_data: int | None = None) -> None:
        classifier = self.classifier
        with data_plate(x, num_data):
            pyro.sample("y", dist.Categorical(logits=classifier(x)), obs=y)

    def guide(self, x: Tensor, y: Tensor, num_data: int | None = None) -> None:
        """Nothing is latent."""

    def validate_inputs(self, x: Tensor, labels: Tensor) -> None:
        labels = check_label_tensor(labels, "labels")
        bad = (labels < 0) | (labels >= self.num_labels)
        if bool(bad.any()):
            index = int(bad.nonzero()[0])
            raise ValueError(
                f"labels[{index}] = {int(labels[index])} is not a class (0..{self.num_labels - 1})"
            )

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        return self.classifier(x).argmax(-1)

    @torch.no_grad()
    def accuracy(self, x: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
        right = sum(
            int((self.classify(xs) == ys).sum())
            for xs, ys in zip(x.split(batch_size), labels.split(batch_size), strict=True)
        )
        return right / len(x)


def build_m2(
    data_dim: int,
    num_labels: int,
    latent_dim: int,
    *,
    alpha: float,
    num_labelled: int | None = None,
    hidden_dims: Sequence[int] = (500,),
    image_shape: Sequence[int] | None = None,
) -> M2:
    """An :class:`M2` with its default parts, from plain values only: what a checkpoint's
    config (``"model": "m2"``) holds and :func:`~pyro_vae.checkpoint.load_checkpoint`
    rebuilds (runs written before ``num_labelled`` was recorded load without it: the job sets
    it from their labelled rows). Arguments as :class:`M2`'s."""
    return M2(
        data_dim,
        num_labels,
        latent_dim,
        alpha=alpha,
        num_labelled=num_labelled,
        hidden_dims=hidden_dims,
        image_shape=image_shape,
    )


def _concat(a: Tensor, b: Tensor) -> Tensor:
    """``a`` and ``b`` side by side along the last dimension, their leading dimensions
    broadcast (an enumerated y has an extra one in front)."""
    leading = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*leading, a.shape[-1]), b.expand(*leading, b.shape[-1])], dim=-1)
