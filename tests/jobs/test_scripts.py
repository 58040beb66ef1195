"""The three scripts, run in this process through their ``run(argv)``: what they write, what
they refuse, and what they say. tests/jobs/test_faults.py keeps the true end-to-end runs (kills,
Ctrl-C, closed pipes) in subprocesses."""

import argparse
import errno
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from scripts_in_process import call, load_script
from test_explain import sections

import pyro_vae as pv
from pyro_vae.jobs import RUN_FILES, load_run
from pyro_vae.jobs.run_directory import RunDirectory
from pyro_vae.jobs.runs import RESUME_OVERRIDES, resumed_args

train_script, evaluate_script, explain_script = map(load_script, ("train", "evaluate", "explain"))
# A small digits run: a few seconds.
TINY = ("--num-epochs", "2", "--latent-dim", "3", "--hidden-dims", "16", "--no-progress")


# Every test here runs the scripts, in float32 (conftest.py).
pytestmark = pytest.mark.usefixtures("float32")


def train(*argv: str, capsys) -> tuple[int, str, str]:
    return call(train_script, *argv, capsys=capsys)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny run, shared by the tests that only read it."""
    torch.set_default_dtype(torch.float32)
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert train_script.run([*TINY, "--num-iw-particles", "10", "--out-dir", str(out)]) == 0
    return out


def test_train_writes_checkpoint_metrics_and_figures(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1, 2]
    for key in ("train_elbo", "train_reconstruction", "train_kl", "val_elbo", "val_kl"):
        assert all(isinstance(row[key], float) for row in metrics), key
    # No test metric before the end: the epochs are scored on the validation set.
    assert not [key for row in metrics for key in row if key.startswith("test_")]
    assert (tiny_run / "metrics.csv").read_text().startswith("epoch,train_loss,")
    for figure in ("reconstructions", "samples", "latent_space", "loss_curves"):
        assert (tiny_run / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    raw = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    assert raw["args"]["latent_dim"] == 3 and raw["epoch"] == 2
    final = json.loads((tiny_run / "final_metrics.json").read_text())
    assert final["test_log_likelihood"] >= final["test_elbo"] - 1.0
    # The time reported covers the final evaluation too, not only training.
    assert final["total_seconds"] > final["train_seconds"] > 0
    # Nothing half-written is left behind.
    assert not [p.name for p in tiny_run.iterdir() if p.name.startswith(".") and "." in p.name[1:]
                and p.name != ".pyro_vae.lock"]  # fmt: skip


def test_load_run_rebuilds_the_test_set_the_run_scored_and_its_elbo(tiny_run):
    run = load_run(tiny_run)
    final = json.loads((tiny_run / "final_metrics.json").read_text())
    assert run.checkpoint["evaluation_digest"] == pv.jobs.runs.digest(run.x_test)
    assert torch.equal(run.x_test, run.x_test.round())  # binarized, as the likelihood needs
    # The run scored one draw of z per example; ours averages 20. Their difference is Monte
    # Carlo noise only: its standard error comes from two independent one-draw estimates.
    ours = pv.elbo_terms(run.model, run.x_test, num_particles=20, num_data=1437).elbo.mean()
    a, b = (pv.elbo_terms(run.model, run.x_test, num_data=1437).elbo for _ in range(2))
    se = math.sqrt(((a - b) ** 2).mean().item() / 2 / len(a))
    assert abs(final["test_elbo"] - ours.item()) < 4 * se + 1e-4


def test_load_run_refuses_a_test_set_that_is_not_the_one_scored(tiny_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    payload = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    payload["evaluation_digest"] = "0" * 64  # as if the data files had changed since
    torch.save(payload, copy / "checkpoint.pt")
    with pytest.raises(ValueError, match="is not the one this run scored"):
        load_run(copy)
    del payload["evaluation_digest"]  # a run from before the digest was recorded
    torch.save(payload, copy / "checkpoint.pt")
    with pytest.raises(ValueError, match="train them again"):
        load_run(copy)


def test_the_evaluation_binarization_is_a_stream_of_its_own(tiny_run):
    """Drawn on the CPU from the seed through a stream of its own: not the training
    generator's first draws, and the same for the same seed."""
    run = load_run(tiny_run)
    again, _, _ = pv.jobs.runs.evaluation_sets(run.model, run.data, seed=0)
    assert torch.equal(again, run.x_test)
    training_stream = pv.binarize(run.data.x_test, torch.Generator().manual_seed(0))
    assert not torch.equal(training_stream, run.x_test)
    other, _, _ = pv.jobs.runs.evaluation_sets(run.model, run.data, seed=1)
    assert not torch.equal(other, run.x_test)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-epochs", "-3"], "--num-epochs: expected a positive integer"),
        (["--latent-dim", "0"], "--latent-dim: expected a positive integer"),
        (["--dataset", "cifar"], "unknown dataset"),
        (["--learning-rate", "nan"], "--learning-rate: expected a finite number > 0"),
        (["--hidden-dims", "400,x"], "--hidden-dims: expected comma-separated"),
        (["--batch-size", "1.5"], "--batch-size: expected a positive integer"),
        (["--prior", "gaussian"], "--prior: invalid choice: 'gaussian'"),
        (["--elbo", "renyi"], "--elbo: invalid choice: 'renyi'"),
        (["--num-components", "5"], "--num-components is for --prior mixture or vamp"),
        (["--likelihood-scale", "wide"], "--likelihood-scale: expected a number > 0, learned"),
        (["--beta", "0"], "--beta: expected a finite number > 0"),
        (["--kl-warmup-epochs", "-1"], "--kl-warmup-epochs: expected an integer >= 0"),
        (["--prior", "vamp", "--encoder", "iaf"], "prior: VampPrior needs posteriors"),
        (["--resume", "anywhere", "--latent-dim", "4"], "--resume continues a run with its own"),
        (["--clip-norm", "-1"], "--clip-norm: expected a finite number > 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every: expected a positive integer"),
        (["--seed", str(2**40)], "--seed: expected an integer from 0 to 2**32 - 1"),
        (["--seed", "-1"], "--seed: expected an integer from 0 to 2**32 - 1"),
        (["--network", "conv", "--hidden-dims", "8"], "--network conv has fixed layers"),
        (["--no-prog"], "unrecognized arguments: --no-prog"),  # no abbreviations
        (["--decoder", "bayesian", "--elbo", "iwae"], "would count the weights' KL N/B"),
        (["--prior-scale", "2"], "--prior-scale is for --decoder bayesian"),
        (["--latent-dim", str(2**33)], "more than this machine's"),
        (["--hidden-dims", f"{2**31},{2**31}"], "more than this machine's"),
        (["--model", "m2", "--hidden-dims", f"{2**31},{2**31}"], "more than this machine's"),
        (["--model", "cvae", "--hidden-dims", f"{2**31},{2**31}"], "more than this machine's"),
        (["--num-threads", "2147483647"], "--num-threads: expected at most the"),
        (["--likelihood", "normal", "--likelihood-scale", "0.1"], None),  # a valid pair
    ],
)
def test_nonsense_arguments_exit_with_one_line_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    if message is None:  # the control: this pair parses, so the refusals above are specific
        parsed = train_script.parse_args([*args, "--out-dir", str(out)])
        assert parsed.likelihood_scale == 0.1
        return
    code, _, err = train(*args, "--out-dir", str(out), capsys=capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_help_shows_a_default_only_where_there_is_one(capsys):
    with pytest.raises(SystemExit):
        train_script.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 128)" in text  # --batch-size


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_cuda_exits_with_one_line(tmp_path, capsys):
    code, _, err = train("--device", "cuda", "--out-dir", str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and "CUDA is not available" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_data_errors_exit_with_one_line_before_writing(tmp_path, capsys):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train-images-idx3-ubyte").write_bytes(b"truncated")
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / "files" / name).write_bytes(b"")
    code, _, err = train(
        *("--dataset", "mnist", "--data-dir", str(tmp_path / "files")),
        *("--out-dir", str(tmp_path / "run")),
        capsys=capsys,
    )
    assert code == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_component_flags_reach_the_model_and_the_checkpoint_rebuilds_it(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = train(
        *("--num-epochs", "2", "--latent-dim", "3"),
        *("--prior", "mixture", "--num-components", "3", "--encoder", "full-covariance"),
        *("--likelihood", "discretized-logistic", "--network", "conv"),
        *("--elbo", "iwae", "--num-particles", "2", "--beta", "0.5"),
        *("--kl-warmup-epochs", "1", "--num-iw-particles", "5"),
        *("--out-dir", str(out), "--no-progress"),
        capsys=capsys,
    )
    assert code == 0, err
    assert "prior mixture, encoder full-covariance, likelihood discretized-logistic" in stdout
    assert "RenyiELBO with 2 particle(s), KL by MC, beta 0.5" in stdout
    raw = torch.load(out / "checkpoint.pt", weights_only=True)
    assert raw["config"]["network"] == "conv" and raw["config"]["hidden_dims"] is None
    assert raw["config"]["num_levels"] == 17
    assert raw["args"]["elbo"] == "iwae" and raw["args"]["num_particles"] == 2
    vae, _ = pv.load_checkpoint(out / "checkpoint.pt")
    assert isinstance(vae.prior, pv.MixtureOfGaussiansPrior) and vae.prior.num_components == 3
    assert isinstance(vae.encoder, pv.FullCovarianceNormalEncoder)
    assert isinstance(vae.encoder.net, pv.ConvNet)  # both sides follow --network
    assert isinstance(vae.likelihood, pv.DiscretizedLogisticLikelihood)
    assert isinstance(vae.decoder, pv.DeconvNet) and vae.beta == 0.5
    # The digits' 17 grey levels are in the rebuilt likelihood's support.
    vae.validate_data(pv.load_dataset("digits").x_test)


def test_bayesian_decoder_runs_end_to_end_and_reports_its_weights(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = train(
        *TINY, "--decoder", "bayesian", "--prior-scale", "0.5", "--num-iw-particles", "5",
        "--out-dir", str(out), capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "weight KL" in stdout and "posterior-mean weights" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(row["val_weight_kl"] > 0 for row in metrics)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["test_log_likelihood_given"] == "posterior-mean decoder weights"
    assert (out / "weight_uncertainty.png").read_bytes()[:4] == b"\x89PNG"
    vae, payload = pv.load_checkpoint(out / "checkpoint.pt")
    assert isinstance(vae.decoder, pv.BayesianMLP) and vae.decoder.prior_scale == 0.5
    assert payload["config"]["prior_scale"] == 0.5


def test_evaluate_reports_every_metric_per_class_and_where_it_came_from(tiny_run, capsys):
    code, stdout, err = call(
        evaluate_script, str(tiny_run), "--num-iw-particles", "20", "--no-progress",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "log p(x) >= " in stdout and "I(x;z)" in stdout
    assert "] KL decomposition" in stdout  # a line per stage, even without progress bars
    report = json.loads((tiny_run / "evaluation.json").read_text())
    assert report["num_examples"] == 360 and report["latent_dim"] == 3
    # The weights scored are the epoch the run kept, best.pt's: the best by validation.
    final = json.loads((tiny_run / "final_metrics.json").read_text())
    assert (report["epoch"], report["step"], report["seed"]) == (final["best_epoch"], 0, 0)
    assert report["selected_by"] == "the best validation ELBO" and report["weights"] == "best.pt"
    assert report["num_iw_particles"] == 20 and report["dataset"] == "digits"
    weights = (tiny_run / "best.pt").read_bytes()
    assert report["checkpoint_sha256"] == hashlib.sha256(weights).hexdigest()
    assert report["test_set_sha256"] == pv.jobs.runs.digest(load_run(tiny_run).x_test)
    assert len(report["kl_per_dimension"]) == 3 and 0 <= report["active_units"] <= 3
    # The identity average KL = I + marginal KL holds for the estimates, and the closed-form
    # KL per dimension sums to the Monte-Carlo average KL within its standard errors.
    assert report["kl_decomposition_average_kl"] == pytest.approx(
        report["kl_decomposition_mutual_information"] + report["kl_decomposition_marginal_kl"]
    )
    gap = sum(report["kl_per_dimension"]) - report["kl_decomposition_average_kl"]
    assert abs(gap) < 4 * report["kl_decomposition_average_kl_se"]
    assert set(report["per_class"]) == {str(d) for d in range(10)}
    assert sum(row["count"] for row in report["per_class"].values()) == 360


@pytest.mark.parametrize("script", ["evaluate", "explain"])
def test_evaluate_and_explain_without_a_run_exit_2_with_one_line(tmp_path, capsys, script):
    module = {"evaluate": evaluate_script, "explain": explain_script}[script]
    code, _, err = call(module, str(tmp_path), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "no checkpoint.pt" in err, err
    code, _, err = call(module, str(tmp_path / "nowhere"), capsys=capsys)
    assert code == 2 and "no such run directory" in err, err


def test_explain_writes_its_report_and_refuses_a_directory_of_other_files(
    tiny_run, tmp_path, capsys
):
    code, _, err = call(explain_script, str(tiny_run), "--num-particles", "300", capsys=capsys)
    assert code == 0, err
    found = sections((tiny_run / "explain" / "report.md").read_text())
    assert sorted(found) == ["1", "2", "3", "4", "5", "6", "7"]  # 7: the inference gaps
    assert all(re.search(r"\d\.\d{3}", body) for body in found.values())
    # Writing again replaces its own report; a directory of someone else's files is refused.
    assert call(explain_script, str(tiny_run), "--num-particles", "300", capsys=capsys)[0] == 0
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    code, _, err = call(explain_script, str(tiny_run), "--out-dir", str(theirs), capsys=capsys)
    assert code == 2 and "holds files that explain.py did not write (notes.txt)" in err
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------ the run directory


def test_a_run_directory_in_use_is_refused_naming_the_process(tmp_path, capsys):
    out = tmp_path / "run"
    with RunDirectory.claim(out, mode="new", files=RUN_FILES):
        for extra in ([], ["--overwrite"]):
            code, _, err = train(*TINY, "--out-dir", str(out), *extra, capsys=capsys)
            assert code == 2 and f"in use by process {os.getpid()}" in err, err
    assert not out.exists()  # a claim that wrote nothing leaves nothing


def test_an_existing_run_needs_resume_overwrite_or_another_out_dir(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*TINY, "--num-iw-particles", "0", "--out-dir", str(out), capsys=capsys)[0] == 0
    (out / "evaluation.json").write_text("{}")  # as scripts/evaluate.py would leave them
    (out / "explain").mkdir()
    (out / "explain" / "report.md").write_text("old")
    (out / ".metrics.json.abc123").write_text("half-written")  # a kill mid-write
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = train(*TINY, "--out-dir", str(out), capsys=capsys)
    assert code == 2 and "already holds a run" in err and "--out-dir" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    code, _, err = train(*TINY, "--num-epochs", "1", "--out-dir", str(out), "--overwrite",
                         "--num-iw-particles", "0", capsys=capsys)  # fmt: skip
    assert code == 0, err
    # Everything of the old run is gone: the new run's files only.
    assert not (out / "evaluation.json").exists() and not (out / "explain").exists()
    assert not (out / ".metrics.json.abc123").exists()
    assert len(json.loads((out / "metrics.json").read_text())) == 1


def test_overwrite_refuses_a_directory_that_holds_no_run(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.json").write_text("their own")
    code, _, err = train(*TINY, "--out-dir", str(theirs), "--overwrite", capsys=capsys)
    assert code == 2 and "holds files that are not a pyro_vae run (metrics.json)" in err, err
    assert [p.name for p in theirs.iterdir()] == ["metrics.json"]
    assert (theirs / "metrics.json").read_text() == "their own"


def test_resume_refusals_name_the_problem(tiny_run, capsys):
    code, _, err = train("--resume", str(tiny_run / "checkpoint.pt"), capsys=capsys)
    assert code == 2 and f"give the run's directory, {tiny_run}, instead" in err, err
    code, _, err = train("--resume", str(tiny_run), "--num-epochs", "1", capsys=capsys)
    assert code == 2 and "has already finished epoch 2; give at least 2" in err, err


def test_a_resume_with_nothing_left_to_train_evaluates_again(tiny_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("checkpoint.pt", "best.pt"):
        (copy / name).write_bytes((tiny_run / name).read_bytes())
    code, stdout, err = train("--resume", str(copy), "--no-progress", capsys=capsys)
    assert code == 0, err
    assert "resuming from the end of epoch 2" in stdout and "epoch   3" not in stdout
    again = json.loads((copy / "final_metrics.json").read_text())
    before = json.loads((tiny_run / "final_metrics.json").read_text())
    assert again["epochs_trained"] == 2 and again["best_epoch"] == before["best_epoch"]


def fail_in_fit(error: BaseException, after_epochs: int = 0):
    """A stand-in for pv.fit that checkpoints ``after_epochs`` epochs, then raises ``error``."""
    real_fit = pv.fit

    def fit(*args, **kwargs):
        if after_epochs:
            real_fit(*args, **{**kwargs, "num_epochs": after_epochs})
        raise error

    return fit


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (KeyboardInterrupt(), 130, "interrupted; no checkpoint was written yet"),
        (pv.TrainingDivergedError("loss is nan at epoch 1, step 1 of 12"), 1, "diverged"),
        (OSError(errno.ENOSPC, "No space left on device"), 1, "No space left on device"),
    ],
    ids=["ctrl-c", "divergence", "disk-full"],
)
def test_a_stop_before_the_first_checkpoint_claims_none(tmp_path, capsys, monkeypatch, error,
                                                        code, message):  # fmt: skip
    monkeypatch.setattr(pv, "fit", fail_in_fit(error))
    out = tmp_path / "run"
    result, _, err = train(*TINY, "--out-dir", str(out), capsys=capsys)
    assert result == code and message in err and err.count("\n") == 1, err
    assert "no checkpoint was written yet" in err and "--resume" not in err
    assert not out.exists()  # it wrote nothing, so it leaves nothing


def test_a_stop_after_a_checkpoint_says_where_it_stands(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pv, "fit", fail_in_fit(KeyboardInterrupt(), after_epochs=1))
    out = tmp_path / "run"
    code, _, err = train(*TINY, "--out-dir", str(out), capsys=capsys)
    assert code == 130
    assert f"checkpoint.pt holds the run at the end of epoch 1; continue with --resume {out}" in err


def test_num_threads_sets_torchs_threads(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    code, _, err = train(*TINY, "--num-epochs", "1", "--num-threads", "1",
                         "--num-iw-particles", "0", "--out-dir", str(tmp_path / "r"),
                         capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert calls == [1]


def test_resumed_arguments_come_from_the_run_except_the_overrides():
    saved = {"num_epochs": 5, "no_progress": False, "checkpoint_every": None, "seed": 3,
             "num_threads": None, "latent_dim": 4}  # fmt: skip
    given = argparse.Namespace(resume=Path("r"), num_epochs=9, no_progress=True,
                               checkpoint_every=None, num_threads=2,
                               given={"--resume", "--num-epochs"})  # fmt: skip
    args = resumed_args(saved, given, {"epoch": 3, "step": 0}, RESUME_OVERRIDES)
    assert (args.num_epochs, args.no_progress, args.seed, args.latent_dim) == (9, False, 3, 4)
    assert args.out_dir == Path("r")


@pytest.mark.parametrize("name", ["checkpoint.pt", "explain", ".pyro_vae.lock"])
def test_a_symbolic_link_in_a_run_directory_is_not_followed(tiny_run, tmp_path, capsys, name):
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    (run_dir / "checkpoint.pt").write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    if name == "checkpoint.pt":
        (outside / name).write_bytes((run_dir / name).read_bytes())
        (run_dir / name).unlink()
    (run_dir / name).symlink_to(outside / name)
    for script, argv in [(train_script, ["--resume", str(run_dir)]),
                         (explain_script, [str(run_dir)])]:  # fmt: skip
        code, _, err = call(script, *argv, capsys=capsys)
        assert code == 2 and "is a symbolic link" in err and name in err, err
    # Nothing was written out there: the pid of a lock, a report, a checkpoint.
    assert [p.name for p in outside.iterdir()] == (
        ["checkpoint.pt"] if name == "checkpoint.pt" else []
    )


def test_metrics_are_never_ahead_of_the_checkpoint_and_a_resume_heals_them(
    tmp_path, capsys, monkeypatch
):
    """A stop between the checkpoint and metrics.json leaves metrics.json behind (never
    ahead); the resume rewrites it from the checkpoint before going on."""
    out = tmp_path / "run"
    real = RunDirectory.write_metrics
    calls = []

    def fails_second_time(self, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, rows)

    monkeypatch.setattr(RunDirectory, "write_metrics", fails_second_time)
    code, _, err = train(*TINY, "--num-iw-particles", "0", "--out-dir", str(out), capsys=capsys)
    assert code == 1 and "No space left on device" in err, err
    assert "checkpoint.pt holds the run at the end of epoch 2" in err
    assert len(json.loads((out / "metrics.json").read_text())) == 1  # behind, not ahead
    monkeypatch.setattr(RunDirectory, "write_metrics", real)
    (out / ".checkpoint.pt.x1y2z3").write_bytes(b"half")  # and a kill mid-write, too
    code, stdout, err = train("--resume", str(out), capsys=capsys)
    assert code == 0, err
    assert "removed .checkpoint.pt.x1y2z3: left by a write that was interrupted" in stdout
    assert len(json.loads((out / "metrics.json").read_text())) == 2
    assert not (out / ".checkpoint.pt.x1y2z3").exists()


def test_an_interrupted_report_is_replaced_and_every_file_it_writes_is_named(tiny_run, capsys):
    """A report stopped half-way leaves figures without report.md, and a temporary file: the
    next explain.py replaces them instead of refusing its own directory for good."""
    out = tiny_run / "explain"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    (out / "point_cloud.png").write_bytes(b"old")
    (out / ".traversal.png.abc123").write_bytes(b"half")
    code, _, err = call(explain_script, str(tiny_run), "--num-particles", "300", capsys=capsys)
    assert code == 0, err
    written = {p.name for p in out.iterdir()}
    assert ".traversal.png.abc123" not in written and "report.md" in written
    from pyro_vae.explain import OUTPUT_FILES

    assert written <= set(OUTPUT_FILES), written - set(OUTPUT_FILES)


@pytest.mark.slow
def test_compile_trains_the_same_run_within_float_rounding(tmp_path, capsys, monkeypatch):
    """--compile traces and compiles the step (pyro_vae/infer/compiled.py); the epoch losses equal
    the eager run's up to float rounding, with the same noise."""
    real_fit, asked = pv.fit, []

    def fit(*args, **kwargs):
        asked.append(kwargs.get("compile"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(pv, "fit", fit)
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        out = tmp_path / name
        code, _, err = train(*TINY, "--num-iw-particles", "0", "--out-dir", str(out), *extra,
                             capsys=capsys)  # fmt: skip
        assert code == 0, err
        runs[name] = json.loads((out / "metrics.json").read_text())
        assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["compile"] == (
            name == "compiled"
        )
    assert asked == [False, True]
    for eager, compiled in zip(runs["eager"], runs["compiled"], strict=True):
        assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
        assert compiled["val_elbo"] == pytest.approx(eager["val_elbo"], rel=1e-3)
