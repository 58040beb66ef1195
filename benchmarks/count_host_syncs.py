"""How many times one training step of ``pyro_vae.fit`` reads a value back to the host.

On a GPU every such read (``float(t)``, ``t.item()``, ``bool(t)``, ``if t:``, ``t.tolist()``)
is a device-to-host copy that waits for the device to finish: a host sync. This script wraps
those methods of ``torch.Tensor`` with a counter, so it counts the reads a step would make on
CUDA, and it does so on the CPU as well, where ``torch.cuda.set_sync_debug_mode`` cannot run.
(A ``TorchDispatchMode`` counting ``aten._local_scalar_dense`` would see the same reads, but
torch.compile refuses to run under such a mode, and the compiled step would fall back to eager.)
On a CUDA machine it also reports ``torch.cuda.set_sync_debug_mode("warn")``'s warnings, the
driver's own view.

    python benchmarks/count_host_syncs.py             # eager and compiled, on the CPU
    python benchmarks/count_host_syncs.py --device cuda
    torchrun --standalone --nproc-per-node 2 benchmarks/count_host_syncs.py   # the DDP step

It trains a 784-400-50 Bernoulli VAE for ``--steps`` steps in one epoch and prints reads per
step, for eager and compiled steps, with fit's reads every ``--log-every`` steps (25, the GPU's
default; the reads at those steps and at the end of the epoch are part of the count).
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

import pyro_vae as pv
from pyro_vae.infer import distributed

# The Tensor methods that hand a tensor's values to Python (each a host sync on CUDA).
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__")


class CountHostReads:
    """While ``on``, counts the calls of :data:`READS` (the outermost only: ``float(t)`` may
    call ``t.item()`` itself) on tensors of ``device``'s type."""

    def __init__(self, device: str) -> None:
        self.device, self.on, self.count, self._depth = device, False, 0, 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[CountHostReads]:
        originals = {name: getattr(torch.Tensor, name) for name in READS}
        for name, original in originals.items():
            setattr(torch.Tensor, name, self._counted(original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    def _counted(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.on and self._depth == 0 and tensor.device.type == self.device:
                self.count += 1
            self._depth += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._depth -= 1

        return read


def reads_per_step(
    device: str, steps: int, batch_size: int, compile: bool, log_every: int
) -> tuple[float, float]:
    """(host reads per step of a rank over its second epoch, CUDA sync warnings per step or
    -1 on the CPU)."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((batch_size * steps, 784), 0.3)).to(device)
    vae = pv.VAE(784, 50, hidden_dims=(400,)).to(device)
    # Under torchrun, every rank its own z (fit refuses equal random states).
    distributed.seed_noise(0)
    kind = torch.device(device).type  # "cuda" also for cuda:N under torchrun
    counter = CountHostReads(kind)

    # Counted in the second epoch only: the first traces (and compiles) and validates.
    def count_from_epoch_2(epoch: int, _: pv.History) -> None:
        counter.on = epoch == 1

    cuda_warnings = -1
    with warnings.catch_warnings(record=True) as caught, counter.installed():
        warnings.simplefilter("always")
        if kind == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        history = pv.fit(
            vae,
            x,
            num_epochs=2,
            batch_size=batch_size,
            progress=False,
            compile=compile,
            log_every=log_every,
            callback=count_from_epoch_2,
            generator=torch.Generator(device).manual_seed(0),
        )
        if kind == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            cuda_warnings = sum("synchroniz" in str(w.message) for w in caught)
    fell_back = [str(w.message) for w in caught if "runs eager" in str(w.message)]
    if fell_back:
        raise RuntimeError(f"the compiled step fell back to eager: {fell_back[0]}")
    assert history.num_epochs == 2
    # This rank's steps per epoch (under torchrun each rank takes 1/W of the examples).
    steps_per_rank = len(history.step_loss) // history.num_epochs
    per_step_warnings = -1.0 if cuda_warnings < 0 else cuda_warnings / steps_per_rank
    return counter.count / steps_per_rank, per_step_warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args()
    # Under torchrun (--nproc-per-node N), the DDP step; rank 0 prints.
    group, args.device = distributed.join(args.device)
    say = print if group.is_main else (lambda *_, **__: None)
    say(
        f"torch {torch.__version__}, device {args.device}, {args.steps} steps of "
        f"{args.batch_size}, fit reads every {args.log_every} steps, "
        f"{group.world_size} process(es)"
    )
    say("| step | host reads per step | CUDA sync warnings per step |")
    say("|---|---|---|")
    for compile in (False, True):
        per_step, cuda = reads_per_step(
            args.device, args.steps, args.batch_size, compile, args.log_every
        )
        shown = "n/a (CPU)" if cuda < 0 else f"{cuda:.2f}"
        name = "fit(compile=True)" if compile else "fit (eager)"
        say(f"| {name} | {per_step:.2f} | {shown} |", flush=True)
    distributed.leave()


if __name__ == "__main__":
    main()
