"""Fuzzing scripts/train.py's command line (issue 13): argv lists built from the parser's real
flags, with valid and invalid values (negative, zero, huge, NaN, subnormal, unknown names,
clashing combinations), run in this process through the script's ``run(argv)``.

``pv.fit`` is replaced by a stand-in that raises :class:`ReachedFit`, so no training runs. Each
case must either reach fit, and then only when every value is valid by the rules below, or exit
2 with exactly one line on stderr, no traceback, nothing on stdout, and nothing written."""

import argparse
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scripts_in_process import load_script

import pyro_vae as pv
from pyro_vae.jobs import cli
from pyro_vae.jobs import threads as speed_probe

MAX_EXAMPLES = 600  # ~20 s on a shared 2-core machine


train_script = load_script("train")


def _real_actions() -> dict[str, argparse.Action]:
    """The parser's own actions, caught as train.py builds its parser."""
    caught = []
    parse = cli.ArgumentParser.parse_args

    def catching(self, args=None, namespace=None):
        caught.append(self)
        return parse(self, args, namespace)

    cli.ArgumentParser.parse_args = catching
    try:
        train_script.parse_args([])
    finally:
        cli.ArgumentParser.parse_args = parse
    (parser,) = caught
    return {a.option_strings[-1]: a for a in parser._actions if a.option_strings}


ACTIONS = _real_actions()
# --out-dir is the test's own (a fresh directory per case); --help exits 0 by design.
FUZZED = sorted(set(ACTIONS) - {"--out-dir", "--help"})


# The flags of --model m2 and cvae. The fuzzer drives the VAE's job (--model vae, or an invalid
# name): there, each of these must be refused. The other models' command lines are checked in
# tests/jobs/test_m2_job.py and tests/jobs/test_cvae_job.py.
JOB_FLAGS = {
    action.option_strings[-1]
    for action in ACTIONS.values()
    if any(
        action.option_strings[-1] in job.OWN_FLAGS
        for kind, job in train_script.JOBS.items()
        if kind != "vae"
    )
} | {
    # The flags of a --dataset given as a path: refused with digits, the dataset fuzzed
    # (tests/jobs/test_own_data.py checks them with files of its own).
    "--test-dataset",
    "--image-size",
    "--num-workers",
}


# Training rows of digits, the dataset fuzzed.
DIGITS_TRAIN = 1437


class ReachedFit(Exception):
    """Raised by the stand-in for pv.fit: the arguments got through to training."""


# Every test here runs the scripts, in float32 (conftest.py).
pytestmark = pytest.mark.usefixtures("float32")


# ------------------------------------------------------------------ values, and whether valid

TINY, HUGE = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
FLOAT_TEXTS = st.one_of(
    st.sampled_from(
        ["0", "-1", "nan", "inf", "-inf", "1e-320", "1e-39", "1e39", "1e-3", "0.5", "2", "x", ""]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
INT_TEXTS = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "3", "1.5", "nan", "x", "", str(2**32), str(2**64)]),
    st.integers(-5, 2**33).map(str),
)
# Flags whose value sizes memory before fit: the network widths, the number of components and
# flow layers, and torch's thread pool. Huge values of these make the script allocate until the
# kernel kills it (--latent-dim 2**33) or libgomp aborts (--num-threads 2**31 - 1): an open
# problem reported with issue 13, so they are fuzzed with small values and their refusals here.
SIZED = {"latent_dim", "hidden_dims", "num_components", "flow_depth", "num_threads"}
SMALL_INT_TEXTS = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "3", "1.5", "nan", "x", ""]),
    st.integers(-5, 12).map(str),
)


def _is_int(text: str, low: int, high: float = math.inf) -> bool:
    try:
        value = int(text)
    except ValueError:
        return False
    return low <= value <= high


def _is_float(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and TINY <= value <= HUGE


def _valid_value(action: argparse.Action, text: str) -> bool:
    """Whether train.py must accept ``text`` for ``action`` on its own, by the documented rules
    (written out here, not read off cli.py, so that a broken type is caught)."""
    if action.option_strings[-1] in JOB_FLAGS:
        return True  # a value of its own may be fine; the flag is refused by the combination
    kind = action.type
    if kind is cli.dataset:
        return text == "digits"  # "cifar" names no dataset, file or folder; "" nothing
    if action.option_strings[-1] == "--val-size":
        return _is_int(text, 0, DIGITS_TRAIN - 1)  # some rows must be left to train on
    if action.choices is not None:
        return text in action.choices
    kind = action.type
    if kind is cli.positive_int:
        return _is_int(text, 1)
    if kind is cli.non_negative_int:
        return _is_int(text, 0)
    if kind is cli.seed:
        return _is_int(text, 0, 2**32 - 1)
    if kind is cli.num_threads:
        return _is_int(text, 1, len(os.sched_getaffinity(0)))
    if kind is cli.positive_float:
        return _is_float(text)
    if kind is cli.likelihood_scale:
        return text in ("learned", "learned-per-feature") or _is_float(text)
    if kind is cli.widths:
        return all(_is_int(part, 1) for part in text.split(","))
    if kind is cli.device:
        return text in ("auto", "cpu") or (text.startswith("cuda") and torch.cuda.is_available())
    if kind is Path:
        return True  # digits, the only dataset fuzzed, reads no files: --data-dir goes unused
    raise AssertionError(f"no rule for {action.option_strings}: add one")


@st.composite
def values_for(draw, action: argparse.Action) -> str:
    if action.dest == "model":
        return draw(st.sampled_from(["vae", "", "x"]))  # see JOB_FLAGS
    if action.option_strings[-1] in JOB_FLAGS:  # any value: the flag itself is refused
        return draw(st.one_of(INT_TEXTS, FLOAT_TEXTS))
    if action.dest == "dataset":
        # Only digits is bundled: the others read files (Fashion-MNIST's are installed here, and
        # loading them would take seconds a case) or download them; test_data.py covers those.
        return draw(st.sampled_from(["digits", "cifar", ""]))
    if action.choices is not None:
        return draw(st.one_of(st.sampled_from(list(action.choices)), st.sampled_from(["", "x"])))
    kind = action.type
    integers = SMALL_INT_TEXTS if action.dest in SIZED else INT_TEXTS
    if kind in (cli.positive_int, cli.non_negative_int, cli.seed, cli.num_threads):
        return draw(integers)
    if kind is cli.likelihood_scale:
        return draw(st.one_of(FLOAT_TEXTS, st.sampled_from(["learned", "learned-per-feature"])))
    if kind is cli.positive_float:
        return draw(FLOAT_TEXTS)
    if kind is cli.widths:
        return draw(
            st.one_of(
                st.lists(integers, min_size=1, max_size=3).map(",".join),
                st.sampled_from(["8", "16,8", "8,", ",", "0"]),
            )
        )
    if kind is cli.device:
        return draw(st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "bogus", "meta", ""]))
    if kind is Path:
        return draw(st.sampled_from(["/nonexistent/pyro_vae_fuzz", ""]))
    raise AssertionError(f"no values for {action.option_strings}: add them")


@st.composite
def command_lines(draw) -> tuple[list[str], bool, dict[str, str]]:
    """(argv, whether every flag and value is valid on its own, the flags given)."""
    argv, valid, given = [], True, {}
    # Small models keep the cases that reach fit quick; the fuzzer may override any of these.
    for flag in draw(st.lists(st.sampled_from(FUZZED), max_size=5, unique=True)):
        action = ACTIONS[flag]
        if action.nargs == 0:  # a switch such as --overwrite
            argv.append(flag)
            given[flag] = ""
            continue
        text = draw(values_for(action))
        argv += [flag, text]
        given[flag] = text
        valid = valid and _valid_value(action, text)
    if draw(st.integers(0, 9)) == 0:  # an unknown name, or an abbreviation of a real one
        argv.append(draw(st.sampled_from(["--bogus", "--no-prog", "--learning", "-x", "extra"])))
        valid = False
    return argv, valid, given


def _combination_is_valid(given: dict[str, str]) -> bool:
    """The rules across flags that train.py documents."""
    if "--resume" in given:
        return False  # --out-dir is always given too, and a resume cannot change it
    if JOB_FLAGS & set(given):
        return False  # the flags of --model m2 or cvae, given to the VAE
    # For the rules below, the value a flag left out takes.
    prior = given.get("--prior", "standard-normal")
    decoder = given.get("--decoder", "deterministic")
    network = given.get("--network", "mlp")
    encoder = given.get("--encoder", "diagonal")
    if "--num-components" in given and prior not in ("mixture", "vamp"):
        return False
    if "--prior-scale" in given and decoder != "bayesian":
        return False
    if given.get("--elbo") == "iwae" and decoder == "bayesian":
        return False
    if network == "conv" and ("--hidden-dims" in given or decoder == "bayesian"):
        return False
    # A VampPrior's pseudo-inputs need posteriors with a density of their own.
    return not (prior == "vamp" and encoder in ("iaf", "delta"))


# ------------------------------------------------------------------ the property


def _fake_fit(*args, **kwargs):
    raise ReachedFit(kwargs)


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=command_lines())
def test_train_script_reaches_fit_only_with_valid_arguments_else_one_line_and_exit_2(
    case, monkeypatch, capsys
):
    argv, values_valid, given_flags = case
    monkeypatch.setattr(pv, "fit", _fake_fit)
    # The speed probe (jobs/threads.py: the thread count, --compile auto) trains a copy of the
    # model for a few steps before the run's fit; its timings are stood in for, so that the
    # run's fit is the first to train and the arguments alone decide what reaches it. The
    # probe has its own tests (test_threads.py, test_compile_auto.py).
    monkeypatch.setattr(speed_probe, "time_steps", lambda setup, args, count, steps: [1e-3] * steps)
    threads = torch.get_num_threads()  # --num-threads sets it for the whole process
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        try:
            try:
                code = train_script.run([*argv, "--out-dir", str(out)])
            except SystemExit as exit_:  # argparse's refusals
                code = exit_.code
        except ReachedFit as reached:
            code = "fit"
            fit_arguments = reached.args[0]
        finally:
            torch.set_num_threads(threads)
        left = sorted(p.name for p in Path(scratch).iterdir())
    stdout, stderr = capsys.readouterr()
    valid = values_valid and _combination_is_valid(given_flags)
    event("reached fit" if code == "fit" else f"exit {code}")
    if code == "fit":
        assert valid, f"{argv} reached fit"
        if "--learning-rate" in given_flags:
            assert fit_arguments["learning_rate"] == float(given_flags["--learning-rate"])
        # The stand-in stopped the run before its first checkpoint: the script removed the
        # directory it had made, and wrote nothing else.
        assert left == [], left
        return
    assert code == 2, (argv, code, stderr)
    assert not valid, f"{argv} was refused: {stderr}"
    assert stderr.count("\n") == 1 and stderr.startswith("train.py: "), stderr
    assert "Traceback" not in stderr and stdout == "", (stdout, stderr)
    assert left == [], left


def test_the_fuzzer_knows_every_flag_and_the_budget_is_recorded():
    """Every flag of train.py has a rule and values here (a new flag fails this test until it
    gets them), and the README records the number of cases this file runs."""
    for flag in FUZZED:
        action = ACTIONS[flag]
        if action.nargs != 0:
            assert _valid_value(action, "1") in (True, False)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"{MAX_EXAMPLES} random command lines" in readme
