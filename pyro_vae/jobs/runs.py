"""A run as the jobs read it back: :class:`Run` (one type for every model kind) and what
builds one, new or from its directory with one read of ``checkpoint.pt``.

:func:`pyro_vae.jobs.load_run` gives back the model with the very test set the run scored: the
dynamic binarization of a Bernoulli run is drawn on the CPU from the run's seed, whatever the
device, and its digest is stored in the checkpoint, so that a rebuilt test set that differs
(other data files, other code) is refused instead of scored.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor, nn

from pyro_vae._checkpoint_files import read_regular_file
from pyro_vae.array_dataset import ArrayDataset
from pyro_vae.checkpoint import built_on_meta, checkpoint_from_bytes
from pyro_vae.data import DataSplits, binarize, load_dataset, validation_indices
from pyro_vae.explain import explain
from pyro_vae.jobs.run_directory import BEST, checkpoint_path
from pyro_vae.jobs.run_schema import check_companion_payload, check_run_payload
from pyro_vae.models.build import least_weights

# Train-set metrics each epoch use a fixed subset, so that evaluation stays cheap on big data.
MAX_TRAIN_EVAL = 10000
# What a resumed run may change: nothing that alters the model or the maths. The device
# changes the arithmetic's rounding and the random streams (a run goes on from a GPU on a
# laptop): a resume on another kind of device says that it cannot be bit-identical.
RESUME_OVERRIDES = (
    "--num-epochs",
    "--no-progress",
    "--checkpoint-every",
    "--num-threads",
    "--device",
    "--tensorboard",  # also --no-tensorboard: the logs change nothing of the training
    # The loader's workers fetch the very rows fit's shuffle asks for, in its order, and draw
    # nothing from the run's random streams: the numbers are the same for any count.
    "--num-workers",
)
# Flags that came after runs were first written, with the value an older run trained with:
# runs saved before --compile trained eager, before --val-size held out no validation set,
# before --test-dataset and --image-size trained on named datasets only, before --num-workers
# read every batch in the training process.
FLAGS_ADDED_SINCE: dict[str, Any] = {
    "compile": False,
    "val_size": 0,
    "patience": None,
    "test_dataset": None,
    "image_size": None,
    "num_workers": 0,
}
# Validation rows when --val-size is not given: Pyro's ss_vae_M2 example holds out 10,000 of
# MNIST's training images; a smaller dataset gives a tenth of its training rows.
VAL_SIZES = {"mnist": 10000, "fashion-mnist": 10000}
VAL_FRACTION = 0.1
# The evaluation sets a run scores, as its messages name them.
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}

# The objectives by name, given the number of particles.
ELBOS = {
    "trace": lambda k: Trace_ELBO(num_particles=k),
    "meanfield": lambda k: TraceMeanField_ELBO(num_particles=k),
    "iwae": lambda k: RenyiELBO(alpha=0, num_particles=k),
}


def default_num_particles(name: str) -> int:
    """Draws of z per example and step when ``--num-particles`` is not given: 5 for the
    importance-weighted bound (one draw would make it the plain ELBO), else 1."""
    return 5 if name == "iwae" else 1


def make_loss(name: str, num_particles: int) -> ELBO:
    """Pyro's estimator called ``name`` (trace, meanfield or iwae) with ``num_particles``."""
    if name not in ELBOS:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(ELBOS)}")
    return ELBOS[name](num_particles)


def check_model_size(config: dict[str, Any]) -> None:
    """Refuse, before building it, a model whose weights would not fit in this machine's
    memory with their gradients and Adam's two moments (four float32 copies). The count is
    the checkpoint loader's: a lower bound for a VAE, and for the other models the count of
    the config's model built on the meta device (which allocates nothing)."""
    if config.get("model", "vae") == "vae":
        weights = least_weights(config)
    else:
        try:
            weights = sum(t.numel() for t in built_on_meta(config).state_dict().values())
        except RuntimeError as error:
            if "overflow" not in str(error):
                raise
            raise ValueError(
                "the model would hold more weights than torch can address (a tensor over 2**63 "
                "bytes): more than this machine's memory"
            ) from None
    need = 16 * weights
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise ValueError(
            f"the model would hold {weights:,} weights or more, about {need / 2**30:,.1f} GiB "
            f"with their gradients and Adam's state: more than this machine's "
            f"{memory / 2**30:.1f} GiB of memory"
        )


def default_val_size(dataset: str, num_train: int) -> int:
    """The validation rows held out of ``num_train`` training rows when ``--val-size`` is not
    given (:data:`VAL_SIZES`, else :data:`VAL_FRACTION` of them)."""
    return VAL_SIZES.get(dataset, round(VAL_FRACTION * num_train))


def evaluation_sets(
    model: nn.Module, data: DataSplits, seed: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The test set, a training subset (the first :data:`MAX_TRAIN_EVAL` examples) and the
    validation set (``None`` without one) as a run scores them, on the CPU in the data's
    dtype. Of streamed training rows only the subset is held (the binary check scans the
    rest a chunk at a time).

    A likelihood that declares ``binary_data`` (Bernoulli) needs binary data: training
    binarizes afresh every step, and evaluation uses one fixed binarization. It is drawn on
    the CPU from a stream of its own, derived from ``seed``: CPU and CUDA generators give
    different numbers for one seed, so a binarization drawn on the run's device could not be
    rebuilt on another one, and a stream of its own keeps it apart from the training noise
    drawn from ``seed``.
    """
    x_test, x_train = data.x_test.cpu(), data.train_head(MAX_TRAIN_EVAL).cpu()
    x_val = None if data.x_val is None else data.x_val.cpu()
    binary_data = getattr(getattr(model, "likelihood", None), "binary_data", False)
    if not binary_data or data.train_rows_binary():
        return x_test, x_train, x_val
    (state,) = np.random.SeedSequence(seed, spawn_key=(1,)).generate_state(1, np.uint64)
    generator = torch.Generator().manual_seed(int(state))
    # In this order: the test set's draw does not depend on the other two.
    x_test, x_train = binarize(x_test, generator), binarize(x_train, generator)
    return x_test, x_train, None if x_val is None else binarize(x_val, generator)


def read_whole(data: DataSplits, model: str) -> tuple[DataSplits, tuple[str, ...]]:
    """``data`` with streamed training rows read whole, for a job that trains on tensors
    alone (M2, the CVAE), and the note that says so (none for data in memory already)."""
    if not data.streamed:
        return data, ()
    note = (
        f"note: --model {model} trains on tensors: the {len(data.x_train)} training rows of "
        f"{data.name} are read whole into memory (only --model vae streams a .npy batch by "
        "batch)"
    )
    return data.in_memory(), (note,)


def digest(x: Tensor) -> str:
    """A SHA-256 of a tensor's values, to tell whether two test sets are the same."""
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class Run:
    """A run of scripts/train.py, of any model kind: new (``args`` and ``checkpoint`` empty)
    or read back by :func:`pyro_vae.jobs.load_run`."""

    directory: Path
    kind: str
    """The config's ``"model"``: ``"vae"``, ``"m2"`` or ``"cvae"``."""
    model: nn.Module
    """The model, on the CPU."""
    config: dict[str, Any]
    """The keyword arguments of its builder that rebuild it (with ``"model"`` for M2 and
    the CVAE)."""
    args: dict[str, Any]
    """The arguments of scripts/train.py that made it (empty for a new run)."""
    checkpoint: dict[str, Any]
    """The whole checkpoint: epoch, step, metrics, training state, and what the model kind
    adds (M2's ``labelled_indices``); empty for a new run."""
    data: DataSplits
    x_test: Tensor
    """The test set exactly as the run scores it, on the CPU in the model's dtype."""
    x_train_eval: Tensor
    """The training subset the run scores each epoch, likewise."""
    x_val: Tensor | None = None
    """The validation set as the run scores it each epoch (``None`` without one), likewise;
    ``data.x_val`` holds its rows as loaded."""
    validation_indices: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """The rows of the loaded training set held out for validation (empty without any)."""
    selection: dict[str, Any] | None = None
    """For a run read back with its best weights: which epoch they are of, and the validation
    metric that chose it (``best.pt``'s ``"selection"``); ``None`` for the last weights."""
    companions: dict[str, nn.Module] = field(default_factory=dict)
    """For a run read back with its best weights: the models of its job's other checkpoints
    (the CVAE's ``baseline.pt``) by file name, as loaded and checked against the run, so that
    what is used is what was checked, loaded once."""
    digests: dict[str, str] = field(default_factory=dict)
    """The SHA-256 of each checkpoint file the run was read from (``checkpoint.pt``,
    ``best.pt``, the companions), by file name: of the very bytes that were loaded."""

    def file_sha256(self, name: str) -> str:
        """The SHA-256 of the run's file ``name``: of the bytes loaded when the run was read,
        so that a report's digest is of the weights it used, even if the file changed since;
        of the file as it is now for a file the run was read without."""
        known = self.digests.get(name)
        return known if known is not None else file_digest(self.directory / name)

    def scored_sets(self, device: str, dtype: torch.dtype) -> dict[str, Tensor]:
        """The evaluation sets as the run scores them, by split (``"train"`` (the subset),
        ``"val"`` where there is one, ``"test"``), on ``device`` in ``dtype``."""
        sets = {"train": self.x_train_eval, "val": self.x_val, "test": self.x_test}
        return {name: x.to(device, dtype) for name, x in sets.items() if x is not None}


def read_run(
    directory: str | os.PathLike,
    kinds: dict[str, tuple[str, ...]],
    *,
    best: bool = False,
) -> Run:
    """The run in ``directory``, from one read of its ``checkpoint.pt``: the model, its
    arguments, the data with the validation rows held out as the run held them, and the test
    set rebuilt and checked against the digest the run stored. What a model kind checks
    beyond this (M2's labelled rows) is its job's ``check_run``;
    :func:`pyro_vae.jobs.load_run` calls both.

    :param kinds: the model kinds a run may be, each with the files its job writes (their
        ``.pt`` files are checked against the run when ``best``).
    :param best: the weights of the best epoch by validation (``best.pt``) instead of the
        newest ones, where the run kept them.

    :raises ValueError: when ``directory`` holds no run, its checkpoint is damaged or was not
        written by scripts/train.py, or the test set rebuilt from the data is not the one the
        run scored (the data files changed since).
    :raises FileNotFoundError: when the run's dataset cannot be found any more.
    """
    directory = Path(directory)
    path = checkpoint_path(directory)
    model, payload, digests = read_checkpoint(path)
    kind = str(payload["config"].get("model", "vae"))
    if kind not in kinds:
        raise ValueError(f"{path}: a {kind} model, not a run of scripts/train.py")
    # Every entry beside the weights, checked whole before any is used (run_schema.py).
    check_run_payload(payload, path)
    args = {**FLAGS_ADDED_SINCE, **payload["args"]}
    data = load_dataset(
        args["dataset"],
        args["data_dir"],
        test_dataset=args["test_dataset"],
        image_size=args["image_size"],
        seed=args["seed"],
        stream=True,  # as the run trained: a .npy's training rows stay in the file
    )
    held_out = validation_indices(len(data.x_train), args["val_size"], args["seed"])
    recorded = payload.get("validation_indices", held_out[:0])
    if not isinstance(recorded, Tensor) or not torch.equal(recorded.cpu(), held_out):
        raise ValueError(
            f"{path}: its validation rows are not the ones --val-size {args['val_size']} and "
            f"--seed {args['seed']} hold out of {args['dataset']} now (have the data changed?)"
        )
    data = data.hold_out(held_out)
    x_test, x_train_eval, x_val = evaluation_sets(model, data, args["seed"])
    if digest(x_test) != payload["evaluation_digest"]:
        raise ValueError(
            f"{path}: the test set rebuilt from {args['dataset']} is not the one this run "
            "scored (have the data files changed?)"
        )
    selection = None
    companions = {}
    if best:
        # The run's other checkpoints, checked against it: a copy from another run is refused
        # (the CVAE's baseline.pt too, which evaluate.py then uses as loaded here).
        for name in kinds[kind]:
            if name.endswith(".pt") and (directory / name).is_file():
                companions[name], _, read = load_companion(directory, name, payload, args)
                digests.update(read)
        if (directory / BEST).is_file():
            model, kept, read = load_companion(directory, BEST, payload, args)
            digests.update(read)
            selection = kept.get("selection")
    dtype = next(model.parameters()).dtype
    return Run(
        directory=directory,
        kind=kind,
        model=model,
        config=payload["config"],
        args=args,
        checkpoint=payload,
        data=data,
        x_test=x_test.to(dtype),
        x_train_eval=x_train_eval.to(dtype),
        x_val=None if x_val is None else x_val.to(dtype),
        validation_indices=held_out,
        selection=selection,
        companions=companions,
        digests=digests,
    )


def read_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any], dict[str, str]]:
    """:func:`~pyro_vae.load_checkpoint` of ``path``, with ``{file name: SHA-256}`` of the
    very bytes it loaded (one read: no other version of the file can slip in between)."""
    data = read_regular_file(path)
    model, payload = checkpoint_from_bytes(data, path)
    return model, payload, {path.name: hashlib.sha256(data).hexdigest()}


def load_companion(
    directory: Path, name: str, payload: dict[str, Any], args: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any], dict[str, str]]:
    """The checkpoint ``name`` beside the run's ``checkpoint.pt`` in ``directory``
    (``best.pt``, the CVAE's ``baseline.pt``), loaded and checked against the run (its
    checkpoint ``payload`` and arguments ``args``): one from another run is refused. With
    the model and its checkpoint, ``{name: SHA-256}`` of the bytes loaded.

    :raises ValueError: naming the file and what does not match."""
    model, kept, digests = read_checkpoint(directory / name)
    ignored = [flag.removeprefix("--").replace("-", "_") for flag in RESUME_OVERRIDES]
    check_companion_payload(
        kept,
        directory / name,
        payload,
        args,
        ignored=[*ignored, "out_dir"],
        defaults=FLAGS_ADDED_SINCE,
        selected=name == BEST,
    )
    return model, kept, digests


def run_arguments(args: Any) -> dict[str, Any]:
    """A script's parsed arguments as plain values for the checkpoint, without those that
    only steer this invocation (resume, overwrite)."""
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for key in ("resume", "overwrite", "given"):
        plain.pop(key, None)
    return plain


def resumed_args(
    saved: dict[str, Any],
    given: argparse.Namespace,
    training: dict[str, Any],
    overrides: Iterable[str],
) -> argparse.Namespace:
    """A resumed run's arguments: the ``saved`` ones (the checkpoint's ``"args"``), with the
    flags in ``overrides`` that the command (``given``, with its ``resume`` directory and the
    set ``given`` of flags typed) gave taken from it, and ``out_dir`` the run's directory.

    :raises ValueError: when ``--num-epochs`` is fewer than the epochs already begun
        (``training``, the checkpoint's training state).
    """
    args = argparse.Namespace(**{**FLAGS_ADDED_SINCE, **saved})
    args.out_dir = given.resume  # the run's directory, wherever it is now
    for flag in overrides:
        name = flag.removeprefix("--").replace("-", "_")
        if flag in given.given:
            setattr(args, name, getattr(given, name))
    # An epoch under way (step > 0) must be finished too.
    done = training["epoch"] + (training["step"] > 0)
    if args.num_epochs < done:
        raise ValueError(
            f"--num-epochs {args.num_epochs}: the run in {given.resume} has already "
            f"{'started' if training['step'] else 'finished'} epoch {done}; give at least {done}"
        )
    return args


def resume_device(saved: dict[str, Any], given: argparse.Namespace) -> str:
    """The device a resumed run goes on on: ``--device`` where the command gives it, else the
    one it trained on (``saved``, its arguments).

    :raises ValueError: when the run trained on a GPU and none is here, naming ``--device
        cpu``: going on on the CPU is the user's choice to make, since the run then cannot be
        bit-identical to one that stayed on its GPU (and a GPU that failed to start should not
        turn a run into one many times slower without a word).
    """
    if "--device" in given.given:
        return str(given.device)
    device = str(saved["device"])
    parsed = torch.device(device)
    if parsed.type == "cuda" and (
        not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(
            f"the run in {given.resume} trained on {device}, which this machine does not have; "
            f"go on on the CPU with --resume {given.resume} --device cpu (the resumed run then "
            f"cannot be bit-identical to one that stayed on {device})"
        )
    return device


def carry_random_states(
    training: dict[str, Any], trained_on: str, device: str, seed: int
) -> tuple[dict[str, Any], str | None]:
    """A resumed run's saved ``training`` state made to go on on ``device``, and a line that
    says what could not be carried over (``None`` when the run stays on its kind of device).

    A ``torch.Generator``'s state is its device kind's own (the CPU's Mersenne Twister, a
    GPU's 16 bytes of Philox): one saved on another kind cannot be set. The generator of the
    shuffles and the binarization (and each rank's binarization generator) then starts
    afresh, from ``seed`` and the position, so that a resume of one checkpoint is the same
    every time; the CUDA states are kept, unused without a GPU. The CPU's global state (the
    draws of z on the CPU) carries over."""
    before, after = torch.device(trained_on).type, torch.device(device).type
    if before == after:
        return training, None
    size = torch.Generator(device).get_state().numel()
    (mixed,) = np.random.SeedSequence(
        seed, spawn_key=(2, training["epoch"], training["step"])
    ).generate_state(1, np.uint64)
    fresh = torch.Generator(device).manual_seed(int(mixed)).get_state()
    mapped = dict(training)
    if mapped["generator_rng"] is not None and mapped["generator_rng"].numel() != size:
        mapped["generator_rng"] = fresh
    if mapped.get("rank_states") is not None:
        mapped["rank_states"] = [
            {**rank, "noise_rng": None}
            if rank["noise_rng"] is not None and rank["noise_rng"].numel() != size
            else rank
            for rank in mapped["rank_states"]
        ]
    note = (
        f"note: the run trained on {trained_on} and goes on on {device}: the random states of "
        f"one kind of device cannot be set on the other (the shuffles' and binarization's "
        f"generator starts afresh from --seed), and the arithmetic rounds otherwise, so the "
        f"resumed run cannot be bit-identical to one that stayed on {trained_on}"
    )
    return mapped, note


@dataclass
class Setup:
    """What a job trains and scores, prepared (on the run's device) from a :class:`Run` by
    its job module's ``prepare``: the runner reads nothing else."""

    model: nn.Module
    """The run's model, on the run's device."""
    training_data: tuple[Tensor, ...] | tuple[ArrayDataset]
    """fit's data: the rows and what goes with them (M2's labels, the CVAE's given pixels);
    a VAE's rows streamed from a ``.npy`` are an :class:`~pyro_vae.ArrayDataset` alone, which
    fit reads batch by batch."""
    loss: ELBO
    description: str
    """The first line a run prints: data, model, objective, device."""
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    """What the job adds to every checkpoint (M2's ``labelled_indices``)."""
    scored: dict[str, Tensor] = field(default_factory=dict)
    """The job's evaluation tensors, on the device (its epoch row and final score read them)."""
    notes: tuple[str, ...] = ()
    """Lines said after the first one."""
    kept_epoch: int | None = None
    """The epoch whose weights the runner kept and the test set scores (set after training)."""
    binarize: bool | None = None
    """fit's ``binarize``: ``None`` lets fit judge the data (all of them in memory, the first
    batch of a streamed set); a job that streams decides on all of its rows."""
    trained: str = "training"
    """What the training time in the last line is of (the CVAE's job trains a baseline too,
    and times it apart)."""


def per_class(
    labels: Tensor, class_names: Sequence[str], **values: Tensor
) -> dict[str, dict[str, Any]]:
    """An evaluation's numbers by class: each class's count and the mean of each of
    ``values`` (one number per example) over its examples."""
    return {
        class_names[int(label)]: {
            "count": int(mask.sum()),
            **{name: value[mask].mean().item() for name, value in values.items()},
        }
        for label in labels.unique()
        for mask in [labels == label]
    }


def elbo_line(row: dict[str, Any]) -> str:
    """An epoch row's ELBO terms as an epoch line shows them: the training subset's ELBO and
    the validation set's, with its two terms (and a Bayesian decoder's weight KL); the
    training subset's terms without a validation set."""
    shown = "val" if "val_elbo" in row else "train"
    weight_kl = row.get(f"{shown}_weight_kl")
    return (
        f"train ELBO {row['train_elbo']:8.2f}"
        + (f"  val ELBO {row['val_elbo']:8.2f}" if shown == "val" else "")
        + f" (reconstruction {row[f'{shown}_reconstruction']:8.2f}, KL {row[f'{shown}_kl']:6.2f}"
        + ("" if weight_kl is None else f", weight KL {weight_kl:.0f}")
        + ")"
    )


def provenance(run: Run, model: str, seed: int) -> dict[str, Any]:
    """Where an evaluation's numbers came from: the run, its dataset, the weights file's bytes
    and the test set's digest (the numbers belong to these exactly), the epoch of the weights
    and how it was chosen, the model's description and the seed."""
    if run.selection is not None:
        weights, epoch, step = run.directory / BEST, run.selection["epoch"], 0
        chosen = run.selection["how"]
    else:
        weights, epoch, step = (
            checkpoint_path(run.directory),
            run.checkpoint["epoch"],
            run.checkpoint["step"],
        )
        chosen = "the newest checkpoint"
    return {
        "run": str(run.directory),
        "dataset": run.args["dataset"],
        "weights": weights.name,
        "checkpoint_sha256": run.file_sha256(weights.name),
        "test_set_sha256": run.checkpoint["evaluation_digest"],
        "epoch": epoch,
        "step": step,
        "selected_by": chosen,
        "model": model,
        "seed": seed,
    }


def explain_on(run: Run, x: Tensor, out_dir: Path, **options: Any) -> Path:
    """:func:`pyro_vae.explain` of the run's model on ``x`` (its test set as the run scores
    it), with its data's labels, image shape and class names; ``options`` are the model
    kind's (``num_particles``, a CVAE's ``condition``)."""
    data = run.data
    return explain(
        run.model,  # type: ignore[arg-type]
        x,
        data.y_test,
        data.image_shape,
        data.class_names,
        out_dir,
        **options,
    )


def file_digest(path: Path) -> str:
    """A SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
