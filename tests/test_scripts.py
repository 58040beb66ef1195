"""scripts/train.py end to end, and its refusal of nonsense arguments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyro_vae as pv

TRAIN = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
sys.path.insert(0, str(TRAIN.parent))
from train import parse_args  # noqa: E402  (scripts/ is not a package)


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=300
    )


def test_train_script_writes_checkpoint_metrics_and_figures(tmp_path):
    out = tmp_path / "run"
    result = run_train(
        "--num-epochs",
        "2",
        "--latent-dim",
        "3",
        "--hidden-dims",
        "16,8",
        "--num-iw-samples",
        "10",
        "--out-dir",
        str(out),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "epoch   2/2" in result.stdout and "test log p(x) >=" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1, 2]
    for key in (
        "train_elbo",
        "train_reconstruction",
        "train_kl",
        "test_elbo",
        "test_reconstruction",
        "test_kl",
    ):
        assert all(isinstance(row[key], float) for row in metrics), key
    assert (out / "metrics.csv").read_text().startswith("epoch,train_loss,")
    for figure in ("reconstructions", "samples", "latent_space", "loss_curves"):
        assert (out / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure

    raw = torch.load(out / "checkpoint.pt", weights_only=True)
    assert raw["args"]["latent_dim"] == 3 and raw["epoch"] == 2
    vae, _ = pv.load_checkpoint(out / "checkpoint.pt")
    assert vae.latent_dim == 3 and vae.data_dim == 64
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["test_log_likelihood"] >= final["test_elbo"] - 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-epochs", "-3"], "--num-epochs: expected a positive integer"),
        (["--latent-dim", "0"], "--latent-dim: expected a positive integer"),
        (["--dataset", "cifar"], "--dataset: invalid choice: 'cifar'"),
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
        (["--likelihood", "normal", "--likelihood-scale", "0.1"], None),  # a valid pair
    ],
)
def test_nonsense_arguments_exit_with_one_line_and_write_nothing(tmp_path, args, message):
    if message is None:  # the control: this pair parses, so the refusals above are specific
        parsed = parse_args([*args, "--out-dir", str(tmp_path)])
        assert parsed.likelihood_scale == 0.1
        return
    out = tmp_path / "run"
    result = run_train(*args, "--out-dir", str(out))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_cuda_exits_with_one_line(tmp_path):
    result = run_train("--device", "cuda", "--out-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "CUDA is not available" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_data_errors_exit_with_one_line_before_writing(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train-images-idx3-ubyte").write_bytes(b"truncated")
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / "files" / name).write_bytes(b"")
    result = run_train(
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path / "files"),
        "--out-dir",
        str(tmp_path / "run"),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_component_flags_reach_the_model_and_the_checkpoint_rebuilds_it(tmp_path):
    out = tmp_path / "run"
    result = run_train(
        *("--num-epochs", "2", "--latent-dim", "3", "--hidden-dims", "16"),
        *("--prior", "mixture", "--num-components", "3", "--encoder", "full-covariance"),
        *("--likelihood", "discretized-logistic", "--decoder", "conv"),
        *("--elbo", "iwae", "--num-particles", "2", "--beta", "0.5"),
        *("--kl-warmup-epochs", "1", "--num-iw-samples", "5"),
        *("--out-dir", str(out), "--no-progress"),
    )
    assert result.returncode == 0, result.stderr
    assert (
        "prior mixture, encoder full-covariance, likelihood discretized-logistic, decoder conv"
        in (result.stdout)
    )
    assert "RenyiELBO with 2 particle(s), KL by Monte Carlo, beta 0.5 (warm-up 1 epochs)" in (
        result.stdout
    )
    raw = torch.load(out / "checkpoint.pt", weights_only=True)
    assert raw["config"]["prior"] == "mixture" and raw["config"]["num_bins"] == 17
    assert raw["args"]["elbo"] == "iwae" and raw["args"]["num_particles"] == 2
    vae, _ = pv.load_checkpoint(out / "checkpoint.pt")
    assert isinstance(vae.prior, pv.MixtureOfGaussiansPrior) and vae.prior.num_components == 3
    assert isinstance(vae.encoder, pv.FullCovarianceNormalEncoder)
    assert isinstance(vae.likelihood, pv.DiscretizedLogisticLikelihood)
    assert isinstance(vae.decoder, pv.DeconvNet) and vae.beta == 0.5
    # The digits' 17 grey levels are in the rebuilt likelihood's support.
    data = pv.load_dataset("digits")
    vae.validate_data(data.x_test.to(torch.get_default_dtype()))


EVALUATE = TRAIN.parent / "evaluate.py"


def test_evaluate_script_reports_every_metric_per_class(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_train(
        *("--num-epochs", "2", "--latent-dim", "3", "--hidden-dims", "16"),
        *("--num-iw-samples", "0", "--out-dir", str(run_dir), "--no-progress"),
    )
    assert trained.returncode == 0, trained.stderr
    result = subprocess.run(
        [sys.executable, str(EVALUATE), str(run_dir), "--num-iw-samples", "20", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "log p(x) >= " in result.stdout and "I(x;z)" in result.stdout
    report = json.loads((run_dir / "evaluation.json").read_text())
    assert report["num_examples"] == 360 and report["latent_dim"] == 3
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
    assert report["epoch"] == 2


def test_evaluate_script_without_a_run_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EVALUATE), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no checkpoint.pt" in result.stderr


def test_bayesian_decoder_runs_end_to_end_and_reports_its_weights(tmp_path):
    out = tmp_path / "run"
    result = run_train(
        "--decoder", "bayesian-mlp", "--prior-scale", "0.5", "--num-epochs", "2",
        "--latent-dim", "3", "--hidden-dims", "16", "--num-iw-samples", "5",
        "--out-dir", str(out), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "weight KL" in result.stdout and "given the posterior-mean weights" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    # 3·16 + 16 + 16·64 + 64 weights, each with a KL > 0
    assert all(row["test_weight_kl"] > 0 for row in metrics)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["test_log_likelihood_given"] == "posterior-mean decoder weights"
    assert (out / "weight_uncertainty.png").read_bytes()[:4] == b"\x89PNG"
    vae, payload = pv.load_checkpoint(out / "checkpoint.pt")
    assert isinstance(vae.decoder, pv.BayesianMLP) and vae.decoder.prior_scale == 0.5
    assert payload["config"]["prior_scale"] == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--decoder", "bayesian-mlp", "--elbo", "iwae"], "would count the weights' KL N/B"),
        (["--prior-scale", "2"], "--prior-scale is for --decoder bayesian-mlp"),
    ],
    ids=["iwae-with-bayesian-decoder", "prior-scale-without-it"],
)
def test_refused_bayesian_decoder_pairs_say_why(tmp_path, args, message):
    result = run_train(*args, "--out-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
