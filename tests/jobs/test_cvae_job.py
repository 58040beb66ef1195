"""scripts/train.py --model cvae (pyro_vae/jobs/cvae.py), run in this process: what a run
writes, that the test scores are those of the run's own pixels, that a resumed run ends
bit-identically, and what is refused before anything is written."""

import json
import math
from pathlib import Path

import pytest
import torch
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.jobs import cvae as cvae_job
from pyro_vae.models.cvae import ConditionalVAE
from pyro_vae.models.cvae_estimators import conditional_elbo_terms
from pyro_vae.models.masks import quadrant_mask, split_by_mask

train_script = load_script("train")
# A small digits run: a few seconds.
TINY = ("--model", "cvae", "--latent-dim", "2", "--hidden-dims", "16", "--no-progress")
# For the refusals: should one slip through, the run it starts is over in seconds.
SHORT = ("--num-epochs", "1", "--num-iw-particles", "0", "--no-progress")
PNG = b"\x89PNG\r\n\x1a\n"


# Every test here runs the scripts, in float32 (conftest.py).
pytestmark = pytest.mark.usefixtures("float32")


def train(*argv: str, capsys) -> tuple[int, str, str]:
    return call(train_script, *argv, capsys=capsys)


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory) -> Path:
    """One finished two-epoch run, shared by the tests that only read it."""
    torch.set_default_dtype(torch.float32)
    out = tmp_path_factory.mktemp("cvae") / "run"
    argv = [*TINY, "--num-epochs", "2", "--given-quadrants", "1", "--num-iw-particles", "10"]
    assert train_script.run([*argv, "--out-dir", str(out)]) == 0
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def without_seconds(value):
    """Metrics without the wall times, which no two runs share."""
    if isinstance(value, list):
        return [without_seconds(row) for row in value]
    return {k: v for k, v in value.items() if not k.endswith("seconds")}


def test_a_run_leaves_checkpoints_metrics_and_a_figure(cvae_run):
    cvae, payload = pv.load_checkpoint(cvae_run / "checkpoint.pt")
    assert isinstance(cvae, ConditionalVAE) and payload["epoch"] == 2
    # 1 given quadrant of an 8x8 digit: 16 given pixels, 48 to predict.
    assert payload["config"] == {"model": "cvae", "data_dim": 48, "condition_dim": 16,
                                 "latent_dim": 2, "beta": 1.0, "hidden_dims": [16]}  # fmt: skip
    assert payload["args"]["given_quadrants"] == 1
    baseline, _ = pv.load_checkpoint(cvae_run / "baseline.pt")
    assert (baseline.data_dim, baseline.condition_dim) == (48, 16)
    metrics = json.loads((cvae_run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1, 2]
    for row in metrics:
        for prefix in ("train", "val"):
            # The ELBO is its two terms' difference, and the KL estimate of each image is
            # an average of log-ratios: finite, and so is the mean.
            elbo = row[f"{prefix}_reconstruction"] - row[f"{prefix}_kl"]
            assert row[f"{prefix}_elbo"] == pytest.approx(elbo, rel=1e-5)
    assert (cvae_run / "metrics.csv").read_text().startswith("epoch,train_loss,")
    assert (cvae_run / "completions.png").read_bytes()[:8] == PNG


def test_the_test_scores_are_those_of_the_runs_own_missing_pixels(cvae_run):
    """The baseline's test NLL, recomputed by hand from its saved weights on the missing
    pixels of the test set (binarized once from the seed) given the grayscale given pixels,
    is the one the run reports; exact, as the baseline has no latent."""
    final = json.loads((cvae_run / "final_metrics.json").read_text())
    baseline, _ = pv.load_checkpoint(cvae_run / "baseline.pt")
    data = pv.load_dataset("digits")
    mask = quadrant_mask(data.image_shape, 1)
    cvae, _ = pv.load_checkpoint(cvae_run / "checkpoint.pt")
    x_binary, _, _ = pv.jobs.runs.evaluation_sets(cvae, data, seed=0)
    x, _ = split_by_mask(x_binary, mask)
    _, c = split_by_mask(data.x_test, mask)
    with torch.no_grad():
        p = torch.sigmoid(baseline.net(c))
    nll = -(x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    assert final["baseline_test_nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    se = nll.std().item() / math.sqrt(len(nll))
    assert final["baseline_test_nll_se"] == pytest.approx(se, rel=1e-4)
    # The paired difference is the difference of the two means (exact arithmetic).
    difference = final["baseline_test_nll"] - final["test_nll"]
    assert final["test_nll_difference"] == pytest.approx(difference, abs=1e-4)
    assert final["num_iw_particles"] == 10


def test_the_baseline_checked_when_the_run_is_read_is_the_one_used_and_read_once(
    cvae_run, monkeypatch
):
    """load_run checks baseline.pt against the run; evaluate.py's load_baseline then uses
    that very model, not a second read of the file (which could have changed meanwhile)."""
    reads: list[str] = []
    read = pv.jobs.runs.read_regular_file

    def counting(path):
        reads.append(Path(path).name)
        return read(path)

    monkeypatch.setattr(pv.jobs.runs, "read_regular_file", counting)
    monkeypatch.setattr(pv.checkpoint.files, "read_regular_file", counting)  # load_checkpoint
    run = pv.jobs.load_run(cvae_run)
    baseline = cvae_job.load_baseline(run)
    assert baseline is run.companions["baseline.pt"]
    assert reads.count("baseline.pt") == 1, reads


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(cvae_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    argv = [*TINY, "--given-quadrants", "1", "--num-iw-particles", "10", "--out-dir", str(out)]
    code, _, err = train(*argv, "--num-epochs", "1", capsys=capsys)
    assert code == 0, err
    code, stdout, err = train("--resume", str(out), "--num-epochs", "2", capsys=capsys)
    assert code == 0, err
    assert "resuming from the end of epoch 1" in stdout
    for name in ("checkpoint.pt", "baseline.pt"):
        reference, resumed = weights(cvae_run / name), weights(out / name)
        assert reference.keys() == resumed.keys()
        for key in reference:
            assert torch.equal(reference[key], resumed[key]), (name, key)
    for name in ("metrics.json", "final_metrics.json"):
        reference = json.loads((cvae_run / name).read_text())
        assert without_seconds(json.loads((out / name).read_text())) == without_seconds(reference)


def test_the_baseline_keeps_its_best_validation_epoch_and_the_test_set_scores_it(tmp_path, capsys):
    """The baseline's epoch is the one with the lowest validation −log p(missing | given) of
    the curve the run records; baseline.pt holds that epoch's weights (they score the
    validation set as recorded, and belong to the run), and the test numbers are theirs. The
    settings give a run whose best epoch is not its last."""
    out = tmp_path / "run"
    argv = [*TINY, "--given-quadrants", "1", "--num-epochs", "6", "--hidden-dims", "256,256",
            "--batch-size", "16", "--learning-rate", "0.01", "--num-iw-particles", "1"]  # fmt: skip
    code, stdout, err = train(*argv, "--out-dir", str(out), capsys=capsys)
    assert code == 0, err
    final = json.loads((out / "final_metrics.json").read_text())
    curve = final["baseline_val_nll_by_epoch"]
    assert len(curve) == 6
    best = 1 + min(range(len(curve)), key=curve.__getitem__)
    assert final["baseline_epoch"] == best != 6, curve  # else kept and last are one epoch
    assert final["baseline_val_nll"] == curve[best - 1]
    assert "the baseline trained in" in stdout and f"epoch {best} kept, validation" in stdout
    run = pv.jobs.load_run(out)  # checks baseline.pt against the run (run_schema.py)
    baseline = cvae_job.load_baseline(run)
    mask = quadrant_mask(run.data.image_shape, 1)
    assert run.x_val is not None and run.data.x_val is not None
    x_val, c_val = cvae_job.split_scored(run.model, run.x_val, run.data.x_val, mask, "val")
    x_test, c_test = cvae_job.test_parts(run)
    val_nll = -pv.conditional_log_likelihood(baseline, x_val, c_val, 1, progress=False)
    assert val_nll.mean().item() == pytest.approx(curve[best - 1], rel=1e-6)
    test_nll = -pv.conditional_log_likelihood(baseline, x_test, c_test, 1, progress=False)
    assert final["baseline_test_nll"] == pytest.approx(test_nll.mean().item(), rel=1e-6)


@pytest.mark.parametrize("value", ["0", "4", "two", "1.5", "-1"])
def test_nonsense_given_quadrants_is_refused_in_one_line_before_anything_is_written(
    value, tmp_path, capsys
):
    out = tmp_path / "run"
    code, _, err = train(*TINY, "--given-quadrants", value, "--out-dir", str(out), capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "argument --given-quadrants: expected 1, 2 or 3" in err and repr(value) in err, err
    assert not out.exists()


def test_given_quadrants_is_refused_for_the_vae(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = train(*SHORT, "--given-quadrants", "2", "--out-dir", str(out), capsys=capsys)
    assert code == 2 and "--given-quadrants is for --model cvae" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "flag",
    [
        ["--prior", "vamp"],
        ["--encoder", "iaf"],
        ["--likelihood", "normal"],
        ["--network", "conv"],
        ["--decoder", "bayesian"],
        ["--prior-scale", "2"],
        ["--num-components", "3"],
        ["--flow-depth", "3"],
        ["--likelihood-scale", "0.5"],
    ],
)
def test_the_vaes_part_flags_are_refused_in_one_line_before_anything_is_written(
    flag, tmp_path, capsys
):
    out = tmp_path / "run"
    code, _, err = train(*TINY, *SHORT, *flag, "--out-dir", str(out), capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{flag[0]} chooses a part of the VAE; --model cvae has fixed parts" in err, err
    assert not out.exists()


def test_the_vae_flags_that_mean_the_same_are_honoured(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--num-epochs", "1", "--beta", "0.5", "--elbo", "iwae", "--num-iw-particles", "0"]
    code, stdout, err = train(*TINY, *argv, "--out-dir", str(out), capsys=capsys)
    assert code == 0, err
    assert "RenyiELBO with 5 particle(s), beta 0.5" in stdout
    _, payload = pv.load_checkpoint(out / "checkpoint.pt")
    assert payload["config"]["beta"] == 0.5 and payload["args"]["given_quadrants"] == 2
    final = json.loads((out / "final_metrics.json").read_text())
    assert "test_nll" not in final and "baseline_test_nll" not in final  # K=0: not scored


def test_conditional_elbo_terms_are_the_log_densities_at_the_guides_draw():
    """By hand: one z ~ q(z|x,c) drawn from the same random state, reconstruction
    log p(x|z,c) under the decoder's Bernoulli, KL estimate log q(z|x,c) - log p(z|c)."""
    torch.manual_seed(0)
    cvae = ConditionalVAE(5, 3, 2, hidden_dims=[8])
    x, c = torch.bernoulli(torch.full((7, 5), 0.4)), torch.rand(7, 3)
    torch.manual_seed(1)
    terms = conditional_elbo_terms(cvae, x, c, chunk_size=3)  # chunks of 3, 3 and 1 images
    torch.manual_seed(1)
    with torch.no_grad():
        q = cvae.encoder(torch.cat([x, c], -1))
        z = q.rsample()
        logits = cvae.decoder(torch.cat([z, c], -1))
        reconstruction = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
        kl = q.log_prob(z) - cvae.prior(c).log_prob(z)
    torch.testing.assert_close(terms.reconstruction, reconstruction)
    torch.testing.assert_close(terms.kl, kl)
    torch.testing.assert_close(terms.elbo, reconstruction - kl)


def test_a_diverging_baseline_is_named_as_such(tmp_path, capsys, monkeypatch):
    """The CVAE trains and checkpoints first; if the baseline then diverges, the message says
    it was the baseline, and where the CVAE's checkpoint stands."""
    real_fit, calls = pv.fit, []

    def fit(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        if len(calls) == 2:
            raise pv.TrainingDivergedError("loss is nan at epoch 1, step 1 of 12")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(pv, "fit", fit)
    code, _, err = train(*TINY, *SHORT, "--out-dir", str(tmp_path / "run"), capsys=capsys)
    assert code == 1 and calls == ["ConditionalVAE", "ConditionalBaseline"], err
    assert "training diverged: the baseline: loss is nan" in err
    assert "checkpoint.pt holds the run at the end of epoch 1" in err
