"""This project's M2 beside Pyro's own ``ss_vae_M2`` example, on the same data, the same
labelled subset and the same budget, with both accuracies printed per epoch (issue 22, item 4).

The "pyro" side is a re-typing of Pyro's example, ``examples/vae/ss_vae_M2.py`` with its
``utils/custom_mlp.py`` and ``utils/mnist_cached.py``, from pyro-ppl/pyro at commit
ff6ae1c9572591791aae8842bcd702fcf0b46fd6 (2024-10-24; the three files last changed in
64e71eee1c14dc926d5cbc5e762b6337bb4750a6, "Bump version to 1.9.1"):
https://github.com/pyro-ppl/pyro/blob/ff6ae1c9572591791aae8842bcd702fcf0b46fd6/examples/vae/ss_vae_M2.py

Kept as upstream has it:

- ``SSVAE``: encoder_y (x -> softmax over classes), encoder_z (x, one-hot y -> loc, exp(scale))
  and decoder ((z, y) -> sigmoid), MLPs of ``--hidden`` softplus units (default one layer of
  500) whose hidden layers start at N(0, 0.001); z of ``--latent-dim`` (50); p(y) uniform
  OneHotCategorical, p(x|y,z) Bernoulli with ``validate_args=False``;
- the losses: ``SVI(model, config_enumerate(guide, "parallel", expand=True),
  TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False))`` and
  ``SVI(model_classify, guide_classify, Trace_ELBO())``, the auxiliary loss scaled by
  ``--aux-loss-multiplier`` (46), both stepping one ``pyro.optim.Adam({"lr": 4.2e-4, "betas":
  (0.9, 0.999)})``; every loss steps on every batch, summed over the batch (no N/B scale);
- the epoch: ``run_inference_for_epoch``, one pass over shuffled labelled batches and shuffled
  unlabelled batches of ``--batch-size`` (200), a labelled one wherever
  ``i % periodic_interval_batches == 1`` (``periodic_interval_batches = int(N / N_labelled)``,
  N the labelled and unlabelled rows together) until the labelled batches are used up;
- the epoch reported: the first with the best validation accuracy; its test accuracy.

Changed, and why:

- the data are the project's, not ``MNISTCached``'s: the validation rows are the project's
  held-out rows (``validation_indices(N, val_size, seed)``, 10000 for MNIST and Fashion-MNIST
  as upstream's, but drawn at random rather than the last 10000), the labelled rows are
  ``labelled_subset(y_train, n, seed)`` (class-balanced, any n; upstream needs n a multiple of
  10 and draws with numpy's global state), and the unlabelled rows are the first
  ``--num-unlabelled`` of the others (upstream: all of them), exactly as pyro_vae/jobs/m2.py
  chooses them; both sides train on these very rows;
- the images are binarized as the project does (``--pyro-data binarized``, the default): a
  fresh Bernoulli draw per batch in training, one fixed draw of the validation and test sets
  (``pyro_vae.jobs.runs.evaluation_sets``), the same sets scored for both sides. Upstream feeds
  the grayscale pixels to its Bernoulli; ``--pyro-data grayscale`` does that (and scores the
  Pyro side on grayscale validation and test images);
- upstream's divisibility asserts (the batch size dividing the labelled, validation, training
  and test counts) are dropped: a last short batch is kept, as upstream's ``DataLoader``
  (``drop_last=False``) would; a labelled subset smaller than a batch is one batch. A schedule
  under which upstream's loop would run out of unlabelled batches (fewer unlabelled than
  labelled rows) is refused;
- accuracy is the fraction right over all rows (upstream divides by the number of batches
  times the batch size, which is the same when the batch size divides the set);
- no visdom, log file, CUDA flag or JIT; ``--device`` puts both sides on one device; the
  batches are cut from in-memory tensors, reshuffled each epoch with torch's global generator,
  rather than gathered row by row by a ``DataLoader`` (the same kind of batches, not the same
  draws).

The "pyro_vae" side is the project's M2 through the public API: ``M2.from_data(x, y,
latent_dim, hidden_dims=...)`` and ``pv.fit(m2, (x, y), loss=m2.loss(), ...)``, with a
callback that scores the validation and test sets after each epoch. With ``--ours-defaults``
(the default) it uses what ``scripts/train.py --model m2`` uses by default (latent size,
widths, batch size, learning rate, α, particles), read from that script's parser, so that it
follows the defaults as they change; with ``--no-ours-defaults`` it takes Pyro's side's
``--latent-dim``, ``--hidden``, ``--batch-size``, ``--lr`` and ``--beta1``. ``--alpha`` sets
its weight of log q(y|x) per labelled example either way (46 is Pyro's multiplier); unset, α
is the project's default. ``--epochs`` is both sides' budget.

Every seed of ``--seeds`` draws its own validation rows, labelled subset and initial weights,
as ``scripts/train.py --seed`` does. A Markdown table of the test accuracy at each side's best
validation epoch ends the output, with the mean ± SD over seeds and the paired difference ±
its SE; everything goes to a JSON file (``--out``).

    OMP_NUM_THREADS=1 python benchmarks/m2_vs_pyro.py --dataset digits --epochs 1 --seeds 0
    python benchmarks/m2_vs_pyro.py --dataset digits --num-labelled 100 --seeds 0 1 2
    python benchmarks/m2_vs_pyro.py --dataset mnist --data-dir ../shared/datasets/mnist \\
        --num-labelled 100 --num-unlabelled 10000 --epochs 10 --seeds 0 1 2 --no-ours-defaults
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from inspect import isclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import broadcast_shape
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam
from torch import Tensor, nn
from tqdm.auto import tqdm

import pyro_vae as pv
from pyro_vae.components.likelihoods import BernoulliLikelihood
from pyro_vae.data import validation_indices
from pyro_vae.jobs.runs import default_val_size, evaluation_sets
from pyro_vae.models.labels import hide_labels, labelled_subset

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_COMMIT = "ff6ae1c9572591791aae8842bcd702fcf0b46fd6"
UPSTREAM = f"https://github.com/pyro-ppl/pyro/blob/{UPSTREAM_COMMIT}/examples/vae/ss_vae_M2.py"
# Rows per chunk when scoring a validation or test set.
CHUNK = 1000


# ---------------------------------------------------------------- Pyro's example, re-typed
# utils/custom_mlp.py: the MLP and its helpers (without the unused post-layer hooks and
# use_cuda).


class Exp(nn.Module):
    """a custom module for exponentiation of tensors"""

    def forward(self, val: Tensor) -> Tensor:
        return torch.exp(val)


class ConcatModule(nn.Module):
    """a custom module for concatenation of tensors"""

    def __init__(self, allow_broadcast: bool = False) -> None:
        self.allow_broadcast = allow_broadcast
        super().__init__()

    def forward(self, *input_args: Any) -> Tensor:
        # we have a single object
        if len(input_args) == 1:
            input_args = input_args[0]
        # don't concat things that are just single objects
        if torch.is_tensor(input_args):
            return input_args
        if self.allow_broadcast:
            shape = (*broadcast_shape(*[s.shape[:-1] for s in input_args]), -1)
            input_args = [s.expand(shape) for s in input_args]
        return torch.cat(input_args, dim=-1)


class ListOutModule(nn.ModuleList):
    """a custom module for outputting a list of tensors from a list of nn modules"""

    def forward(self, *args: Any, **kwargs: Any) -> list[Tensor]:
        return [mm.forward(*args, **kwargs) for mm in self]


def call_nn_op(op: type[nn.Module]) -> nn.Module:
    """instantiate an nn op like Softmax with the parameters it needs"""
    if op in [nn.Softmax, nn.LogSoftmax]:
        return op(dim=1)
    return op()


class MLP(nn.Module):
    def __init__(
        self,
        mlp_sizes: list[Any],
        activation: type[nn.Module] = nn.ReLU,
        output_activation: Any = None,
        allow_broadcast: bool = False,
    ) -> None:
        super().__init__()
        assert len(mlp_sizes) >= 2, "Must have input and output layer sizes defined"
        input_size, hidden_sizes, output_size = mlp_sizes[0], mlp_sizes[1:-1], mlp_sizes[-1]
        last_layer_size = input_size if isinstance(input_size, int) else sum(input_size)
        # everything sent in will be concatted together by default
        all_modules: list[nn.Module] = [ConcatModule(allow_broadcast)]
        for layer_size in hidden_sizes:
            assert isinstance(layer_size, int), "Hidden layer sizes must be ints"
            cur_linear_layer = nn.Linear(last_layer_size, layer_size)
            # for numerical stability -- initialize the layer properly
            cur_linear_layer.weight.data.normal_(0, 0.001)
            cur_linear_layer.bias.data.normal_(0, 0.001)
            all_modules.append(cur_linear_layer)
            all_modules.append(activation())
            last_layer_size = layer_size
        if isinstance(output_size, int):
            all_modules.append(nn.Linear(last_layer_size, output_size))
            if output_activation is not None:
                all_modules.append(
                    call_nn_op(output_activation)
                    if isclass(output_activation)
                    else output_activation
                )
        else:
            # a tuple of outputs, each a linear layer and its own activation
            out_layers = []
            for out_ix, out_size in enumerate(output_size):
                split_layer: list[nn.Module] = [nn.Linear(last_layer_size, out_size)]
                act_out_fct = (
                    output_activation
                    if not isinstance(output_activation, (list, tuple))
                    else output_activation[out_ix]
                )
                if act_out_fct:
                    split_layer.append(
                        call_nn_op(act_out_fct) if isclass(act_out_fct) else act_out_fct
                    )
                out_layers.append(nn.Sequential(*split_layer))
            all_modules.append(ListOutModule(out_layers))
        self.sequential_mlp = nn.Sequential(*all_modules)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.sequential_mlp.forward(*args, **kwargs)


class SSVAE(nn.Module):
    """ss_vae_M2.py's SSVAE: the model, guide and auxiliary classification loss of M2."""

    def __init__(
        self,
        output_size: int = 10,
        input_size: int = 784,
        z_dim: int = 50,
        hidden_layers: tuple[int, ...] | list[int] = (500,),
        config_enum: str | None = None,
        aux_loss_multiplier: float | None = None,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.input_size = input_size
        self.z_dim = z_dim
        self.hidden_layers = hidden_layers
        self.allow_broadcast = config_enum == "parallel"
        self.aux_loss_multiplier = aux_loss_multiplier
        self.setup_networks()

    def setup_networks(self) -> None:
        z_dim = self.z_dim
        hidden_sizes = list(self.hidden_layers)
        self.encoder_y = MLP(
            [self.input_size, *hidden_sizes, self.output_size],
            activation=nn.Softplus,
            output_activation=nn.Softmax,
            allow_broadcast=self.allow_broadcast,
        )
        self.encoder_z = MLP(
            [self.input_size + self.output_size, *hidden_sizes, [z_dim, z_dim]],
            activation=nn.Softplus,
            output_activation=[None, Exp],
            allow_broadcast=self.allow_broadcast,
        )
        self.decoder = MLP(
            [z_dim + self.output_size, *hidden_sizes, self.input_size],
            activation=nn.Softplus,
            output_activation=nn.Sigmoid,
            allow_broadcast=self.allow_broadcast,
        )

    def model(self, xs: Tensor, ys: Tensor | None = None) -> Tensor:
        """p(z) = normal(0, I), p(y) = categorical(I / 10),
        p(x | y, z) = bernoulli(decoder(y, z))"""
        pyro.module("ss_vae", self)
        batch_size = xs.size(0)
        options = dict(dtype=xs.dtype, device=xs.device)
        with pyro.plate("data"):
            prior_loc = torch.zeros(batch_size, self.z_dim, **options)
            prior_scale = torch.ones(batch_size, self.z_dim, **options)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            alpha_prior = torch.ones(batch_size, self.output_size, **options) / (
                1.0 * self.output_size
            )
            ys = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=ys)
            loc = self.decoder([zs, ys])
            pyro.sample("x", dist.Bernoulli(loc, validate_args=False).to_event(1), obs=xs)
            return loc

    def guide(self, xs: Tensor, ys: Tensor | None = None) -> None:
        """q(y | x) = categorical(encoder_y(x)), q(z | x, y) = normal(encoder_z(x, y))"""
        with pyro.plate("data"):
            if ys is None:
                alpha = self.encoder_y(xs)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            loc, scale = self.encoder_z([xs, ys])
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def classifier(self, xs: Tensor) -> Tensor:
        """the most probable class under q(y | x), as one-hots"""
        alpha = self.encoder_y(xs)
        _res, ind = torch.topk(alpha, 1)
        return torch.zeros_like(alpha).scatter_(1, ind, 1.0)

    def model_classify(self, xs: Tensor, ys: Tensor | None = None) -> None:
        """the auxiliary (supervised) loss of Kingma et al."""
        pyro.module("ss_vae", self)
        with pyro.plate("data"):
            if ys is not None:
                alpha = self.encoder_y(xs)
                with pyro.poutine.scale(scale=self.aux_loss_multiplier):
                    pyro.sample("y_aux", dist.OneHotCategorical(alpha), obs=ys)

    def guide_classify(self, xs: Tensor, ys: Tensor | None = None) -> None:
        """dummy guide function to accompany model_classify in inference"""


class ShuffledBatches:
    """What mnist_cached.setup_data_loaders gives: ``DataLoader(rows, batch_size,
    shuffle=True)``, here over tensors in memory, the images binarized afresh per batch when
    ``binarize``. ``ys`` is ``None`` for the unlabelled rows (upstream: NaN, never read)."""

    def __init__(self, xs: Tensor, ys: Tensor | None, batch_size: int, binarize: bool) -> None:
        self.xs, self.ys, self.batch_size, self.binarize = xs, ys, batch_size, binarize

    def __len__(self) -> int:
        return math.ceil(len(self.xs) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        order = torch.randperm(len(self.xs), device=self.xs.device)
        for rows in order.split(self.batch_size):
            xs = self.xs[rows]
            yield (
                torch.bernoulli(xs) if self.binarize else xs,
                None if self.ys is None else self.ys[rows],
            )


def run_inference_for_epoch(
    data_loaders: dict[str, ShuffledBatches],
    losses: list[SVI],
    periodic_interval_batches: int,
    progress: bool,
) -> tuple[list[float], list[float]]:
    """ss_vae_M2.py's epoch: every loss steps on each batch; a labelled batch wherever
    ``i % periodic_interval_batches == 1`` until they are used up."""
    num_losses = len(losses)
    sup_batches = len(data_loaders["sup"])
    unsup_batches = len(data_loaders["unsup"])
    batches_per_epoch = sup_batches + unsup_batches
    epoch_losses_sup = [0.0] * num_losses
    epoch_losses_unsup = [0.0] * num_losses
    sup_iter = iter(data_loaders["sup"])
    unsup_iter = iter(data_loaders["unsup"])
    ctr_sup = 0
    for i in tqdm(range(batches_per_epoch), disable=None if progress else True, leave=False):
        is_supervised = (i % periodic_interval_batches == 1) and ctr_sup < sup_batches
        if is_supervised:
            (xs, ys) = next(sup_iter)
            ctr_sup += 1
        else:
            (xs, ys) = next(unsup_iter)
        for loss_id in range(num_losses):
            if is_supervised:
                epoch_losses_sup[loss_id] += losses[loss_id].step(xs, ys)
            else:
                epoch_losses_unsup[loss_id] += losses[loss_id].step(xs)
    return epoch_losses_sup, epoch_losses_unsup


def pyro_schedule(num_rows: int, num_labelled: int, batch_size: int) -> int:
    """Upstream's ``periodic_interval_batches``: with 3000 labels among 50000 rows every 16th
    batch is labelled, until they run out. Sizes under which upstream's loop would ask for more
    unlabelled batches than there are (its asserts rule them out) are refused."""
    periodic_interval_batches = int(num_rows / (1.0 * num_labelled))
    sup_batches = math.ceil(num_labelled / batch_size)
    total = sup_batches + math.ceil((num_rows - num_labelled) / batch_size)
    placed = sum(1 for i in range(total) if i % periodic_interval_batches == 1)
    if placed < sup_batches:
        raise ValueError(
            f"Pyro's schedule places a labelled batch every {periodic_interval_batches} batches "
            f"(int(N / N_labelled)); {sup_batches} labelled batches do not fit among "
            f"{total}: give more unlabelled rows than labelled ones"
        )
    return periodic_interval_batches


# ---------------------------------------------------------------- the two sides


@dataclass
class Split:
    """One seed's rows: the training rows both sides fit, and the validation and test sets as
    scored."""

    x: Tensor
    """The training images, grayscale, ``(N, D)``: the labelled rows and the unlabelled."""
    y: Tensor
    """Their labels, ``UNLABELLED`` where hidden (what M2 fits)."""
    labelled: Tensor
    """Which rows of ``x`` are labelled (a boolean mask)."""
    y_true: Tensor
    """Their true labels (only the labelled rows' are read: Pyro's side's one-hots)."""
    scored: dict[str, tuple[Tensor, Tensor]]
    """``"val"``, ``"test"``: binarized images and labels; ``"val_grayscale"``,
    ``"test_grayscale"``: the same rows in grayscale."""


@dataclass
class SideResult:
    val: list[float]
    test: list[float]
    seconds: list[float]
    loss: list[Any]
    settings: dict[str, Any]

    @property
    def best_epoch(self) -> int:
        """1-based; the first of the best by validation accuracy."""
        return self.val.index(max(self.val)) + 1

    def as_dict(self) -> dict[str, Any]:
        best = self.best_epoch
        return {
            "settings": self.settings,
            "val_accuracy": self.val,
            "test_accuracy": self.test,
            "loss": self.loss,
            "epoch_seconds": self.seconds,
            "best_epoch": best,
            "best_val_accuracy": self.val[best - 1],
            "test_accuracy_at_best": self.test[best - 1],
            "last_test_accuracy": self.test[-1],
        }


def choose_rows(
    y_train: Tensor, num_labelled: int, num_unlabelled: int | None, seed: int
) -> tuple[Tensor, Tensor]:
    """As pyro_vae/jobs/m2.py: the labelled rows (``labelled_subset``) and all the rows fitted
    (labelled and the first ``num_unlabelled`` others), sorted."""
    labelled = labelled_subset(y_train, num_labelled, seed)
    others = torch.ones(len(y_train), dtype=torch.bool)
    others[labelled] = False
    unlabelled = others.nonzero().squeeze(1)
    if num_unlabelled is not None:
        if num_unlabelled > len(unlabelled):
            raise ValueError(
                f"--num-unlabelled {num_unlabelled} exceeds the {len(unlabelled)} training rows "
                f"left after {num_labelled} labelled ones"
            )
        unlabelled = unlabelled[:num_unlabelled]
    return labelled, torch.cat([labelled, unlabelled]).sort().values


def make_split(data: pv.DataSplits, args: argparse.Namespace, seed: int) -> Split:
    """The seed's validation rows held out, its labelled subset, and the evaluation sets
    binarized once as a run of scripts/train.py binarizes them."""
    val_size = args.val_size
    if val_size is None:
        val_size = default_val_size(args.dataset, len(data.x_train))
    held = data.hold_out(validation_indices(len(data.x_train), val_size, seed))
    if args.num_labelled < len(data.class_names):
        raise ValueError(
            f"--num-labelled {args.num_labelled} is fewer than the {len(data.class_names)} "
            "classes: a class-balanced subset needs one of each"
        )
    labelled, rows = choose_rows(held.y_train, args.num_labelled, args.num_unlabelled, seed)
    y = hide_labels(held.y_train, labelled)[rows]
    # Only the likelihood is read of the model here: M2's, Bernoulli, which wants binary data.
    bernoulli_model = nn.Module()
    bernoulli_model.likelihood = BernoulliLikelihood()
    x_test, _, x_val = evaluation_sets(bernoulli_model, held, seed)
    assert x_val is not None and held.x_val is not None and held.y_val is not None
    device = args.device
    scored = {
        "val": (x_val, held.y_val),
        "test": (x_test, held.y_test),
        "val_grayscale": (held.x_val, held.y_val),
        "test_grayscale": (held.x_test, held.y_test),
    }
    return Split(
        x=held.x_train[rows].to(device),
        y=y.to(device),
        labelled=(y != -1).to(device),
        y_true=held.y_train[rows].to(device),
        scored={k: (x.to(device), labels.to(device)) for k, (x, labels) in scored.items()},
    )


@torch.no_grad()
def accuracy(classify: Callable[[Tensor], Tensor], x: Tensor, labels: Tensor) -> float:
    right = sum(
        int((classify(xs) == ys).sum())
        for xs, ys in zip(x.split(CHUNK), labels.split(CHUNK), strict=True)
    )
    return right / len(x)


def run_pyro(split: Split, args: argparse.Namespace, seed: int, num_labels: int) -> SideResult:
    """Pyro's ss_vae_M2 main(), on the split's rows."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    binarize = args.pyro_data == "binarized"
    ss_vae = SSVAE(
        output_size=num_labels,
        input_size=split.x.shape[1],
        z_dim=args.latent_dim,
        hidden_layers=args.hidden,
        config_enum="parallel",
        aux_loss_multiplier=args.aux_loss_multiplier,
    ).to(args.device)
    optimizer = Adam({"lr": args.lr, "betas": (args.beta1, 0.999)})
    guide = config_enumerate(ss_vae.guide, "parallel", expand=True)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    loss_basic = SVI(ss_vae.model, guide, optimizer, loss=elbo)
    loss_aux = SVI(ss_vae.model_classify, ss_vae.guide_classify, optimizer, loss=Trace_ELBO())
    losses = [loss_basic, loss_aux]

    one_hot = nn.functional.one_hot(split.y_true, num_labels).to(split.x.dtype)
    sup_num = int(split.labelled.sum())
    unsup_num = len(split.x) - sup_num
    data_loaders = {
        "sup": ShuffledBatches(
            split.x[split.labelled], one_hot[split.labelled], args.batch_size, binarize
        ),
        "unsup": ShuffledBatches(split.x[~split.labelled], None, args.batch_size, binarize),
    }
    periodic_interval_batches = pyro_schedule(len(split.x), sup_num, args.batch_size)
    suffix = "" if binarize else "_grayscale"
    x_val, y_val = split.scored["val" + suffix]
    x_test, y_test = split.scored["test" + suffix]

    def classify(xs: Tensor) -> Tensor:
        return ss_vae.classifier(xs).argmax(-1)

    result = SideResult([], [], [], [], settings=pyro_settings(args))
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        epoch_losses_sup, epoch_losses_unsup = run_inference_for_epoch(
            data_loaders, losses, periodic_interval_batches, args.progress
        )
        seconds = time.perf_counter() - started
        avg_sup = [v / sup_num for v in epoch_losses_sup]
        avg_unsup = [v / unsup_num for v in epoch_losses_unsup]
        result.val.append(accuracy(classify, x_val, y_val))
        # The test accuracy is for reporting only; nothing is chosen on it.
        result.test.append(accuracy(classify, x_test, y_test))
        result.seconds.append(seconds)
        result.loss.append({"sup": avg_sup, "unsup": avg_unsup})
        print(
            f"seed {seed} pyro     epoch {epoch:3d}: avg losses sup "
            f"{' '.join(f'{v:.2f}' for v in avg_sup)} unsup "
            f"{' '.join(f'{v:.2f}' for v in avg_unsup)}  val accuracy {result.val[-1]:.4f}  "
            f"test accuracy {result.test[-1]:.4f}  ({seconds:.1f} s)",
            flush=True,
        )
    return result


def pyro_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "upstream": UPSTREAM,
        "latent_dim": args.latent_dim,
        "hidden_dims": list(args.hidden),
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "beta1": args.beta1,
        "aux_loss_multiplier": args.aux_loss_multiplier,
        "data": args.pyro_data,
        "enumeration": "parallel",
    }


@functools.cache
def project_m2_defaults(dataset: str) -> dict[str, Any]:
    """What ``scripts/train.py --model m2`` trains with when no flag is given, read from its
    parser (so that this benchmark follows the defaults when they change)."""
    path = ROOT / "scripts" / "train.py"
    spec = importlib.util.spec_from_file_location("pyro_vae_train_script", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot read {path}; run with --no-ours-defaults")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        defaults = script.parse_args(["--model", "m2", "--dataset", dataset, "--device", "cpu"])
        return {
            "latent_dim": defaults.latent_dim,
            "hidden_dims": list(defaults.hidden_dims),
            "batch_size": defaults.batch_size,
            "learning_rate": defaults.learning_rate,
            "alpha": defaults.alpha,
            "num_particles": defaults.num_particles,
        }
    except (AttributeError, SystemExit) as error:
        raise SystemExit(
            f"{path}: could not read M2's defaults from its parser ({error!r}); "
            "run with --no-ours-defaults"
        ) from error


def ours_settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.ours_defaults:
        settings = dict(project_m2_defaults(args.dataset))
        settings["source"] = "scripts/train.py --model m2 defaults"
        settings["beta1"] = 0.9  # fit's default Adam
    else:
        settings = {
            "latent_dim": args.latent_dim,
            "hidden_dims": list(args.hidden),
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "alpha": None,
            "num_particles": 1,
            "beta1": args.beta1,
            "source": "Pyro's side's flags",
        }
    if args.alpha is not None:
        settings["alpha"] = args.alpha
    return settings


def run_ours(split: Split, args: argparse.Namespace, seed: int, num_labels: int) -> SideResult:
    """The project's M2 through its public API: ``M2.from_data`` and ``pv.fit``."""
    from pyro_vae.models.m2 import M2

    settings = ours_settings(args)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    alpha = {} if settings["alpha"] is None else {"alpha": settings["alpha"]}
    m2 = M2.from_data(
        split.x,
        split.y,
        settings["latent_dim"],
        hidden_dims=settings["hidden_dims"],
        num_labels=num_labels,
        **alpha,
    ).to(args.device)
    settings["alpha"] = float(m2.alpha)  # the value used, the default's included
    x_val, y_val = split.scored["val"]
    x_test, y_test = split.scored["test"]
    result = SideResult([], [], [], [], settings=settings)

    def record(epoch: int, history: pv.History) -> None:
        result.val.append(m2.accuracy(x_val, y_val, batch_size=CHUNK))
        # The test accuracy is for reporting only; nothing is chosen on it.
        result.test.append(m2.accuracy(x_test, y_test, batch_size=CHUNK))
        result.seconds.append(history.epoch_seconds[-1])
        result.loss.append(history.loss[-1])
        print(
            f"seed {seed} pyro_vae epoch {epoch:3d}: loss {history.loss[-1]:.2f}  "
            f"val accuracy {result.val[-1]:.4f}  test accuracy {result.test[-1]:.4f}  "
            f"({history.epoch_seconds[-1]:.1f} s)",
            flush=True,
        )

    optimizer = None
    if settings["beta1"] != 0.9:
        lr, betas = settings["learning_rate"], (settings["beta1"], 0.999)

        def optimizer(params: Any) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=lr, betas=betas)

    pv.fit(
        m2,
        (split.x, split.y),
        loss=m2.loss(num_particles=settings["num_particles"]),
        num_epochs=args.epochs,
        batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        optimizer=optimizer,
        callback=record,
        generator=torch.Generator(args.device).manual_seed(seed),
        progress=None if args.progress else False,
    )
    return result


# ---------------------------------------------------------------- the report


def mean_sd(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    pyro_best = [r["pyro"]["test_accuracy_at_best"] for r in runs]
    ours_best = [r["pyro_vae"]["test_accuracy_at_best"] for r in runs]
    pyro_last = [r["pyro"]["last_test_accuracy"] for r in runs]
    ours_last = [r["pyro_vae"]["last_test_accuracy"] for r in runs]
    diff = [o - p for o, p in zip(ours_best, pyro_best, strict=True)]
    n = len(diff)
    sd = statistics.stdev(diff) if n > 1 else float("nan")
    return {
        "num_seeds": n,
        "pyro_test_at_best": {"mean": statistics.fmean(pyro_best), "values": pyro_best},
        "pyro_vae_test_at_best": {"mean": statistics.fmean(ours_best), "values": ours_best},
        "pyro_last_test": {"mean": statistics.fmean(pyro_last), "values": pyro_last},
        "pyro_vae_last_test": {"mean": statistics.fmean(ours_last), "values": ours_last},
        "difference_at_best": {
            "mean": statistics.fmean(diff),
            "se": sd / math.sqrt(n) if n > 1 else None,
            "values": diff,
        },
    }


def markdown_table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        "| seed | Pyro ss_vae_M2: best-val epoch | test | last | "
        "pyro_vae M2: best-val epoch | test | last | pyro_vae − Pyro (test at best) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        p, o = r["pyro"], r["pyro_vae"]
        lines.append(
            f"| {r['seed']} | {p['best_epoch']} | {p['test_accuracy_at_best']:.4f} | "
            f"{p['last_test_accuracy']:.4f} | {o['best_epoch']} | "
            f"{o['test_accuracy_at_best']:.4f} | {o['last_test_accuracy']:.4f} | "
            f"{o['test_accuracy_at_best'] - p['test_accuracy_at_best']:+.4f} |"
        )
    diff = summary["difference_at_best"]
    se = "" if diff["se"] is None else f" ± {diff['se']:.4f} (SE)"
    lines.append(
        f"| mean{' ± SD' if len(runs) > 1 else ''} | | "
        f"{mean_sd(summary['pyro_test_at_best']['values'])} | "
        f"{mean_sd(summary['pyro_last_test']['values'])} | | "
        f"{mean_sd(summary['pyro_vae_test_at_best']['values'])} | "
        f"{mean_sd(summary['pyro_vae_last_test']['values'])} | {diff['mean']:+.4f}{se} |"
    )
    return "\n".join(lines)


def epoch_table(seed: int, pyro_side: SideResult, ours: SideResult) -> str:
    lines = [
        f"seed {seed}, per epoch:",
        "| epoch | Pyro val | Pyro test | pyro_vae val | pyro_vae test |",
        "|---|---|---|---|---|",
    ]
    for e in range(len(pyro_side.val)):
        mark_p = "*" if e + 1 == pyro_side.best_epoch else " "
        mark_o = "*" if e + 1 == ours.best_epoch else " "
        lines.append(
            f"| {e + 1} | {pyro_side.val[e]:.4f}{mark_p} | {pyro_side.test[e]:.4f} | "
            f"{ours.val[e]:.4f}{mark_o} | {ours.test[e]:.4f} |"
        )
    lines.append("(* the epoch kept: the first best by validation accuracy)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="This project's M2 beside a re-typed copy of Pyro's ss_vae_M2 example, on "
        "the same rows and budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--dataset", choices=pv.DATASET_NAMES, default="digits")
    add("--data-dir", help="where the IDX files are (mnist: ../shared/datasets/mnist)")
    add("--num-labelled", type=int, default=100, help="labelled rows, class-balanced")
    add("--num-unlabelled", type=int, help="unlabelled rows (default: all the others)")
    add(
        "--val-size",
        type=int,
        help="training rows held out for validation (default: the project's, 10000 for mnist "
        "and fashion-mnist, a tenth otherwise)",
    )
    add("--seeds", type=int, nargs="+", default=[0], help="one run of each side per seed")
    add("--epochs", type=int, default=50, help="both sides' budget (Pyro's -n)")
    pyro_group = parser.add_argument_group(
        "Pyro's side (and the project's with --no-ours-defaults)"
    )
    pyro_group.add_argument("--hidden", type=int, nargs="+", default=[500], help="-hl")
    pyro_group.add_argument("--latent-dim", type=int, default=50, help="-zd")
    pyro_group.add_argument("--batch-size", type=int, default=200, help="-bs")
    pyro_group.add_argument("--lr", type=float, default=4.2e-4, help="-lr")
    pyro_group.add_argument("--beta1", type=float, default=0.9, help="-b1")
    pyro_group.add_argument(
        "--aux-loss-multiplier", type=float, default=46.0, help="-alm (Pyro's side only)"
    )
    pyro_group.add_argument(
        "--pyro-data",
        choices=("binarized", "grayscale"),
        default="binarized",
        help="binarized: as the project (a fresh draw per batch, fixed draws scored); "
        "grayscale: upstream's pixels in [0, 1], scored on grayscale images",
    )
    ours_group = parser.add_argument_group("the project's side")
    ours_group.add_argument(
        "--ours-defaults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="M2 at scripts/train.py --model m2's defaults; --no-ours-defaults: Pyro's "
        "side's --latent-dim, --hidden, --batch-size, --lr, --beta1",
    )
    ours_group.add_argument(
        "--alpha",
        type=float,
        help="M2's weight of log q(y|x) per labelled example (default: the project's; 46 is "
        "Pyro's multiplier)",
    )
    add("--device", default="cpu")
    add("--threads", type=int, default=1, help="torch.set_num_threads")
    add("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    add("--out", type=Path, help="the JSON (default: benchmarks/results/m2-vs-pyro-....json)")
    args = parser.parse_args(argv)
    if args.out is None:
        unlabelled = "" if args.num_unlabelled is None else f"-u{args.num_unlabelled}"
        name = f"m2-vs-pyro-{args.dataset}-l{args.num_labelled}{unlabelled}.json"
        args.out = Path(__file__).resolve().parent / "results" / name
    if args.val_size is not None and args.val_size <= 0:
        parser.error("--val-size must be positive: the epoch is chosen on validation")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = pv.load_dataset(args.dataset, args.data_dir)
    num_labels = len(data.class_names)
    print(
        f"{args.dataset}: {args.num_labelled} labelled, "
        f"{'all other' if args.num_unlabelled is None else args.num_unlabelled} unlabelled "
        f"rows, {args.epochs} epochs, seeds {args.seeds}, {args.threads} thread(s) on "
        f"{args.device}\n  pyro:     {json.dumps(pyro_settings(args))}\n  pyro_vae: "
        f"{json.dumps(ours_settings(args))} (alpha null: the project's default)",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in args.seeds:
        try:
            split = make_split(data, args, seed)
            pyro_schedule(len(split.x), int(split.labelled.sum()), args.batch_size)
        except ValueError as error:
            print(f"m2_vs_pyro.py: error: {error}", file=sys.stderr)
            return 2
        print(
            f"seed {seed}: {int(split.labelled.sum())} labelled + "
            f"{int((~split.labelled).sum())} unlabelled training rows, "
            f"{len(split.scored['val'][0])} validation, {len(split.scored['test'][0])} test",
            flush=True,
        )
        ours = run_ours(split, args, seed, num_labels)
        pyro_side = run_pyro(split, args, seed, num_labels)
        print(epoch_table(seed, pyro_side, ours), flush=True)
        runs.append({"seed": seed, "pyro": pyro_side.as_dict(), "pyro_vae": ours.as_dict()})
    total = time.perf_counter() - started

    summary = summarize(runs)
    table = markdown_table(runs, summary)
    print(f"\n{table}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "script": "benchmarks/m2_vs_pyro.py",
        "command": " ".join(sys.argv),
        "upstream": UPSTREAM,
        "settings": settings,
        "runs": runs,
        "summary": summary,
        "table": table,
        "total_seconds": total,
        "environment": {"torch": torch.__version__, "pyro": pyro.__version__},
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\ntotal {total:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
