"""The explain report runs end to end, and every section answers with numbers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyro_vae as pv

EXPLAIN = Path(__file__).resolve().parents[1] / "scripts" / "explain.py"
TRAIN = EXPLAIN.parent / "train.py"
FIGURES = ("point_cloud", "aggregate_posterior", "prior_samples", "traversal")


def sections(report: str) -> dict[str, str]:
    parts = re.split(r"^## ", report, flags=re.MULTILINE)[1:]
    return {part.split(".")[0]: part for part in parts}


def trained_digits_vae(**options) -> tuple[pv.VAE, pv.DataSplits, torch.Tensor]:
    data = pv.load_dataset("digits")
    vae = pv.build_vae(64, 3, hidden_dims=(16,), **options)
    pv.fit(vae, data.x_train.double(), num_epochs=3, batch_size=128, progress=False)
    x = pv.binarize(data.x_test[:60].double(), torch.Generator().manual_seed(0))
    return vae, data, x


def test_every_section_carries_numbers_and_every_figure_is_written(tmp_path):
    vae, data, x = trained_digits_vae()
    report = pv.explain(
        vae, x, data.y_test[:60], data.image_shape, data.class_names, tmp_path, num_draws=500
    )
    text = report.read_text()
    found = sections(text)
    assert sorted(found) == ["1", "2", "3", "4", "5", "6"]
    for number, body in found.items():
        assert "Not measured" not in body, number
        assert re.search(r"\d\.\d{3}", body), f"section {number} has no measurement"
    for figure in (*FIGURES, "kl_per_dimension"):
        assert (tmp_path / f"{figure}.png").read_bytes()[:4] == b"\x89PNG", figure
        assert f"({figure}.png)" in text
    # Section 4: the closed form and torch agree exactly, Pyro's estimate within its SE.
    rows = [line for line in found["4"].splitlines() if line.startswith("| test #")]
    for row in rows:
        formula, torch_kl, monte_carlo, se = map(float, row.split("|")[2:6])
        assert formula == torch_kl
        assert abs(monte_carlo - formula) < 4 * se + 1e-3  # the table rounds to 3 decimals


def test_models_without_a_diagonal_posterior_get_the_sections_that_apply(tmp_path):
    vae, data, x = trained_digits_vae(encoder="iaf", prior="mixture", num_components=3)
    report = pv.explain(
        vae, x, data.y_test[:60], data.image_shape, data.class_names, tmp_path, num_draws=200
    )
    found = sections(report.read_text())
    for number in ("2", "4", "6"):
        assert "Not measured" in found[number]
    for number in ("1", "3", "5"):
        assert re.search(r"\d\.\d{3}", found[number])


def test_explain_script_runs_end_to_end_on_a_tiny_run(tmp_path):
    run_dir = tmp_path / "run"
    trained = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--num-epochs",
            "2",
            "--latent-dim",
            "3",
            "--hidden-dims",
            "16",
            "--num-iw-samples",
            "0",
            "--out-dir",
            str(run_dir),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr
    result = subprocess.run(
        [sys.executable, str(EXPLAIN), str(run_dir), "--num-draws", "300"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    found = sections((run_dir / "explain" / "report.md").read_text())
    assert sorted(found) == ["1", "2", "3", "4", "5", "6"]
    assert all(re.search(r"\d\.\d{3}", body) for body in found.values())


def test_explain_script_without_a_run_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXPLAIN), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1


@pytest.mark.parametrize("count", [0, 4])
def test_explain_needs_a_few_examples(tmp_path, count):
    vae = pv.VAE(6, 2, hidden_dims=(8,))
    x = torch.bernoulli(torch.full((count, 6), 0.5))
    with pytest.raises(ValueError):
        pv.explain(vae, x, torch.zeros(count), (2, 3), ["a"], tmp_path)


def test_a_custom_encoder_without_a_network_gets_section_2_marked(tmp_path):
    from test_latent_metrics import IgnoresX

    vae = pv.VAE(6, 2, encoder=IgnoresX(2), hidden_dims=(8,))
    x = torch.bernoulli(torch.full((20, 6), 0.5))
    labels = torch.arange(20) % 2
    report = pv.explain(vae, x, labels, (2, 3), ["a", "b"], tmp_path, num_draws=100)
    found = sections(report.read_text())
    assert "Not measured" in found["2"] and "Not measured" not in found["1"]
