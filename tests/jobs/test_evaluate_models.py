"""scripts/evaluate.py on M2 and CVAE runs, in this process: pyro_vae.jobs.load_run hands back
each job's run, and evaluation.json holds numbers recomputed here independently, exactly where
the maths is exact (counts, accuracies, the baseline's likelihood, the same seeded draws)."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pyro
import pytest
import torch
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.jobs import cvae as cvae_job
from pyro_vae.jobs import load_run
from pyro_vae.models.cvae import ConditionalBaseline
from pyro_vae.models.cvae_estimators import conditional_log_likelihood, sample_spread
from pyro_vae.models.masks import quadrant_mask, split_by_mask

train_script = load_script("train")
evaluate_script = load_script("evaluate")
SEED = 3
# Small digits runs: a few seconds each.
M2_TINY = (
    "--model", "m2", "--num-labelled", "30", "--latent-dim", "3", "--hidden-dims", "16",
    "--num-epochs", "2", "--no-progress", "--seed", str(SEED),
)  # fmt: skip
CVAE_TINY = (
    "--model", "cvae", "--latent-dim", "2", "--hidden-dims", "16", "--num-epochs", "2",
    "--given-quadrants", "1", "--num-iw-particles", "5", "--no-progress", "--seed", str(SEED),
)  # fmt: skip
DIGITS_TEST = 360


# Every test here runs the scripts, in float32 (conftest.py).
pytestmark = pytest.mark.usefixtures("float32")


def trained(tmp_path_factory, name: str, argv: tuple[str, ...]) -> Path:
    torch.set_default_dtype(torch.float32)
    out = tmp_path_factory.mktemp(name) / "run"
    assert train_script.run([*argv, "--out-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory) -> Path:
    return trained(tmp_path_factory, "m2", M2_TINY)


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory) -> Path:
    return trained(tmp_path_factory, "cvae", CVAE_TINY)


def evaluate(run_dir: Path, *argv: str, capsys) -> dict:
    code, _, err = call(evaluate_script, str(run_dir), "--no-progress", *argv, capsys=capsys)
    assert code == 0, err
    return json.loads((run_dir / "evaluation.json").read_text())


def check_provenance(result: dict, run_dir: Path, seed: int) -> None:
    """The weights evaluated are the epoch the run kept (best.pt), named with their bytes."""
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert result["dataset"] == "digits" and result["run"] == str(run_dir)
    sha = hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest()
    assert result["checkpoint_sha256"] == sha and result["weights"] == "best.pt"
    assert result["test_set_sha256"] == checkpoint["evaluation_digest"]
    assert (result["epoch"], result["step"]) == (final["best_epoch"], 0)
    assert result["selected_by"] == final["selected_by"]
    assert result["seed"] == seed


def test_load_run_gives_back_the_m2_and_the_test_set_it_scored(m2_run):
    run = load_run(m2_run)
    assert run.kind == "m2" and run.config["model"] == "m2"
    assert run.checkpoint["evaluation_digest"] == pv.jobs.runs.digest(run.x_test)
    assert len(run.checkpoint["labelled_indices"]) == 30 and run.x_test.device.type == "cpu"
    # The test accuracy the run reported (of the epoch it kept) is the loaded model's.
    final = json.loads((m2_run / "final_metrics.json").read_text())
    assert run.model.accuracy(run.x_test, run.data.y_test) == final["test_accuracy"]


def test_load_run_of_m2_refuses_a_test_set_that_is_not_the_one_scored(m2_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    payload = torch.load(m2_run / "checkpoint.pt", weights_only=True)
    payload["evaluation_digest"] = "0" * 64  # as if the data files had changed since
    torch.save(payload, copy / "checkpoint.pt")
    with pytest.raises(ValueError, match="is not the one this run scored"):
        load_run(copy)


def test_evaluate_m2_reports_accuracy_confusion_entropy_and_elbo(m2_run, capsys):
    # The run's test ELBO was drawn with its seed, one particle: the same draws here.
    result = evaluate(m2_run, "--seed", str(SEED), "--num-particles", "1", capsys=capsys)
    check_provenance(result, m2_run, SEED)
    run = load_run(m2_run)
    assert run.kind == "m2"
    m2, labels = run.model, run.data.y_test
    assert result["num_examples"] == DIGITS_TEST
    assert result["test_accuracy"] == m2.accuracy(run.x_test, labels)
    assert result["test_accuracy_grayscale"] == m2.accuracy(run.data.x_test, labels)
    confusion = torch.tensor(result["confusion_matrix"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == DIGITS_TEST
    assert confusion.trace().item() / DIGITS_TEST == result["test_accuracy"]
    # Rows are labels: each sums to that class's count.
    assert confusion.sum(1).tolist() == torch.bincount(labels, minlength=10).tolist()
    with torch.no_grad():
        probs = m2.classifier(run.x_test).softmax(-1).double()
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    assert result["test_label_entropy"] == pytest.approx(entropy.mean().item(), rel=1e-5)
    for k, name in enumerate(run.data.class_names):
        row = result["per_class"][name]
        assert row["count"] == int((labels == k).sum())
        assert row["label_entropy"] == pytest.approx(entropy[labels == k].mean().item(), rel=1e-5)
        assert row["accuracy"] == pytest.approx(confusion[k, k].item() / row["count"])
    final = json.loads((m2_run / "final_metrics.json").read_text())
    assert result["test_elbo"] == pytest.approx(final["test_elbo"], rel=1e-6)


def test_evaluate_m2_prints_a_line_per_stage_and_a_table(m2_run, capsys):
    code, out, err = call(evaluate_script, str(m2_run), "--no-progress", capsys=capsys)
    assert code == 0, err
    assert "confusion matrix" in out and "accuracy of argmax q(y|x)" in out
    assert sum(line.lstrip().startswith("[") for line in out.splitlines()) >= 4


def test_load_run_gives_back_the_cvae_run(cvae_run):
    run = load_run(cvae_run)
    assert run.kind == "cvae" and run.config["model"] == "cvae"
    assert run.checkpoint["evaluation_digest"] == pv.jobs.runs.digest(run.x_test)


def test_the_digests_reported_are_of_the_bytes_loaded_not_a_second_read(
    cvae_run, capsys, monkeypatch
):
    """evaluation.json's checkpoint_sha256 and baseline_sha256 hash the very bytes the run's
    weights were loaded from when it was read: no file is read again to hash it (a file
    changed in between would otherwise be named for weights it did not give)."""
    files = {name: (cvae_run / name).read_bytes() for name in ("best.pt", "baseline.pt")}

    def read_again(path):
        raise AssertionError(f"{path} was read a second time to hash it")

    monkeypatch.setattr(pv.jobs.runs, "file_digest", read_again)
    result = evaluate(cvae_run, "--num-iw-particles", "2", "--max-examples", "5", capsys=capsys)
    assert result["checkpoint_sha256"] == hashlib.sha256(files["best.pt"]).hexdigest()
    assert result["baseline_sha256"] == hashlib.sha256(files["baseline.pt"]).hexdigest()


def test_a_run_read_without_its_companions_still_checks_and_hashes_its_baseline(cvae_run):
    run = load_run(cvae_run, best=False)
    assert run.companions == {} and "baseline.pt" not in run.digests
    baseline = cvae_job.load_baseline(run)
    assert isinstance(baseline, ConditionalBaseline)
    sha = hashlib.sha256((cvae_run / "baseline.pt").read_bytes()).hexdigest()
    assert run.file_sha256("baseline.pt") == run.digests["baseline.pt"] == sha


def test_a_best_pt_without_its_selection_is_refused(cvae_run, tmp_path):
    """Another checkpoint of the run copied over best.pt (the baseline's: of the same run and
    arguments) would be taken for the kept epoch's weights and reported as checkpoint.pt."""
    copy = tmp_path / "run"
    shutil.copytree(cvae_run, copy)
    shutil.copy(copy / "baseline.pt", copy / "best.pt")
    with pytest.raises(ValueError, match=r"best\.pt: holds no selection"):
        load_run(copy)


def test_evaluate_cvae_reports_both_likelihoods_and_the_spread(cvae_run, capsys):
    k = 20
    result = evaluate(cvae_run, "--num-iw-particles", str(k), "--seed", "7", capsys=capsys)
    check_provenance(result, cvae_run, 7)
    assert result["num_iw_particles"] == k and result["given_quadrants"] == 1
    sha = hashlib.sha256((cvae_run / "baseline.pt").read_bytes()).hexdigest()
    assert result["baseline_sha256"] == sha
    run = load_run(cvae_run)
    assert run.kind == "cvae"
    baseline, _ = pv.load_checkpoint(cvae_run / "baseline.pt")
    assert isinstance(baseline, ConditionalBaseline)
    mask = quadrant_mask(run.data.image_shape, 1)
    x, _ = split_by_mask(run.x_test, mask)
    _, c = split_by_mask(run.data.x_test, mask)  # the condition is the grayscale pixels
    assert result["num_examples"] == DIGITS_TEST and result["num_missing_pixels"] == x.shape[1]
    # The baseline's -log p(x | c): the Bernoulli cross-entropy of its prediction, exactly.
    with torch.no_grad():
        p = baseline.predict(c).double()
    nll = torch.nn.functional.binary_cross_entropy(p, x.double(), reduction="none").sum(1)
    assert result["baseline_test_nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    se = nll.std().item() / math.sqrt(len(nll))
    assert result["baseline_test_nll_se"] == pytest.approx(se, rel=1e-4)
    # The CVAE's: the same seeded draws, in the same order, give the same numbers.
    pyro.set_rng_seed(7)
    cvae_nll = -conditional_log_likelihood(run.model, x, c, k)
    spread = torch.cat([sample_spread(run.model, chunk, 100) for chunk in c.split(100)])
    difference = nll - cvae_nll.double()
    assert result["test_nll"] == pytest.approx(cvae_nll.mean().item(), rel=1e-5)
    assert result["test_nll_se"] == pytest.approx(
        cvae_nll.std().item() / math.sqrt(len(cvae_nll)), rel=1e-4
    )
    assert result["test_nll_difference"] == pytest.approx(difference.mean().item(), rel=1e-4)
    se = difference.std().item() / math.sqrt(len(difference))
    assert result["test_nll_difference_se"] == pytest.approx(se, rel=1e-3)
    summary = result["sample_spread"]
    assert result["spread_num_samples"] == 100
    for key, value in (("mean", spread.mean()), ("min", spread.min()), ("max", spread.max())):
        assert summary[key] == pytest.approx(value.item(), rel=1e-5), key
    assert summary["median"] == pytest.approx(spread.double().quantile(0.5).item(), rel=1e-5)
    per_class = result["per_class"]
    assert sum(row["count"] for row in per_class.values()) == DIGITS_TEST
    weighted = sum(row["count"] * row["baseline_nll"] for row in per_class.values())
    assert weighted / DIGITS_TEST == pytest.approx(result["baseline_test_nll"], rel=1e-5)
    assert result["sample_spread"]["mean"] > 0  # the CVAE's completions vary with z


def test_evaluate_cvae_prints_a_table(cvae_run, capsys):
    code, out, err = call(
        evaluate_script, str(cvae_run), "--no-progress", "--num-iw-particles", "5", capsys=capsys
    )
    assert code == 0, err
    assert "baseline - CVAE" in out and "spread of CVAE completions" in out


def test_evaluate_refuses_a_cvae_run_without_its_baseline(cvae_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(cvae_run, copy)
    (copy / "baseline.pt").unlink()
    (copy / "evaluation.json").unlink(missing_ok=True)  # left by the tests before
    code, _, err = call(evaluate_script, str(copy), "--no-progress", capsys=capsys)
    assert code == 2 and "no baseline.pt there" in err
    assert not (copy / "evaluation.json").exists()
