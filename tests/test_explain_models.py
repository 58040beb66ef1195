"""The explain report of the other models: M2 (q(y | x)'s confusion and entropy, μ/σ at the most
probable y) and the CVAE (the spread of completions, μ/σ of q(z | x, c))."""

import re

import pyro
import pytest
import torch
from scripts_in_process import call, load_script
from test_explain import sections

import pyro_vae as pv
from pyro_vae.jobs import load_run
from pyro_vae.models.cvae_estimators import sample_spread
from pyro_vae.models.labels import UNLABELLED, hide_labels, labelled_subset
from pyro_vae.models.m2 import M2
from pyro_vae.models.masks import quadrant_mask, split_by_mask

NUM_TEST = 60


@pytest.fixture(scope="module")
def digits() -> pv.DataSplits:
    return pv.load_dataset("digits")


@pytest.fixture(scope="module")
def trained_m2(digits) -> tuple[M2, torch.Tensor, torch.Tensor]:
    pyro.set_rng_seed(0)
    x = pv.binarize(digits.x_train.double(), torch.Generator().manual_seed(0))
    y = hide_labels(digits.y_train, labelled_subset(digits.y_train, 100, seed=0))
    m2 = M2.from_data(x, y, 3, hidden_dims=(16,)).double()
    pv.fit(m2, (x, y), loss=m2.loss(), num_epochs=2, batch_size=128, progress=False)
    x_test = pv.binarize(digits.x_test[:NUM_TEST].double(), torch.Generator().manual_seed(1))
    return m2, x_test, digits.y_test[:NUM_TEST]


@pytest.fixture(scope="module")
def trained_cvae(digits) -> tuple[pv.ConditionalVAE, torch.Tensor, torch.Tensor]:
    pyro.set_rng_seed(0)
    mask = quadrant_mask(digits.image_shape, 1)
    images = pv.binarize(digits.x_train.double(), torch.Generator().manual_seed(0))
    x, c = split_by_mask(images, mask)
    cvae = pv.ConditionalVAE(x.shape[1], c.shape[1], 2, hidden_dims=(16,)).double()
    pv.fit(cvae, (x, c), num_epochs=2, batch_size=128, progress=False)
    test = pv.binarize(digits.x_test[:NUM_TEST].double(), torch.Generator().manual_seed(1))
    x_test, c_test = split_by_mask(test, mask)
    return cvae, x_test, c_test


def table_rows(body: str, start: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("|")[2:-1]]
        for line in body.splitlines()
        if line.startswith(f"| {start}")
    ]


def test_the_m2_report_measures_q_y_and_reads_z_at_the_most_probable_y(
    trained_m2, digits, tmp_path
):
    m2, x, labels = trained_m2
    report = pv.explain(m2, x, labels, digits.image_shape, digits.class_names, tmp_path)
    text = report.read_text()
    found = sections(text)
    assert sorted(found) == ["1", "2", "3", "4", "5"]
    for number, body in found.items():
        assert "Not measured" not in body, number
        assert re.search(r"\d\.\d{3}", body), f"section {number} has no measurement"
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "(confusion.png)" in text
    # Section 3: the confusion matrix counts every test input once, as classify() puts it.
    predicted = m2.classify(x)
    rows = table_rows(found["3"], "true ")
    counts = torch.tensor([[int(v) for v in row[:-1]] for row in rows])
    assert counts.sum() == NUM_TEST
    for i in range(10):
        for j in range(10):
            assert counts[i, j] == int(((labels == i) & (predicted == j)).sum()), (i, j)
    accuracy = float((predicted == labels).double().mean())
    assert f"**{accuracy:.3f}**" in found["3"]
    # Section 4: the entropy is −Σ p log p of q(y | x), here by hand.
    with torch.no_grad():
        probs = m2.label_posterior(x).probs
    entropy = -(probs * probs.log()).sum(-1)
    assert f"**{float(entropy.mean()):.3f}**" in found["4"]
    rows = table_rows(found["4"], "")[1:]  # after the header row
    assert len(rows) == 10
    for i, row in enumerate(rows):
        assert int(row[0]) == int((labels == i).sum())
        assert float(row[1]) == pytest.approx(float(entropy[labels == i].mean()), abs=6e-4)
    # Section 1 reads q(z | x, y) at the most probable y, not at the true label.
    assert "most probable y" in found["1"]
    loc, scale = m2.encode(x, predicted)
    row = table_rows(found["1"], "test #1 ")[0]
    assert float(row[2]) == pytest.approx(float(loc[0, 0]), abs=6e-4)
    assert float(row[5]) == pytest.approx(float(scale[0, 0]), abs=6e-4)


def test_the_m2_report_needs_every_test_label(trained_m2, digits, tmp_path):
    m2, x, labels = trained_m2
    hidden = labels.clone()
    hidden[3] = UNLABELLED
    with pytest.raises(ValueError, match="every test label"):
        pv.explain(m2, x, hidden, digits.image_shape, digits.class_names, tmp_path)
    with pytest.raises(ValueError, match="class_names"):
        pv.explain(m2, x, labels, digits.image_shape, digits.class_names[:3], tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_the_cvae_report_measures_the_spread_of_completions(trained_cvae, tmp_path):
    cvae, x, c = trained_cvae
    pyro.set_rng_seed(0)
    report = pv.explain(cvae, x, torch.zeros(0), (8, 8), (), tmp_path, 200, condition=c)
    found = sections(report.read_text())
    assert sorted(found) == ["1", "2", "3", "4"]
    for number, body in found.items():
        assert "Not measured" not in body, number
        assert re.search(r"\d\.\d{3}", body), f"section {number} has no measurement"
    # Section 3: each input's spread is sample_spread's, exactly: the same draws, as the
    # sections before it draw nothing.
    pyro.set_rng_seed(0)
    expected = sample_spread(cvae, c, 200)
    rows = table_rows(found["3"], "test #")
    assert len(rows) == 5
    for row, value in zip(rows, expected[:5], strict=True):
        assert float(row[0]) == pytest.approx(float(value), abs=6e-5)
    assert f"mean **{float(expected.mean()):.4f}**" in found["3"]
    assert float(expected.min()) > 0  # the spread is not a deterministic map's
    # Section 1: μ and σ of q(z | x, c), the encoder reading x and c together.
    with torch.no_grad():
        posterior = cvae.encoder(torch.cat([x, c], -1))
    row = table_rows(found["1"], "test #1 ")[0]
    assert float(row[2]) == pytest.approx(float(posterior.mean[0, 0]), abs=6e-4)
    assert float(row[4]) == pytest.approx(float(posterior.stddev[0, 0]), abs=6e-4)


def test_the_cvae_report_needs_the_condition(trained_cvae, tmp_path):
    cvae, x, c = trained_cvae
    with pytest.raises(ValueError, match="needs condition="):
        pv.explain(cvae, x, torch.zeros(0), (8, 8), (), tmp_path)
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    with pytest.raises(ValueError, match="condition= is for a ConditionalVAE"):
        pv.explain(vae, x[:, :6], torch.zeros(len(x)), (2, 3), ["a"], tmp_path, condition=c)
    with pytest.raises(ValueError, match="num_particles"):
        pv.explain(cvae, x, torch.zeros(0), (8, 8), (), tmp_path, 1, condition=c)
    assert not (tmp_path / "report.md").exists()


# ---------------------------------------------------------------- scripts/explain.py routes runs

train_script, explain_script = map(load_script, ("train", "explain"))
TINY = ("--latent-dim", "2", "--hidden-dims", "16", "--num-epochs", "1", "--no-progress")


def test_explain_py_writes_the_m2_report_of_an_m2_run(tmp_path, capsys, float32):
    run = tmp_path / "m2"
    argv = ("--model", "m2", "--num-labelled", "30", *TINY, "--out-dir", str(run))
    assert call(train_script, *argv, capsys=capsys)[0] == 0
    code, _, err = call(explain_script, str(run), capsys=capsys)
    assert code == 0, err
    found = sections((run / "explain" / "report.md").read_text())
    assert sorted(found) == ["1", "2", "3", "4", "5"]
    loaded = load_run(run)
    assert loaded.kind == "m2"
    predicted = loaded.model.classify(loaded.x_test)
    rows = table_rows(found["3"], "true ")
    counts = torch.tensor([[int(v) for v in row[:-1]] for row in rows])
    assert counts.sum() == len(loaded.x_test)
    assert counts.diagonal().sum() == int((predicted == loaded.data.y_test).sum())
    assert (run / "explain" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_explain_py_writes_the_cvae_report_of_a_cvae_run(tmp_path, capsys, float32):
    run = tmp_path / "cvae"
    argv = ("--model", "cvae", *TINY, "--num-iw-particles", "0", "--out-dir", str(run))
    assert call(train_script, *argv, capsys=capsys)[0] == 0
    code, _, err = call(explain_script, str(run), "--num-particles", "50", capsys=capsys)
    assert code == 0, err
    found = sections((run / "explain" / "report.md").read_text())
    assert sorted(found) == ["1", "2", "3", "4"]
    loaded = load_run(run)
    assert loaded.kind == "cvae"
    # The script's default --seed 0, and the given pixels of the grayscale test images as c.
    mask = quadrant_mask(loaded.data.image_shape, loaded.args["given_quadrants"])
    _, c = split_by_mask(loaded.data.x_test, mask)
    pyro.set_rng_seed(0)
    expected = sample_spread(loaded.model, c, 50)
    for row, value in zip(table_rows(found["3"], "test #"), expected[:5], strict=True):
        assert float(row[0]) == pytest.approx(float(value), abs=6e-5)
