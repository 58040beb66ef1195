"""scripts/train.py --model m2 (pyro_vae.jobs.m2), run in this process through the
script's ``run(argv)``: what it writes, that a resumed run ends bit for bit where an
uninterrupted one does, the labelled subset it records, and what it refuses."""

import json
from pathlib import Path

import pytest
import torch
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.data import validation_indices
from pyro_vae.jobs import m2 as semisupervised_job
from pyro_vae.jobs.runs import Run
from pyro_vae.models.labels import UNLABELLED, labelled_subset
from pyro_vae.models.m2 import M2, build_m2

NUM_LABELLED = 30
# A small digits run: a few seconds.
TINY = (
    "--model", "m2", "--num-labelled", str(NUM_LABELLED), "--latent-dim", "3",
    "--hidden-dims", "16", "--no-progress", "--seed", "3",
)  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


train_script = load_script("train")


# Every test here runs the scripts, in float32 (conftest.py).
pytestmark = pytest.mark.usefixtures("float32")


def train(*argv: str, capsys) -> tuple[int, str, str]:
    return call(train_script, *argv, capsys=capsys)


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory) -> Path:
    """One finished tiny M2 run of two epochs, shared by the tests that only read it."""
    torch.set_default_dtype(torch.float32)
    out = tmp_path_factory.mktemp("m2") / "run"
    assert train_script.run([*TINY, "--num-epochs", "2", "--out-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def digits() -> pv.DataSplits:
    return pv.load_dataset("digits")


@pytest.fixture(scope="module")
def held_out(digits) -> pv.DataSplits:
    """digits as the tiny run trains on it: a tenth (144) of the training rows held out for
    validation with its seed, 3."""
    return digits.hold_out(validation_indices(1437, 144, seed=3))


def test_a_run_writes_checkpoint_metrics_and_figures(m2_run):
    metrics = json.loads((m2_run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1, 2]
    for key in ("train_loss", "val_accuracy", "val_accuracy_grayscale", "val_elbo"):
        assert all(isinstance(row[key], float) for row in metrics), key
    for row in metrics:
        assert 0 <= row["val_accuracy"] <= 1
        # The entropy of q(y|x) over 10 classes lies between 0 and log 10.
        assert 0 <= row["val_label_entropy"] <= torch.tensor(10.0).log().item() + 1e-6
    # No test metric before the end: the epochs are scored on the validation set.
    assert not [key for row in metrics for key in row if key.startswith("test_")]
    assert (m2_run / "metrics.csv").read_text().startswith("epoch,train_loss,val_accuracy,")
    for name in semisupervised_job.FIGURES:
        assert (m2_run / name).read_bytes()[:8] == PNG, name
    final = json.loads((m2_run / "final_metrics.json").read_text())
    # The training rows: 1437 less the 144 held out for validation.
    assert final["num_labelled"] == NUM_LABELLED and final["num_unlabelled"] == 1293 - 30
    # The default α, N / N_l, over the 1293 training rows.
    assert final["alpha"] == pytest.approx(1293 / NUM_LABELLED)
    assert final["total_seconds"] > final["train_seconds"] > 0


def test_the_checkpoint_rebuilds_the_m2_whose_accuracy_was_reported(m2_run, held_out):
    m2, payload = pv.load_checkpoint(m2_run / "checkpoint.pt")
    assert isinstance(m2, M2) and payload["config"]["model"] == "m2"
    assert (m2.num_labels, m2.latent_dim, m2.data_dim) == (10, 3, 64)
    assert payload["args"]["model"] == "m2" and payload["args"]["num_labelled"] == NUM_LABELLED
    assert payload["epoch"] == 2
    # The accuracy recorded is the kept classifier's (best.pt, the best epoch by validation
    # accuracy) on the test set the run scored.
    best, kept = pv.load_checkpoint(m2_run / "best.pt")
    final = json.loads((m2_run / "final_metrics.json").read_text())
    assert kept["selection"]["epoch"] == final["best_epoch"]
    metrics = json.loads((m2_run / "metrics.json").read_text())
    assert final["best_val_accuracy"] == max(row["val_accuracy"] for row in metrics)
    x_test, _, x_val = pv.jobs.runs.evaluation_sets(best, held_out, seed=3)
    assert pv.jobs.runs.digest(x_test) == payload["evaluation_digest"]
    assert best.accuracy(x_test, held_out.y_test) == final["test_accuracy"]
    assert best.accuracy(x_val, held_out.y_val) == final["best_val_accuracy"]


def test_the_labelled_subset_recorded_is_the_seeded_balanced_one(m2_run, held_out):
    payload = torch.load(m2_run / "checkpoint.pt", weights_only=True)
    recorded = payload["labelled_indices"]
    # Drawn from the training rows left after the validation rows were held out.
    assert torch.equal(recorded, labelled_subset(held_out.y_train, NUM_LABELLED, seed=3))
    # Balanced: 3 of each of the 10 digits.
    assert held_out.y_train[recorded].bincount().tolist() == [3] * 10


def test_the_rows_trained_on_hide_every_label_outside_the_subset(digits):
    labelled, rows = semisupervised_job.choose_rows(digits, 20, 50, seed=1)
    assert torch.equal(labelled, labelled_subset(digits.y_train, 20, seed=1))
    assert len(rows) == 70 and set(labelled.tolist()) <= set(rows.tolist())
    # The unlabelled rows are the first 50 training rows outside the subset.
    others = [i for i in range(len(digits.y_train)) if i not in set(labelled.tolist())]
    assert sorted(set(rows.tolist()) - set(labelled.tolist())) == others[:50]


def test_a_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(m2_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert train(*TINY, "--num-epochs", "1", "--out-dir", str(out), capsys=capsys)[0] == 0
    code, stdout, err = train("--resume", str(out), "--num-epochs", "2", capsys=capsys)
    assert code == 0, err
    assert "resuming from the end of epoch 1" in stdout
    whole = torch.load(m2_run / "checkpoint.pt", weights_only=True)
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for name, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name
    assert torch.equal(whole["labelled_indices"], resumed["labelled_indices"])

    def timeless(rows):
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]

    assert timeless(json.loads((out / "metrics.json").read_text())) == timeless(
        json.loads((m2_run / "metrics.json").read_text())
    )
    final, final_whole = (json.loads((d / "final_metrics.json").read_text()) for d in (out, m2_run))
    assert timeless([final]) == timeless([final_whole])


def test_a_resume_refuses_a_labelled_subset_the_seed_does_not_give(m2_run, tmp_path, capsys):
    out = tmp_path / "tampered"
    out.mkdir()
    payload = torch.load(m2_run / "checkpoint.pt", weights_only=True)
    payload["labelled_indices"] = payload["labelled_indices"] + 1
    torch.save(payload, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    code, stdout, err = train("--resume", str(out), "--num-epochs", "3", capsys=capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "labelled subset is not the one labelled_subset" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [".pyro_vae.lock", "checkpoint.pt"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-labelled", "0"], "expected a positive integer, got '0'"),
        (["--num-labelled", "9"], "--num-labelled 9 is fewer than the 10 classes of digits"),
        (["--num-labelled", "1438"], "--num-labelled 1438 exceeds the 1437 training examples"),
        (["--num-labelled", "1437"], "1437: class 0 has 142 rows, fewer than its share of 144"),
        (["--num-labelled", "100", "--num-unlabelled", "1338"], "--num-unlabelled 1338 exceeds"),
        (["--alpha", "0"], "expected a finite number > 0"),
    ],
)
def test_bad_label_counts_exit_with_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    # One epoch: should a bad count slip through, the run it starts is short.
    # No validation set: the counts are those of all 1437 training rows.
    argv = ["--model", "m2", *argv, "--val-size", "0", "--num-epochs", "1", "--no-progress",
            "--out-dir", str(out)]  # fmt: skip
    code, stdout, err = train(*argv, capsys=capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and message in err, err
    assert not out.exists()


def test_the_largest_counts_are_accepted(digits):
    """The bounds of the refusals above are exact: as many labels as a balanced subset can
    take (139 of each digit: the rarest, 8, has 139), or every other row unlabelled."""
    labelled, rows = semisupervised_job.choose_rows(digits, 1390, None, seed=0)
    assert len(labelled) == 1390 and len(rows) == 1437
    labelled, rows = semisupervised_job.choose_rows(digits, 10, 1427, seed=0)
    assert len(labelled) == 10 and len(rows) == 1437


VAE_VALUES = {
    "--prior": "mixture",
    "--encoder": "full-covariance",
    "--likelihood": "bernoulli",
    "--decoder": "bayesian",
    "--prior-scale": "2",
    "--num-components": "3",
    "--flow-depth": "2",
    "--likelihood-scale": "0.5",
    "--elbo": "trace",
    "--beta": "1",
    "--kl-warmup-epochs": "1",
    "--num-iw-particles": "10",
}


@pytest.mark.parametrize("flag", VAE_VALUES)
def test_vae_only_flags_are_refused_with_model_m2(tmp_path, capsys, flag):
    out = tmp_path / "run"
    argv = ("--model", "m2", flag, VAE_VALUES[flag], "--num-epochs", "1", "--out-dir", str(out))
    code, stdout, err = train(*argv, capsys=capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and f"{flag} is for --model vae" in err, err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--num-labelled", "--num-unlabelled", "--alpha"])
def test_m2_flags_are_refused_for_the_vae(tmp_path, capsys, flag):
    out = tmp_path / "run"
    # One epoch: should the flag slip through, the VAE run it starts is short.
    code, _, err = train(flag, "100", "--num-epochs", "1", "--out-dir", str(out), capsys=capsys)
    assert code == 2 and f"{flag} is for --model m2" in err, err
    assert not out.exists()


def test_the_m2_defaults_and_the_flags_it_shares_with_the_vae(capsys):
    args = train_script.parse_args(["--model", "m2", "--network", "conv", "--latent-dim", "4"])
    assert args.num_labelled == semisupervised_job.DEFAULT_NUM_LABELLED
    assert args.out_dir == Path("runs") / "digits-m2" and args.num_epochs == 200
    assert args.hidden_dims == [] and args.num_particles == 1 and args.alpha is None
    with pytest.raises(SystemExit):
        train_script.parse_args(["--model", "m2", "--network", "conv", "--hidden-dims", "8"])
    assert "--network conv has fixed layers" in capsys.readouterr().err


def test_the_labels_fit_gets_are_known_on_the_subset_and_hidden_elsewhere(digits):
    m2 = build_m2(64, 10, 2, alpha=1.0, hidden_dims=[8])
    args = train_script.parse_args(["--model", "m2", "--num-labelled", "20", "--seed", "1"])
    args.alpha = 1.0
    x_test, x_train_eval, _ = pv.jobs.runs.evaluation_sets(m2, digits, seed=1)
    run = Run(Path("unused"), "m2", m2, {}, {}, {}, digits, x_test, x_train_eval)
    setup = semisupervised_job.prepare(run, args)
    x, y = setup.training_data
    assert torch.equal(x, digits.x_train)
    chosen = labelled_subset(digits.y_train, 20, seed=1)
    expected = torch.full_like(digits.y_train, UNLABELLED)
    expected[chosen] = digits.y_train[chosen]
    assert torch.equal(y, expected)
    assert torch.equal(setup.checkpoint_extra["labelled_indices"], chosen.sort().values)


def test_conv_networks_train_on_images_and_the_checkpoint_rebuilds_them(tmp_path, capsys):
    out = tmp_path / "conv"
    argv = ("--model", "m2", "--network", "conv", "--latent-dim", "2", "--num-epochs", "1")
    code, stdout, err = train(*argv, "--no-progress", "--out-dir", str(out), capsys=capsys)
    assert code == 0, err
    assert "M2 (conv, latent 2" in stdout
    m2, payload = pv.load_checkpoint(out / "checkpoint.pt")
    assert payload["config"]["image_shape"] == [8, 8] and payload["config"]["hidden_dims"] == []
    assert isinstance(m2.classifier, pv.components.networks.ConvNet)


def test_a_model_too_big_for_memory_is_refused_before_anything_is_built(tmp_path, capsys):
    out = tmp_path / "huge"
    argv = ("--model", "m2", "--hidden-dims", str(10**9), "--num-epochs", "1")
    code, stdout, err = train(*argv, "--out-dir", str(out), capsys=capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "more than this machine's" in err, err
    assert not out.exists()


def test_a_resume_refuses_a_checkpoint_without_its_labelled_subset(m2_run, tmp_path, capsys):
    out = tmp_path / "bare"
    out.mkdir()
    payload = torch.load(m2_run / "checkpoint.pt", weights_only=True)
    del payload["labelled_indices"]
    torch.save(payload, out / "checkpoint.pt")
    code, stdout, err = train("--resume", str(out), "--num-epochs", "3", capsys=capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "holds no 'labelled_indices'" in err, err
