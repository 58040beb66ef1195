"""fit says a line per epoch through logging, and a long estimate a line at least every 10 s
where no bar shows (issue 24, items 6 and 3); the scripts show the progress and the warnings,
not fit's epoch lines (they print their own rows)."""

from __future__ import annotations

import ast
import itertools
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import tqdm.auto
from conftest import binary_data

import pyro_vae as pv
from pyro_vae.infer import estimators
from pyro_vae.infer import fit as fit_module
from pyro_vae.infer.gaps import inference_gaps
from pyro_vae.jobs import cli


def test_fit_logs_a_line_per_epoch_with_its_loss_at_info(caplog):
    caplog.set_level(logging.INFO, logger="pyro_vae.infer.fit")
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    history = pv.fit(vae, binary_data(24, 12), num_epochs=3, batch_size=8, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "pyro_vae.infer.fit"]
    assert len(lines) == 3
    for epoch, (line, loss) in enumerate(zip(lines, history.loss, strict=True), start=1):
        assert line.startswith(f"epoch {epoch}/3: loss {loss:.4f} nats per example, ")
    assert all(r.levelno == logging.INFO for r in caplog.records)


class FakeClock:
    """time.monotonic for the estimators: each read is ``step`` seconds after the last."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize("seconds_per_chunk", [3.0, 0.4, 9.0])
def test_log_likelihood_without_a_bar_says_where_it_is_at_least_every_10_seconds(
    caplog, monkeypatch, seconds_per_chunk
):
    clock = FakeClock(seconds_per_chunk)
    monkeypatch.setattr(estimators, "_clock", clock)
    caplog.set_level(logging.INFO, logger="pyro_vae.progress")
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    # 20 examples per pass, one particle each: 60 passes.
    pv.log_likelihood(vae, binary_data(20, 12), num_particles=60, chunk_size=20, progress=False)
    assert_a_line_at_least_every_10_seconds(caplog, clock, "log p(x): ")


def assert_a_line_at_least_every_10_seconds(caplog, clock: FakeClock, prefix: str) -> None:
    """The progress lines all start with ``prefix``, no two (nor the start and the first, nor
    the last and the end) more than 10 s apart on ``clock``, and not one per chunk."""
    lines = [r.getMessage() for r in caplog.records if r.name == "pyro_vae.progress"]
    assert lines and all(line.startswith(prefix) for line in lines)
    # The clock's reading at each line, from its "Ns" (rounded to the second), and the end.
    said = [float(re.search(r", (\d+)s, about", line).group(1)) for line in lines]
    total = clock.now - clock.step  # the first read started the clock
    times = [0.0, *said, total]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) <= estimators.PROGRESS_SECONDS + 0.5, (gaps, lines)
    # Not one per chunk: a line about every 10 s.
    assert len(lines) <= total / (estimators.PROGRESS_SECONDS - clock.step) + 1


@pytest.mark.parametrize("seconds_per_chunk", [3.0, 0.4, 9.0])
def test_the_cvaes_log_likelihood_without_a_bar_says_where_it_is_too(
    caplog, monkeypatch, seconds_per_chunk
):
    """The CVAE's final score, log p(missing | given), logs its chunks as log p(x) does."""
    clock = FakeClock(seconds_per_chunk)
    monkeypatch.setattr(estimators, "_clock", clock)
    caplog.set_level(logging.INFO, logger="pyro_vae.progress")
    cvae = pv.ConditionalVAE(12, 4, 2, hidden_dims=(8,))
    # 20 examples per pass, one particle each: 60 passes.
    x, c = binary_data(20, 12), torch.rand(20, 4)
    pv.conditional_log_likelihood(cvae, x, c, num_particles=60, chunk_size=20, progress=False)
    assert_a_line_at_least_every_10_seconds(caplog, clock, "log p(x|c): ")


def test_with_a_bar_there_are_no_progress_lines(caplog, monkeypatch):
    monkeypatch.setattr(estimators, "_clock", FakeClock(5.0))
    caplog.set_level(logging.INFO, logger="pyro_vae.progress")
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    pv.log_likelihood(vae, binary_data(20, 12), num_particles=30, chunk_size=20, progress=True)
    assert not [r for r in caplog.records if r.name == "pyro_vae.progress"]


@pytest.fixture
def package_logging() -> Iterator[None]:
    """configure_logging changes the process's loggers: put them back."""
    loggers = [logging.getLogger(n) for n in ("pyro_vae", "pyro_vae.progress")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers, lg.propagate = handlers, propagate
        lg.setLevel(level)


def test_the_scripts_show_progress_and_warnings_but_not_fits_epoch_lines(package_logging, capsys):
    cli.configure_logging("train.py")
    cli.configure_logging("train.py")  # twice: still one line each
    logging.getLogger("pyro_vae.progress").info("log p(x): %d of %d", 3, 9)
    logging.getLogger("pyro_vae.infer.fit").info("epoch 1/2: loss 1.0")
    logging.getLogger("pyro_vae.data").warning("a warning")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["log p(x): 3 of 9"]
    assert err.splitlines() == ["train.py: warning: a warning"]


def test_a_script_run_prints_the_progress_of_its_final_evaluation(
    package_logging, capsys, monkeypatch
):
    """Through the configured loggers: a log p(x) whose bar does not show prints its lines."""
    cli.configure_logging("train.py")
    monkeypatch.setattr(estimators, "_clock", FakeClock(4.0))
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    pv.log_likelihood(vae, torch.ones(4, 12), num_particles=10, chunk_size=4, progress=None)
    out = capsys.readouterr().out
    assert re.search(r"^log p\(x\): \d+ of 10 \(\d+%\), \d+s, about \d+s left$", out, re.M), out


def test_the_scripts_wall_time_counts_the_process_from_its_start():
    """cli.wall_seconds, the scripts' "done in": the seconds before pyro_vae was imported
    count too (here a 1.5 s sleep before the import)."""
    code = "import time; time.sleep(1.5); from pyro_vae.jobs import cli; print(cli.wall_seconds())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 1.5 <= float(done.stdout) < 60


def test_kl_decomposition_without_a_bar_says_where_it_is_too(caplog, monkeypatch):
    """I(x; z) of evaluate.py is N² work: its passes log as log p(x)'s chunks do."""
    monkeypatch.setattr(estimators, "_clock", FakeClock(4.0))
    caplog.set_level(logging.INFO, logger="pyro_vae.progress")
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    pv.kl_decomposition(vae, binary_data(40, 12), num_particles=2, chunk_size=8, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "pyro_vae.progress"]
    assert lines and all(line.startswith("I(x; z): ") for line in lines)


def test_every_progress_bar_is_tqdm_auto_so_that_it_renders_in_a_notebook():
    """fit's bar and the estimators' (issue 24, item 6): tqdm.auto picks the notebook widget
    in Jupyter and the plain bar elsewhere; tqdm's own module prints raw text in a notebook."""
    package = Path(pv.__file__).parent
    plain = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tqdm"):
                if node.module != "tqdm.auto":
                    plain.append(f"{path.relative_to(package)}: from {node.module} import")
            elif isinstance(node, ast.Import):
                plain += [
                    f"{path.relative_to(package)}: import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("tqdm") and alias.name != "tqdm.auto"
                ]
    assert not plain
    assert fit_module.tqdm is tqdm.auto.tqdm


def test_the_inference_gaps_without_a_bar_say_where_they_are_at_least_every_10_seconds(
    caplog, monkeypatch
):
    """Both long parts of inference_gaps, the SVI steps and the bound's passes, log a line at
    least every 10 s where no bar shows (each read of the clock 3 s after the last)."""
    clock = FakeClock(3.0)
    monkeypatch.setattr(estimators, "_clock", clock)
    caplog.set_level(logging.INFO, logger="pyro_vae.progress")
    vae = pv.VAE(12, 2, hidden_dims=(8,))
    x = binary_data(20, 12)
    inference_gaps(vae, x, num_steps=40, num_particles=2, iw_particles=40, chunk_size=20,
                   progress=False)  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "pyro_vae.progress"]
    for prefix, total in (("q* by SVI: ", 40), ("log p(x): ", 40)):
        mine = [line for line in lines if line.startswith(prefix)]
        done = [int(re.match(rf"{re.escape(prefix)}(\d+) of {total} ", line)[1]) for line in mine]
        # A pass every 3 s: no more than 3 passes between two lines, from the first to the last.
        steps = [0, *done, total]
        assert mine and max(b - a for a, b in itertools.pairwise(steps)) <= 4, (prefix, lines)
