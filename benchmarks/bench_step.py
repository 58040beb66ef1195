"""Speed of one training step: pyro_vae's ``fit`` against a hand-written PyTorch VAE with the very
same networks and maths, side by side in one process, and a plain Pyro SVI loop for reference.
The hand-written step and ``fit`` are each timed eager and compiled (``torch.compile`` of the
hand-written loss; ``fit(compile=True)``, whose first-step compile time is reported apart).

All three use 784 inputs, one hidden layer of 400, latent 50, Bernoulli likelihood on binary data,
one z sample per example with the Monte-Carlo KL (log q − log p at that z), and Adam. Each variant
runs one epoch of ``--steps`` steps; the variants take turns, ``--repeats`` times, and the median
time per step of the training loop is reported with the ratios to hand-written PyTorch. ``fit``'s
data checks, done once before its first epoch whatever the number of epochs, are timed apart.

    python benchmarks/bench_step.py                 # batch 128 and 1024 on the CPU
    python benchmarks/bench_step.py --fashion-mnist # also one epoch on full Fashion-MNIST
    python benchmarks/bench_step.py --device cuda   # on the GPU (benchmarks/gpu_step.sh)

With ``--device cuda`` the data, the models and the random generator of the shuffles are on the
GPU, and every timed region starts and ends with ``torch.cuda.synchronize()``. The hand-written
compiled loss uses ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), as ``fit(compile=True)``
does on CUDA. ``fit`` times its epochs without synchronizing, so on CUDA the eager ``fit`` runs two
epochs too, and each ``fit``'s timed epoch is the second, measured between synchronized ends of
epochs (``fit``'s callback). The CUDA path has not been run on a GPU yet.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.nn import functional as F

import pyro_vae as pv

DATA_DIM, HIDDEN, LATENT = 784, 400, 50
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def handwritten_loss(vae: pv.VAE, batch: torch.Tensor, num_data: int) -> torch.Tensor:
    """The negative ELBO of the VAE written as plain PyTorch: the very modules of ``vae``, the
    same formulas, no Pyro."""
    encoder, decoder = vae.encoder.net, vae.decoder
    loc, raw_scale = encoder(batch).chunk(2, dim=-1)
    scale = F.softplus(raw_scale) + vae.encoder.min_scale
    z = loc + scale * torch.randn_like(loc)
    logits = decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, batch, reduction="none").sum(-1)
    log_pz = (-0.5 * z.pow(2) - HALF_LOG_2PI).sum(-1)
    log_qz = (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - HALF_LOG_2PI).sum(-1)
    return -(log_px + log_pz - log_qz).sum() * (num_data / batch.shape[0])


def _sync(device: torch.device) -> None:
    """Waits for the GPU's queued work, so that a clock read afterwards is real (CPU: nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# One seeded generator per CUDA device for the shuffles; on the CPU torch's global state, as
# before --device existed.
_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator | None:
    if device.type != "cuda":
        return None
    return _GENERATORS.setdefault(device, torch.Generator(device).manual_seed(0))


def _order(x: torch.Tensor) -> torch.Tensor:
    """A shuffle of the rows of ``x``, drawn on its device."""
    return torch.randperm(x.shape[0], device=x.device, generator=_generator(x.device))


# The torch.compile'd hand-written loss of each VAE, compiled once (in the warm-up) and reused.
_COMPILED_LOSS: dict[int, object] = {}


def handwritten_epoch(
    vae: pv.VAE, x: torch.Tensor, batch_size: int, lr: float, compiled: bool = False
) -> float:
    """An epoch of the hand-written VAE (``compiled``: its loss and backward through
    ``torch.compile``). Returns the seconds of the training loop."""
    loss_fn = handwritten_loss
    if compiled:
        # CUDA: CUDA graphs, as fit(compile=True) uses there (pyro_vae.infer.compiled).
        mode = "reduce-overhead" if x.device.type == "cuda" else None
        compiled_loss = torch.compile(handwritten_loss, mode=mode)
        loss_fn = _COMPILED_LOSS.setdefault(id(vae), compiled_loss)  # type: ignore[assignment]
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    num_data = x.shape[0]
    _sync(x.device)
    started = time.perf_counter()
    for indices in _order(x).split(batch_size):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(vae, x[indices], num_data).backward()
        optimizer.step()
    _sync(x.device)
    return time.perf_counter() - started


def handwritten_compiled_epoch(vae: pv.VAE, x: torch.Tensor, batch_size: int, lr: float) -> float:
    return handwritten_epoch(vae, x, batch_size, lr, compiled=True)


def _fit_on_cuda(
    vae: pv.VAE, x: torch.Tensor, batch_size: int, lr: float, compile: bool
) -> tuple[list[float], float, float]:
    """Two epochs of fit on CUDA: fit's own epoch seconds, the synchronized seconds of the
    second epoch (between the synchronized ends of the two epochs, in fit's callback) and the
    synchronized seconds from the call to the end of the first epoch."""
    ends: list[float] = []

    def synchronized_end(epoch: int, history: pv.History) -> None:
        _sync(x.device)
        ends.append(time.perf_counter())

    _sync(x.device)
    started = time.perf_counter()
    history = pv.fit(
        vae,
        x,
        num_epochs=2,
        batch_size=batch_size,
        learning_rate=lr,
        progress=False,
        compile=compile,
        callback=synchronized_end,
        generator=_generator(x.device),
    )
    return history.epoch_seconds, ends[1] - ends[0], ends[0] - started


def pyro_vae_epoch_and_checks(
    vae: pv.VAE, x: torch.Tensor, batch_size: int, lr: float
) -> tuple[float, float]:
    """The seconds of fit's training loop (one epoch) and of its one-off data checks before the
    first epoch. CUDA: the loop is the second of two epochs (_fit_on_cuda)."""
    if x.device.type == "cuda":
        seconds, second, to_first_end = _fit_on_cuda(vae, x, batch_size, lr, compile=False)
        return second, to_first_end - seconds[0]
    started = time.perf_counter()
    history = pv.fit(vae, x, num_epochs=1, batch_size=batch_size, learning_rate=lr, progress=False)
    total = time.perf_counter() - started
    return history.epoch_seconds[0], total - history.epoch_seconds[0]


def pyro_vae_epoch(vae: pv.VAE, x: torch.Tensor, batch_size: int, lr: float) -> float:
    """fit's training loop; its one-off data checks before the loop are timed apart."""
    return pyro_vae_epoch_and_checks(vae, x, batch_size, lr)[0]


# The seconds of the first step's trace and compilation in the last compiled fit.
COMPILE_SECONDS: dict[int, float] = {}


def pyro_vae_compiled_epoch(vae: pv.VAE, x: torch.Tensor, batch_size: int, lr: float) -> float:
    """fit(compile=True): two epochs, the second timed; the first holds the trace and the
    compilation of the step (each fit compiles afresh), recorded in COMPILE_SECONDS. CUDA: the
    second epoch timed between synchronized ends of epochs (_fit_on_cuda)."""
    if x.device.type == "cuda":
        (first, _), second, _ = _fit_on_cuda(vae, x, batch_size, lr, compile=True)
    else:
        history = pv.fit(
            vae,
            x,
            num_epochs=2,
            batch_size=batch_size,
            learning_rate=lr,
            progress=False,
            compile=True,
        )
        first, second = history.epoch_seconds
    COMPILE_SECONDS[batch_size] = first - second
    return second


def plain_svi_epoch(vae: pv.VAE, x: torch.Tensor, batch_size: int, lr: float) -> float:
    """What a Pyro user writes first: SVI with Pyro's Adam wrapper, validation on."""
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    num_data = x.shape[0]
    _sync(x.device)
    started = time.perf_counter()
    for indices in _order(x).split(batch_size):
        svi.step(x[indices], num_data)
    _sync(x.device)
    return time.perf_counter() - started


VARIANTS = {
    "hand-written PyTorch": handwritten_epoch,
    "hand-written compiled": handwritten_compiled_epoch,
    "pyro_vae.fit": pyro_vae_epoch,
    "pyro_vae.fit compiled": pyro_vae_compiled_epoch,
    "plain Pyro SVI": plain_svi_epoch,
}


def time_steps(
    batch_size: int, steps: int, repeats: int, x_all: torch.Tensor, dims=(DATA_DIM, HIDDEN, LATENT)
) -> dict:
    data_dim, hidden, latent = dims
    x = x_all[: batch_size * steps, :data_dim]
    vae = pv.VAE(data_dim, latent, hidden_dims=(hidden,)).to(x_all.device)
    for run in VARIANTS.values():  # warm-up: allocator, first-call validation, caches
        run(vae, x, batch_size, 1e-4)
    per_step: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, run in VARIANTS.items():
            per_step[name].append(run(vae, x, batch_size, 1e-4) / steps)
    return {name: statistics.median(times) for name, times in per_step.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="also time 4-4-2 networks at batch 4: the fixed cost of one step",
    )
    parser.add_argument(
        "--fashion-mnist",
        action="store_true",
        help="also time one epoch of fit on full Fashion-MNIST",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the data and models live (cuda: synchronized timings, CUDA graphs)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    torch.manual_seed(0)
    where = "CPU"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} threads, {where}"
    )
    # Drawn on the CPU and moved: the same data on either device.
    x_all = torch.bernoulli(torch.full((max(args.batch_sizes) * args.steps, DATA_DIM), 0.3))
    x_all = x_all.to(device)
    others = list(VARIANTS)[1:]
    print(
        "| batch | hand-written PyTorch (ms/step) | "
        + " | ".join(f"{name} (ms/step, ratio)" for name in others)
        + " | first compiled step (s) |"
    )
    print("|---" * (len(others) + 3) + "|")
    for batch_size in args.batch_sizes:
        t = time_steps(batch_size, args.steps, args.repeats, x_all)
        base = t["hand-written PyTorch"]
        print(
            f"| {batch_size} | {1e3 * base:.2f} | "
            + " | ".join(f"{1e3 * t[name]:.2f} ({t[name] / base:.2f}×)" for name in others)
            + f" | {COMPILE_SECONDS[batch_size]:.1f} |",
            flush=True,
        )
    if args.tiny:
        t = time_steps(4, args.steps, args.repeats, x_all, dims=(4, 4, 2))
        base = t["hand-written PyTorch"]
        print(
            f"\nTiny networks (4-4-2, batch 4), the fixed cost of one step: hand-written "
            f"{1e3 * base:.2f} ms, pyro_vae.fit {1e3 * t['pyro_vae.fit']:.2f} ms, plain Pyro "
            f"SVI {1e3 * t['plain Pyro SVI']:.2f} ms"
        )
    if args.fashion_mnist:
        # One fixed binarization, so that both variants see the same binary data.
        x = pv.binarize(pv.load_dataset("fashion-mnist").x_train).to(device)
        vae = pv.VAE(DATA_DIM, LATENT, hidden_dims=(HIDDEN,)).to(device)
        print(f"\nOne epoch on full Fashion-MNIST ({len(x)} binarized images), batch 128:")
        loop = handwritten_epoch(vae, x, 128, 1e-3)
        print(f"- hand-written PyTorch: {loop:.2f} s")
        loop, checks = pyro_vae_epoch_and_checks(vae, x, 128, 1e-3)
        print(
            f"- pyro_vae.fit: {loop:.2f} s, plus {checks:.2f} s of one-off checks "
            "before the first epoch"
        )


if __name__ == "__main__":
    main()
