"""Where a :func:`~pyro_vae.infer.fit.fit` stands and what it measured: :class:`History`,
:class:`TrainingState` (the checkpoint of a run, to resume it exactly) and the error of a run
that diverged."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pyro_vae.infer import distributed


@dataclass
class History:
    """What :func:`~pyro_vae.infer.fit.fit` measured. Losses are per example, in nats: the
    training objective (−ELBO, or −β-ELBO when β ≠ 1) summed over features and averaged over
    examples."""

    loss: list[float] = field(default_factory=list)
    """Mean per-example loss of each epoch."""
    step_loss: list[float] = field(default_factory=list)
    """Per-example loss of each step (an unbiased estimate for the whole dataset)."""
    epoch_seconds: list[float] = field(default_factory=list)
    binarized: bool = False
    """Whether the training data were binarized dynamically (a fresh draw for every batch)."""

    @property
    def num_epochs(self) -> int:
        return len(self.loss)


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite. Raised before the optimizer applies that step, so the
    model keeps the parameters of the last finite step."""


def describe_position(epoch: int, step: int) -> str:
    """``epoch`` epochs done and ``step`` steps into the next, as the messages say it."""
    return f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"


# The options of a torch optimizer's param group that choose its implementation.
_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


@dataclass
class TrainingState:
    """Where a :func:`~pyro_vae.infer.fit.fit` stands between two steps: with the model's
    weights, everything it needs to continue exactly. ``to_dict`` gives plain tensors and
    values, which ``torch.save`` writes and ``torch.load(weights_only=True)`` reads back.

    :meth:`capture` takes it from a running fit; :meth:`restore` puts it back into another.
    """

    epoch: int
    """Epochs completed."""
    step: int
    """Steps completed in the epoch under way; 0 between epochs."""
    order: Tensor | None
    """The shuffle of the epoch under way (``None`` between epochs)."""
    optimizer: dict
    torch_rng: Tensor
    """torch's global random state: the draws of z, of the weights, and of Pyro's estimators."""
    cuda_rng: list[Tensor] | None
    generator_rng: Tensor | None
    """The state of fit's ``generator`` (shuffles, binarization), if one was given."""
    history: History
    rank_states: list[dict[str, Any]] | None = None
    """On many processes (:mod:`pyro_vae.infer.distributed`), every rank's own random states, in
    rank order: ``torch_rng``, ``cuda_rng`` and ``noise_rng`` (its binarization generator);
    ``None`` on one process."""

    def position(self) -> str:
        """Where the run stands, in the words of every message: "epoch 36, step 4" (4 steps into
        epoch 36) or "the end of epoch 35"."""
        return describe_position(self.epoch, self.step)

    @property
    def world_size(self) -> int:
        """The number of processes that trained the run."""
        return 1 if self.rank_states is None else len(self.rank_states)

    def check_world_size(self, world_size: int) -> None:
        """Refuse to go on with another number of processes than the run's: each rank's random
        streams and shard are its own, so the run could go on, but not as it would have;
        refused rather than silently inexact."""
        if world_size == self.world_size:
            return
        how = (
            "without torchrun"
            if self.world_size == 1
            else f"torchrun --nproc-per-node {self.world_size} (on one node; on several, as "
            f"many processes in all)"
        )
        raise ValueError(
            f"resume: the run was trained on {self.world_size} process(es), this is "
            f"{world_size}; resume it with {how}"
        )

    @classmethod
    def capture(
        cls,
        epoch: int,
        step: int,
        order: Tensor | None,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator | None,
        history: History,
        noise: torch.Generator | None = None,
    ) -> TrainingState:
        """The state after ``step`` steps of the epoch after ``epoch`` (0: between epochs).
        On many processes every rank must call it (it gathers their random states, and
        ``noise`` is the rank's binarization generator)."""
        group = distributed.ranks()
        rank_states = None
        if group.distributed:
            rank_states = distributed.all_gather(
                {
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": _cuda_rng(),
                    "noise_rng": None if noise is None else noise.get_state().cpu(),
                }
            )
        return cls(
            epoch=epoch,
            step=step,
            order=order if step else None,
            optimizer=optimizer.state_dict(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=_cuda_rng(),
            generator_rng=None if generator is None else generator.get_state(),
            history=history,
            rank_states=rank_states,
        )

    def restore(
        self,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator | None,
        epoch_length: int,
        device: torch.device,
        noise: torch.Generator | None = None,
    ) -> tuple[History, int, int, Tensor | None]:
        """Put the optimizer and random states back (on many processes, this rank's own, and
        ``noise``'s); return a copy of the history, the epoch and step to go on from, and the
        epoch's shuffle (``epoch_length`` rows long: fit's ``EpochOrder``)."""
        group = distributed.ranks()
        self.check_world_size(group.world_size)
        if self.order is not None and len(self.order) != epoch_length:
            raise ValueError(
                f"resume: the saved run's epoch takes {len(self.order)} rows, an epoch of "
                f"this data {epoch_length}"
            )
        if (self.generator_rng is None) != (generator is None):
            raise ValueError("resume: pass a generator exactly when the saved run had one")
        # The optimizer's implementation (fused or not) is this fit's choice (compile,
        # deferred reads), not the saved state's: load_state_dict would take the saved one's
        # along.
        saved = dict(self.optimizer)
        saved["param_groups"] = [
            {**group, **{k: mine[k] for k in _IMPLEMENTATION if k in mine}}
            # Not strict: a different count of groups is load_state_dict's to report.
            for group, mine in zip(
                self.optimizer["param_groups"], optimizer.param_groups, strict=False
            )
        ]
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"resume: the optimizer state does not fit this model: {error}"
            ) from error
        mine: dict[str, Any] = (
            {"torch_rng": self.torch_rng, "cuda_rng": self.cuda_rng, "noise_rng": None}
            if self.rank_states is None
            else self.rank_states[group.rank]
        )
        torch.set_rng_state(mine["torch_rng"])
        if mine["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda_rng"])
        if noise is not None and mine["noise_rng"] is not None:
            noise.set_state(mine["noise_rng"])
        # Both or neither, checked above; the second test is for the type checker.
        if generator is not None and self.generator_rng is not None:
            generator.set_state(self.generator_rng)
        order = None if self.order is None else self.order.to(device)
        return copy.deepcopy(self.history), self.epoch + 1, self.step, order

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict(self): it would deep-copy the optimizer's tensors needlessly.
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        plain["history"] = dataclasses.asdict(self.history)
        return plain

    @classmethod
    def from_dict(cls, plain: dict[str, Any]) -> TrainingState:
        try:
            # rank_states came later: checkpoints of one process saved before it lack it.
            fields = {f.name for f in dataclasses.fields(cls)} - {"rank_states"}
            values = {k: plain[k] for k in fields}
            values["rank_states"] = plain.get("rank_states")
            values["history"] = History(**plain["history"])
            return cls(**values)
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a saved training state ({error})") from error


def _cuda_rng() -> list[Tensor] | None:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
