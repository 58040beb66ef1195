"""--compile auto (issue 24, item 2): the decision from injected step and compile times (no
wall clock decides a test), the compile-time estimate from a record or the known figure,
Inductor's cache in the user's cache directory, the CUDA warning silenced on a CPU run, and
train.py saving the decision as on or off."""

import argparse
import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO
from scripts_in_process import call, load_script

from pyro_vae.infer import compiled
from pyro_vae.jobs import threads, vae

train_script = load_script("train")
TINY = ("--num-epochs", "2", "--latent-dim", "3", "--hidden-dims", "16", "--no-progress")
TINY += ("--num-iw-particles", "0", "--no-tensorboard")

pytestmark = pytest.mark.usefixtures("float32")


def test_a_short_run_does_not_pay_back_the_compile():
    # digits at the defaults: 200 epochs of 11 steps at about 2 ms, a 12 s compile.
    pays, why = compiled.compile_pays(0.002, 2200, 12.0)
    assert not pays
    assert why == "2200 steps at 2.0 ms would save about 1.3s, less than the 12s to compile"


def test_a_long_run_pays_back_the_compile():
    # Fashion-MNIST, 20 epochs of 391 steps at about 11 ms, a 12 s compile.
    assert compiled.compile_pays(0.011, 20 * 391, 12.0)[0]
    # ... but not with a compile ten times as long (a busy machine's cold cache).
    assert not compiled.compile_pays(0.011, 20 * 391, 120.0)[0]


def test_a_saving_within_the_estimates_errors_does_not_compile():
    # The idle Fashion-MNIST run: 7820 steps at 6.2 ms would save about 14.5 s against a 12 s
    # cold compile; compiling on that ended 10% slower than eager (COMPILE_MARGIN).
    pays, why = compiled.compile_pays(0.0062, 7820, 12.0)
    assert not pays
    assert why == (
        "7820 steps at 6.2 ms would save about 15s, more than the 12s to compile, "
        "but not 1.3 times as much"
    )
    # 17 s against 12 (busy neighbours, where the compile paid): compiles.
    pays, why = compiled.compile_pays(0.0072, 7820, 12.0)
    assert pays and why.endswith("would save about 17s, more than 1.3 × the 12s to compile")
    with pytest.raises(ValueError, match="margin must be at least 1"):
        compiled.compile_pays(0.0072, 7820, 12.0, margin=0.9)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """The user's cache directory in tmp_path, no TORCHINDUCTOR_CACHE_DIR set (the test
    restores the environment)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compiled, "_GIVEN_CACHE_DIR", None)
    monkeypatch.setattr(compiled, "_record", {"key": None, "seconds": 0.0, "warm": False})
    return tmp_path / "cache" / "pyro_vae"


def test_inductor_s_cache_goes_to_the_user_s_cache_directory(cache_home, monkeypatch, tmp_path):
    assert compiled.use_inductor_cache_dir() == cache_home / "inductor"
    # Importing torch._inductor sets the variable to torch's default under /tmp: not the user's.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_someone")
    assert compiled.use_inductor_cache_dir() == cache_home / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_home / "inductor")
    # The user's own, set before pyro_vae was imported, is kept.
    monkeypatch.setattr(compiled, "_GIVEN_CACHE_DIR", str(tmp_path / "mine"))
    assert compiled.use_inductor_cache_dir() == tmp_path / "mine"


def test_the_estimate_is_the_cold_figure_at_the_load_without_a_record(cache_home):
    seconds, source = compiled.compile_estimate("key", load=2.0)
    assert seconds == 2 * compiled.COLD_COMPILE_SECONDS
    assert source == "cold cache, about 24s to compile at load 2.0/core"


def test_a_recorded_compile_with_its_cache_is_a_hit(cache_home):
    compiled.record_compile_times("key")
    compiled._note_compile(20.0)
    compiled._note_compile(5.0)  # the last, smaller batch's graph: the run's compiles summed
    records = json.loads((cache_home / "compile_seconds.json").read_text())
    assert records["key"]["seconds"] == 25.0
    assert records["key"]["warm"] is False  # no kernels of this key were there before
    # The kernels are in the cache now: the next compile is a warm one, the known figure.
    (cache_home / "inductor").mkdir(parents=True)
    seconds, source = compiled.compile_estimate("key", load=2.0)
    assert seconds == 2 * compiled.WARM_COMPILE_SECONDS
    assert source == "cache hit, about 3s to compile"
    # A warm compile measured: its own time is the estimate from then on.
    compiled.record_compile_times("key")
    compiled._note_compile(4.0)
    assert compiled.compile_estimate("key", load=2.0)[0] == 4.0
    # Another shape, or the cache emptied, is cold again.
    assert compiled.compile_estimate("other", load=1.0)[0] == compiled.COLD_COMPILE_SECONDS
    (cache_home / "inductor").rmdir()
    assert compiled.compile_estimate("key", load=1.0)[0] == compiled.COLD_COMPILE_SECONDS


def test_no_cuda_runtime_warning_is_silenced_at_its_source_on_a_cpu_run(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logger = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(logger, "filters", [])
    compiled.quiet_cuda_home_warning()
    compiled.quiet_cuda_home_warning()  # once
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


def _decide(loss, device="cpu", step=0.002, steps=2200, estimate=12.0, monkeypatch=None):
    run = SimpleNamespace(config={"latent_dim": 3})
    setup = SimpleNamespace(loss=loss, training_data=(torch.zeros(100, 4),))
    args = argparse.Namespace(
        batch_size=32, elbo="trace", num_particles=1, device=device, num_epochs=1
    )
    if monkeypatch is not None:
        monkeypatch.setattr(compiled, "compile_estimate", lambda key: (estimate, "known"))
    return vae.decide_compile(run, setup, args, steps, lambda: step)  # type: ignore[arg-type]


def test_the_vae_decides_from_the_timed_step(monkeypatch):
    assert _decide(Trace_ELBO(), monkeypatch=monkeypatch) == (
        False,
        "2200 steps at 2.0 ms would save about 1.3s, less than the 12s to compile; known",
    )
    assert _decide(Trace_ELBO(), step=0.011, steps=7820, monkeypatch=monkeypatch)[0]


def test_what_cannot_compile_is_eager_without_timing(monkeypatch):
    def untimed():
        raise AssertionError("timed")

    run = SimpleNamespace(config={})
    setup = SimpleNamespace(loss=RenyiELBO(alpha=0), training_data=(torch.zeros(1, 1),))
    args = argparse.Namespace(device="cpu")
    assert vae.decide_compile(run, setup, args, 10**9, untimed) == (  # type: ignore[arg-type]
        False,
        "RenyiELBO runs eager",
    )


def test_train_saves_auto_s_decision_and_a_resume_keeps_it(
    cache_home, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    code, stdout, err = call(train_script, *TINY, "--out-dir", str(out), capsys=capsys)
    assert code == 0, err
    first = stdout.splitlines()[0]
    assert "; compile: off (auto: " in first and "would save about 0.0s" in first
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["compile"] is False
    code, stdout, err = call(train_script, "--resume", str(out), "--num-epochs", "3", capsys=capsys)
    assert code == 0, err
    assert "compile: off (the run's own)" in stdout.splitlines()[0]


def test_choose_speed_saves_a_forced_compile_as_on(monkeypatch):
    monkeypatch.setattr(compiled, "_record", {"key": None, "seconds": 0.0, "warm": False})
    monkeypatch.setattr(vae, "compile_key", lambda *a: "key")
    args = argparse.Namespace(num_threads=1, compile="on")
    line = threads.choose_speed(vae, None, None, args, threads_given=True)  # type: ignore[arg-type]
    assert args.compile is True
    assert line == "threads: 1 (--num-threads); compile: on (--compile on)"
    assert compiled._record["key"] == "key"  # its compile times noted for a later auto
