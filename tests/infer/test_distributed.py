"""Training on many processes (pyro_vae.infer.distributed, fit under torchrun) and fit's deferred
reads.

The tests that launch torchrun start real processes (gloo on the CPU) and are marked slow.
"""

import copy
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed_fit
import pyro
import pytest
import torch
from scripts_in_process import call, load_script
from test_faults import assert_same_run, wait_for_checkpoint
from torch.utils.data import DistributedSampler

import pyro_vae as pv
from pyro_vae.infer import distributed
from pyro_vae.infer.distributed import Ranks
from pyro_vae.infer.state import TrainingState
from pyro_vae.jobs import load_run

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "scripts" / "train.py"
RUN = ("--latent-dim", "3", "--hidden-dims", "16", "--num-iw-particles", "0", "--no-progress")


def torchrun_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *args,
    ]


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        torchrun_command(*args), capture_output=True, text=True, timeout=timeout, env=env
    )


# --- sharding, seeds, the training state: one process -------------------------------------


@pytest.mark.parametrize("size", [1, 2, 5, 12, 13])
@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_shards_are_those_of_torch_distributed_sampler(size, world_size):
    order = torch.randperm(size, generator=torch.Generator().manual_seed(size))
    for rank in range(world_size):
        sampler = DistributedSampler(
            range(size), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False
        )
        expected = order[list(sampler)]
        assert torch.equal(distributed.shard(order, Ranks(rank, world_size)), expected)


def test_shards_cover_every_example_and_are_equal_in_size():
    order = torch.randperm(10)
    shards = [distributed.shard(order, Ranks(r, 4)) for r in range(4)]
    assert {len(s) for s in shards} == {3}
    assert set(torch.cat(shards).tolist()) == set(range(10))


def test_one_process_takes_the_whole_order():
    order = torch.randperm(7)
    assert distributed.shard(order, Ranks()) is order
    assert distributed.rows(order, Ranks()) is order


def test_evaluation_rows_take_each_example_once():
    x = torch.arange(11)
    parts = [distributed.rows(x, Ranks(r, 3)) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(11))


def test_each_rank_has_a_noise_seed_of_its_own_that_numpy_accepts():
    seeds = {distributed.noise_seed(0, rank) for rank in range(8)}
    assert len(seeds) == 8
    assert 0 not in seeds
    assert max(seeds) < 2**32


def test_without_torchrun_there_is_one_process():
    assert not distributed.launched_by_torchrun()
    group, device = distributed.join("cpu")
    assert group == Ranks(0, 1) and device == "cpu"
    assert group.is_main and not group.distributed


def _state(rank_states):
    return TrainingState(
        epoch=1,
        step=0,
        order=None,
        optimizer={},
        torch_rng=torch.get_rng_state(),
        cuda_rng=None,
        generator_rng=None,
        history=pv.History(),
        rank_states=rank_states,
    )


def test_a_run_of_two_processes_is_not_resumed_on_one():
    two = [{"torch_rng": torch.get_rng_state(), "cuda_rng": None, "noise_rng": None}] * 2
    state = TrainingState.from_dict(_state(two).to_dict())
    assert state.world_size == 2
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match=r"trained on 2 process\(es\), this is 1.*nproc-per-node"):
        state.restore(optimizer, None, 10, torch.device("cpu"))


def test_a_state_saved_before_rank_states_existed_loads_as_one_process():
    plain = _state(None).to_dict()
    del plain["rank_states"]
    assert TrainingState.from_dict(plain).world_size == 1


@pytest.mark.parametrize("script", ["evaluate", "explain"])
def test_evaluate_and_explain_refuse_torchrun(script, tmp_path, capsys, monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    code, _, err = call(load_script(script), str(tmp_path), capsys=capsys)
    assert code == 2
    assert "runs on one process; start it without torchrun" in err


# --- deferred reads (the GPU's schedule, run here on the CPU) -----------------------------


def _vae_and_data(seed=0):
    pyro.set_rng_seed(seed)
    x = torch.rand(96, 8, generator=torch.Generator().manual_seed(1))
    return pv.VAE(8, 2, hidden_dims=(6,)), x


@pytest.mark.parametrize("log_every", [1, 4, 7])
def test_deferred_reads_record_the_same_losses(log_every):
    """Reading every log_every steps changes when the host looks, not what is trained: the
    same step losses as reading at every step (up to fused Adam's rounding)."""
    histories = []
    for every in (1, log_every):
        vae, x = _vae_and_data()
        histories.append(
            pv.fit(vae, x, num_epochs=2, batch_size=16, progress=False, log_every=every)
        )
    assert len(histories[1].step_loss) == len(histories[0].step_loss) == 12
    assert histories[1].step_loss == pytest.approx(histories[0].step_loss, rel=1e-5)


class _PoisonedAt(pv.VAE):
    """A VAE whose loss is NaN from its ``bad``-th guide call (1-based, after fit's trace of
    the first batch), recording the parameters at the start of that call."""

    def __init__(self, *args, bad, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad, self.calls, self.before = bad, -1, None

    def model(self, x, num_data=None):
        super().model(x, num_data=num_data)
        if self.calls >= self.bad:
            pyro.factor("poison", torch.tensor(float("nan")))

    def guide(self, x, num_data=None):
        self.calls += 1
        if self.calls == self.bad:
            self.before = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return super().guide(x, num_data=num_data)


@pytest.mark.parametrize("log_every", [1, 5])
def test_a_bad_step_read_late_is_still_named_and_never_applied(log_every):
    pyro.set_rng_seed(0)
    vae = _PoisonedAt(8, 2, hidden_dims=(6,), bad=3)
    x = torch.rand(96, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(pv.TrainingDivergedError, match="loss is nan at epoch 1, step 3 of 6"):
        pv.fit(vae, x, num_epochs=1, batch_size=16, progress=False, log_every=log_every)
    for name, value in vae.state_dict().items():
        assert torch.equal(value, vae.before[name]), name


class _PoisonedOnce(_PoisonedAt):
    """A VAE whose loss is NaN at its ``bad``-th guide call only: the steps after it are
    finite again."""

    def model(self, x, num_data=None):
        pv.VAE.model(self, x, num_data=num_data)
        if self.calls == self.bad:
            pyro.factor("poison", torch.tensor(float("nan")))


def test_good_steps_after_a_bad_one_are_not_applied_before_the_read():
    """Reads every 5 steps, NaN at step 3 only: steps 4 and 5 are finite, yet they come after
    the bad one, and training stops there at the read of step 5. The skip must hold from the
    bad step on, so that the parameters are those before step 3, not those after 4 and 5."""
    pyro.set_rng_seed(0)
    vae = _PoisonedOnce(8, 2, hidden_dims=(6,), bad=3)
    x = torch.rand(96, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(pv.TrainingDivergedError, match="loss is nan at epoch 1, step 3 of 6"):
        pv.fit(vae, x, num_epochs=1, batch_size=16, progress=False, log_every=5)
    assert vae.calls == 5  # steps 4 and 5 were computed
    for name, value in vae.state_dict().items():
        assert torch.equal(value, vae.before[name]), name


class _CtrlCAt(pv.VAE):
    """A VAE that sends itself SIGINT (a Ctrl-C) during its ``at``-th step's guide call."""

    def __init__(self, *args, at, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.calls = at, -1  # the first call is fit's trace of the first batch

    def guide(self, x, num_data=None):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().guide(x, num_data=num_data)


@pytest.mark.parametrize("log_every", [1, 5])
def test_a_ctrl_c_finishes_the_step_under_way_and_checkpoints_it(log_every):
    pyro.set_rng_seed(0)
    vae = _CtrlCAt(8, 2, hidden_dims=(6,), at=3)
    saved = []
    with pytest.raises(KeyboardInterrupt):
        pv.fit(
            vae,
            torch.rand(96, 8, generator=torch.Generator().manual_seed(1)),
            num_epochs=1,
            batch_size=16,
            progress=False,
            log_every=log_every,
            checkpoint=saved.append,
        )
    assert [(state.epoch, state.step) for state in saved] == [(0, 3)]
    assert len(saved[0].history.step_loss) == 3


def test_a_state_saved_reading_every_step_resumes_reading_every_few():
    """The optimizer's implementation is the resuming fit's choice: a state saved by
    torch's default Adam (reading every step) resumes with fused Adam (deferred reads),
    which alone can skip a bad step on the device."""
    vae, x = _vae_and_data()
    saved = []
    options = dict(num_epochs=2, batch_size=16, progress=False)
    whole = pv.fit(
        vae,
        x,
        log_every=1,
        checkpoint_every=4,
        # Copies: the state holds the live history, which the run goes on filling.
        checkpoint=lambda state: saved.append(copy.deepcopy((state, vae.state_dict()))),
        **options,
    )
    state, weights = saved[0]
    assert (state.epoch, state.step) == (0, 4)
    assert not state.optimizer["param_groups"][0]["fused"]
    resumed, _ = _vae_and_data()
    resumed.load_state_dict(weights)
    history = pv.fit(resumed, x, log_every=5, resume=state, **options)
    # The same run up to the rounding of fused Adam against torch's default implementation.
    assert history.step_loss == pytest.approx(whole.step_loss, rel=1e-4)


def test_log_every_must_be_a_positive_integer():
    vae, x = _vae_and_data()
    with pytest.raises(ValueError, match="log_every"):
        pv.fit(vae, x, num_epochs=1, batch_size=16, log_every=0)


# --- two processes under torchrun -----------------------------------------------------------


@pytest.mark.slow
def test_ddp_gradient_equals_the_gradient_of_the_global_batch(tmp_path):
    """Two ranks with half of a global batch each, the same ε per example: the gradient DDP
    averages equals one process's on the whole batch, for each objective (float64). And the
    evaluation metrics all-reduced over the ranks equal one process's on the whole set, and
    fit refuses arguments that differ between ranks ("refused" is 0 when it did)."""
    out = tmp_path / "largest.json"
    done = torchrun(str(ROOT / "tests" / "infer" / "distributed_gradients.py"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    largest = json.loads(out.read_text())
    assert set(largest) == {
        "Trace_ELBO",
        "TraceMeanField_ELBO",
        "RenyiELBO",
        "compiled Trace_ELBO",
        "compiled TraceMeanField_ELBO",
        "metrics",
        "refused",
    }
    for name, difference in largest.items():
        assert difference < 1e-10, (name, difference)


@pytest.mark.slow
def test_fit_on_two_ranks_records_what_one_process_with_the_global_batch_records(tmp_path):
    """A deterministic model on two ranks of batch 3 and on one process of batch 6 takes the
    same steps (tests/infer/distributed_fit.py): the same step losses (the all-reduced loss
    divided by the number of ranks), epoch losses, steps per epoch (the ranks' own, over
    their shards) and β at every step of a KL warm-up. And each rank binarizes from a
    generator of its own, seeded from the shared seed and its rank."""
    out = tmp_path / "two.json"
    done = torchrun(str(ROOT / "tests" / "infer" / "distributed_fit.py"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(out.read_text())
    fitted, one = two["fit"], distributed_fit.train(2 * distributed_fit.BATCH)
    steps = distributed_fit.EPOCHS * 3  # 7 examples per rank, batches of 3: 3 steps an epoch
    warmup = distributed_fit.WARMUP_EPOCHS * 3
    assert fitted["betas"] == one["betas"] == [min(1.0, s / warmup) for s in range(1, steps + 1)]
    assert len(fitted["step_loss"]) == len(one["step_loss"]) == steps
    assert fitted["step_loss"] == pytest.approx(one["step_loss"], rel=1e-12)
    assert fitted["loss"] == pytest.approx(one["loss"], rel=1e-12)
    full = torch.full((distributed_fit.BATCH, distributed_fit.DATA_DIM), 0.5)
    expected = [
        torch.bernoulli(
            full,
            generator=torch.Generator().manual_seed(
                distributed.noise_seed(distributed_fit.SEED, rank, "binarization")
            ),
        ).tolist()
        for rank in (0, 1)
    ]
    assert two["binarized"] == expected
    assert two["binarized"][0] != two["binarized"][1]


def _ranks_of(torchrun_process: subprocess.Popen) -> list[int]:
    """The pids of the two ranks that torchrun started."""
    found = subprocess.run(
        ["pgrep", "-P", str(torchrun_process.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(found) == 2, found
    return [int(pid) for pid in found]


def _files(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir()}


def _board(run_dir: Path) -> set[str]:
    """The TensorBoard log a run writes where the package is installed (the dev extra has it):
    by rank 0 alone, so one event file."""
    if importlib.util.find_spec("tensorboard") is None:
        return set()
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    return {"tensorboard"}


# With one seed, two ranks of batch 64 see the very batches of one process of batch 128 (the
# same shuffle, dealt alternately), and differ from it only in their noise (ε, binarization).
# Over seeds 0-9 (2 digits epochs, default model, one thread per process) the test ELBO of the
# two differed by 0.03 nats on average, with a standard deviation of 0.055 nats; the seeds
# themselves spread the test ELBO by 0.16 nats (benchmarks/README.md, "Scaling out").
PAIRED_SD = 0.055


@pytest.mark.slow
def test_torchrun_trains_one_run_within_noise_of_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    common = ("--num-epochs", "2", "--num-iw-particles", "10", "--no-progress", "--seed", "3")
    # The same global batch: 2 ranks × 64 against 1 process × 128.
    done = torchrun(str(TRAIN), *common, "--batch-size", "64", "--out-dir", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    # One writer: rank 0 speaks once and writes one run, with its figures.
    assert done.stdout.count("done in") == 1
    assert _files(two) == {
        ".pyro_vae.lock",
        "checkpoint.pt",
        "best.pt",
        "metrics.json",
        "metrics.csv",
        "final_metrics.json",
        "reconstructions.png",
        "samples.png",
        "latent_space.png",
        "loss_curves.png",
    } | _board(two)
    assert len(torch.load(two / "checkpoint.pt", weights_only=True)["training"]["rank_states"]) == 2
    single = subprocess.run(
        [sys.executable, str(TRAIN), *common, "--num-threads", "1", "--out-dir", str(one)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    a, b = (json.loads((d / "final_metrics.json").read_text()) for d in (two, one))
    assert abs(a["test_elbo"] - b["test_elbo"]) < 4 * PAIRED_SD
    assert abs(a["test_log_likelihood"] - b["test_log_likelihood"]) < 4 * PAIRED_SD
    # All-reduced: the test ELBO that rank 0 reports is the whole test set's, not its half's.
    # The run scored one draw of z per example, we average 20: they differ by Monte Carlo
    # noise alone, whose standard error comes from two independent one-draw estimates.
    run = load_run(two)
    ours = pv.elbo_terms(run.model, run.x_test, num_particles=20, num_data=1437).elbo.mean()
    c, d = (pv.elbo_terms(run.model, run.x_test, num_data=1437).elbo for _ in range(2))
    se = math.sqrt(((c - d) ** 2).mean().item() / 2 / len(c))
    assert abs(a["test_elbo"] - ours.item()) < 4 * se + 1e-4


MODEL_RUNS = {
    "m2": (
        ("--num-labelled", "100", "--latent-dim", "3", "--hidden-dims", "16"),
        {"accuracy.png", "samples.png", "style_transfer.png"},
    ),
    "cvae": (
        ("--latent-dim", "2", "--hidden-dims", "16", "--num-iw-particles", "5"),
        {"baseline.pt", "completions.png"},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODEL_RUNS)
def test_m2_and_the_cvae_train_under_torchrun_too(model, tmp_path):
    """The one training core trains them on many processes as it trains the VAE: each rank
    draws its own noise (fit refuses ranks with equal random states), rank 0 writes the run."""
    flags, figures = MODEL_RUNS[model]
    run_dir = tmp_path / "run"
    done = torchrun(
        str(TRAIN), "--model", model, *flags, "--num-epochs", "2", "--no-progress",
        "--out-dir", str(run_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done in") == 1
    common = {".pyro_vae.lock", "checkpoint.pt", "best.pt", "metrics.json", "metrics.csv"}
    assert _files(run_dir) == common | {"final_metrics.json"} | figures | _board(run_dir)
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert payload["epoch"] == 2 and len(payload["training"]["rank_states"]) == 2


@pytest.mark.slow
def test_sigkill_under_torchrun_then_resume_ends_exactly_like_an_uninterrupted_run(tmp_path):
    args = ("--num-epochs", "20", "--checkpoint-every", "1", *RUN)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = torchrun(str(TRAIN), *args, "--out-dir", str(reference))
    assert done.returncode == 0, done.stderr[-3000:]

    process = subprocess.Popen(
        torchrun_command(str(TRAIN), *args, "--out-dir", str(killed)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: torchrun and both ranks
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wait_for_checkpoint(killed, process, lambda p: p["epoch"] >= 2 and p["step"] > 0)
    # Both ranks at once, as a crash of the machine would (torchrun starts its workers in
    # sessions of their own, so killing its process group would leave them running).
    for rank in _ranks_of(process):
        os.kill(rank, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    left = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert (left["epoch"], left["step"]) >= (2, 1)

    resumed = torchrun(str(TRAIN), "--resume", str(killed), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from epoch {left['epoch'] + 1}, step {left['step']}" in resumed.stdout
    assert_same_run(reference, killed)

    # On one process the run is refused, before anything is written, naming the count.
    alone = subprocess.run(
        [sys.executable, str(TRAIN), "--resume", str(killed), "--num-epochs", "21"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert alone.returncode == 2
    assert "trained on 2 process(es), this is 1; resume it with torchrun --nproc-per-node 2" in (
        alone.stderr
    )
    assert "resuming" not in alone.stdout  # refused before it says it goes on


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_and_the_checkpoint_stays_whole(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        torchrun_command(
            str(TRAIN),
            "--num-epochs",
            "500",
            "--checkpoint-every",
            "1",
            *RUN,
            "--out-dir",
            str(run_dir),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wait_for_checkpoint(run_dir, process, lambda p: p["epoch"] >= 1)
    # The rank with the larger pid: torchrun starts rank 0 first.
    os.kill(max(_ranks_of(process)), signal.SIGKILL)
    started = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("the other rank did not stop within 60 s") from None
    assert process.returncode != 0
    assert time.monotonic() - started < 60
    assert "rank      : 1" in stderr  # torchrun names the rank that failed first
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert payload["epoch"] >= 1


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_rank_that_loses_the_other_says_so_and_exits_1(tmp_path):
    """Without torchrun to stop it (two ranks started by hand, as on two nodes): when rank 1
    dies, rank 0's next collective fails, and it stops with one line, not a traceback."""
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(TRAIN), "--num-epochs", "500", "--checkpoint-every", "1"]
    command += [*RUN, "--out-dir", str(run_dir)]
    ranks = [
        subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in (0, 1)
    ]
    wait_for_checkpoint(run_dir, ranks[0], lambda p: p["epoch"] >= 1)
    ranks[1].kill()
    ranks[1].communicate()
    try:
        _, stderr = ranks[0].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        ranks[0].kill()
        raise AssertionError("rank 0 did not stop within 60 s of losing rank 1") from None
    assert ranks[0].returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "rank 0 lost contact with the other processes of the run" in lines[0]
    assert "checkpoint.pt holds the run at" in lines[0]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] >= 1
