"""The explain report runs end to end, and every section answers with numbers."""

import re
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
        vae, x, data.y_test[:60], data.image_shape, data.class_names, tmp_path, num_particles=500
    )
    text = report.read_text()
    found = sections(text)
    assert sorted(found) == ["1", "2", "3", "4", "5", "6", "7"]
    for number, body in found.items():
        assert "Not measured" not in body, number
        assert re.search(r"\d\.\d{3}", body), f"section {number} has no measurement"
    for figure in (*FIGURES, "kl_per_dimension", "inference_gaps"):
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
        vae, x, data.y_test[:60], data.image_shape, data.class_names, tmp_path, num_particles=200
    )
    found = sections(report.read_text())
    for number in ("2", "4", "6"):
        assert "Not measured" in found[number]
    for number in ("1", "3", "5", "7"):
        assert re.search(r"\d\.\d{3}", found[number])
    # An IAF encoder is not a Gaussian: q* is full-covariance, and the report says what that
    # does to the amortization gap.
    assert "q* is full-covariance" in found["7"] and "may be negative" in found["7"]


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
    report = pv.explain(vae, x, labels, (2, 3), ["a", "b"], tmp_path, num_particles=100)
    found = sections(report.read_text())
    assert "Not measured" in found["2"] and "Not measured" not in found["1"]


# ---------------------------------------------------------------- the numbers of sections 1-3


def table_rows(section: str, first_cell: str) -> list[list[str]]:
    """The cells (after the first) of the table rows whose first cell starts with
    ``first_cell``."""
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            rows.append(cells[1:])
    return rows


def assert_printed(printed: str, value: float, decimals: int, what: str) -> None:
    """``printed`` is ``value`` rounded to ``decimals`` places."""
    assert abs(float(printed) - value) <= 0.5 * 10**-decimals + 1e-12, (what, printed, value)


def test_sections_1_to_3_print_the_encoders_mu_and_sigma_and_their_measurements(tmp_path):
    data = pv.load_dataset("digits", dtype=torch.float64)
    x = pv.binarize(data.x_test[:60], torch.Generator().manual_seed(0))
    vae = pv.VAE(64, 3, hidden_dims=(16,))
    num_draws = 500
    report = pv.explain(
        vae, x, data.y_test[:60], data.image_shape, data.class_names, tmp_path, num_draws
    )
    found = sections(report.read_text())
    loc, scale = vae.encode(x)
    # σ and σ², and the pixels' std and variance, differ in the printed decimals.
    assert ((scale[:5] - scale[:5].pow(2)).abs() > 0.01).all()
    assert (x[:5].std(1) - x[:5].var(1)).abs().min() > 0.01

    # 1. Per example: the pixels' mean and std, then μ_i(x) and σ_i(x) from encode.
    assert "| input | pixel mean | pixel std | μ_1(x) | μ_2(x) | μ_3(x) | σ_1(x) |" in found["1"]
    rows = table_rows(found["1"], "test #")
    assert len(rows) == 5
    for n, row in enumerate(rows):
        assert_printed(row[0], x[n].mean().item(), 3, f"pixel mean #{n}")
        assert_printed(row[1], x[n].std().item(), 3, f"pixel std #{n}")
        for i in range(3):
            assert_printed(row[2 + i], loc[n, i].item(), 3, f"μ_{i + 1} #{n}")
            assert_printed(row[5 + i], scale[n, i].item(), 3, f"σ_{i + 1} #{n}")
    (whole,) = table_rows(found["1"], "whole test set")
    assert_printed(whole[0], x.mean().item(), 3, "pixel mean")
    assert_printed(whole[1], x.std().item(), 3, "pixel std")
    spread = re.search(
        r"standard deviation of (\S+) to (\S+) \(over dimensions i\) and σ_i\(x\) with (\S+) "
        r"to (\S+)\.",
        found["1"],
    )
    assert spread, found["1"]
    for printed, value, decimals in zip(
        spread.groups(),
        [loc.std(0).min(), loc.std(0).max(), scale.std(0).min(), scale.std(0).max()],
        [3, 3, 4, 4],
        strict=True,
    ):
        assert_printed(printed, value.item(), decimals, "spread across the test set")

    # 2. μ_i(x) = w_i · h(x) + b_i with the read-out's first latent_dim rows.
    layer = pv.components.networks.output_layer(vae.encoder.net)
    captured = []
    handle = layer.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    vae.encoder(x)
    handle.remove()
    hidden, weight = captured[0], layer.weight[:3]
    torch.testing.assert_close(hidden @ weight.T + layer.bias[:3], loc, rtol=0, atol=1e-12)
    match = re.search(r"matches the encoder to (\S+)\.", found["2"])
    assert match and float(match.group(1)) < 1e-12, found["2"]
    rows = table_rows(found["2"], "test #")
    assert len(rows) == 5
    for n, row in enumerate(rows):
        assert_printed(row[0], hidden[n].mean().item(), 3, f"mean of h #{n}")
        for i in range(3):
            assert_printed(row[1 + i], loc[n, i].item(), 3, f"μ_{i + 1} #{n}")
    correlations = re.search(r"μ_i\(x\) is (\S+), (\S+), (\S+) for i = 1..3", found["2"])
    assert correlations, found["2"]
    for i, printed in enumerate(correlations.groups()):
        exact = torch.corrcoef(torch.stack([hidden.mean(1), loc[:, i]]))[0, 1]
        assert_printed(printed, exact.item(), 2, f"correlation {i + 1}")
    cosines = torch.nn.functional.cosine_similarity(weight[:, None], weight[None], dim=-1)
    off_diagonal = cosines[~torch.eye(3, dtype=torch.bool)]
    between = re.search(r"pairwise cosines lie between (\S+) and (\S+?)\.?$", found["2"], re.M)
    assert between, found["2"]
    assert_printed(between.group(1), off_diagonal.min().item(), 2, "smallest cosine")
    assert_printed(between.group(2), off_diagonal.max().item(), 2, "largest cosine")

    # 3. Draws from the guide for test input #0: their mean and std against μ(x) and σ(x).
    loc0, scale0 = loc[0], scale[0]
    rows = table_rows(found["3"], "z_")
    assert len(rows) == 3
    for i, row in enumerate(rows):
        mu, mean, se_mean, sigma, std, se_std = map(float, row)
        assert_printed(row[0], loc0[i].item(), 3, f"μ_{i + 1}(x)")
        assert_printed(row[3], scale0[i].item(), 3, f"σ_{i + 1}(x)")
        # The standard errors are those of a mean and of a Gaussian sample's std.
        assert abs(se_mean - std / num_draws**0.5) < 1e-3
        assert abs(se_std - std / (2 * (num_draws - 1)) ** 0.5) < 1e-3
        # The draws' moments within 4 standard errors (+ the table's rounding) of μ and σ.
        assert abs(mean - loc0[i].item()) < 4 * se_mean + 1e-3, (i, mean, mu)
        assert abs(std - scale0[i].item()) < 4 * se_std + 1e-3, (i, std, sigma)
    assert "within 4 standard errors of μ(x), σ(x) in every dimension: yes" in found["3"]


def test_the_report_counts_from_1_and_says_what_its_kl_numbers_and_active_units_mean(tmp_path):
    data = pv.load_dataset("digits", dtype=torch.float64)
    x = pv.binarize(data.x_test[:60], torch.Generator().manual_seed(0))
    vae = pv.VAE(64, 3, hidden_dims=(16,))
    report = pv.explain(vae, x, data.y_test[:60], data.image_shape, data.class_names, tmp_path, 100)
    found = sections(report.read_text())
    # Test inputs are numbered from 1, as latent dimensions are (z_1 is index 0), and the rows
    # are those of x[0], x[1], ... (their values are checked in the test above).
    for number in ("1", "2", "4"):
        lines = found[number].splitlines()
        firsts = [line.split("|")[1].strip() for line in lines if line.startswith("| test #")]
        assert firsts == [f"test #{n}" for n in range(1, 6)], number
    assert "For test input #1," in found["3"]

    # Section 5: one line for each of the three KL averages, saying what it is.
    bullets = [line for line in found["5"].splitlines() if line.startswith("- **")]
    assert [line.split("**")[1] for line in bullets] == [
        "Average KL term",
        "Mutual information",
        "Marginal KL",
    ]
    kl = pv.kl_per_dimension(vae, x)
    closed = re.search(r"in closed form (\S+):", bullets[0])
    assert closed, bullets[0]
    assert_printed(closed.group(1), kl.sum(1).mean().item(), 3, "closed-form average KL")
    estimates = [float(re.search(r"= (\S+) ±", line).group(1)) for line in bullets]
    assert abs(estimates[0] - estimates[1] - estimates[2]) <= 0.0015  # an identity, rounded

    # Section 6: the threshold, what passing it means, and the KL of each dimension.
    units = pv.active_units(vae, x)
    assert f"Cov_x(E_q[z_i | x]), exceeds {units.threshold:g}" in found["6"]
    assert "the mean moves with x, which is not the same as carrying information" in found["6"]
    rows = table_rows(found["6"], "z_")
    assert len(rows) == 3
    for i, row in enumerate(rows):
        assert_printed(row[0], units.variance[i].item(), 3, f"Cov_x of z_{i + 1}")
        assert_printed(row[1], kl[:, i].mean().item(), 3, f"average KL of z_{i + 1}")


# ---------------------------------------------------------------- section 7: the two gaps


def test_the_gap_section_gives_both_gaps_with_their_standard_errors_and_reads_them(tmp_path):
    vae, data, x = trained_digits_vae()
    report = pv.explain(
        vae, x, data.y_test[:60], data.image_shape, data.class_names, tmp_path, num_particles=50
    )
    section = sections(report.read_text())["7"]
    assert section.startswith("7. How good are μ(x) and σ(x)?")
    bullets = [line for line in section.splitlines() if line.startswith("- **")]
    assert [line.split("**")[1] for line in bullets] == ["amortization gap", "approximation gap"]
    amortization, approximation = (
        tuple(map(float, re.search(r"\*\*(\S+) ± (\S+)\*\*", line).groups())) for line in bullets
    )
    # The table's last row is the mean over the inputs; the bullets print its two gaps.
    (mean_row,) = table_rows(section, "mean of 60")
    means = [tuple(map(float, cell.split(" ± "))) for cell in mean_row]
    assert means[3] == amortization and means[4] == approximation
    encoder_elbo, optimized_elbo, log_p = (m[0] for m in means[:3])
    assert abs(optimized_elbo - encoder_elbo - amortization[0]) <= 0.0015  # rounded to 3
    assert abs(log_p - optimized_elbo - approximation[0]) <= 0.0015
    # Each per-input row too: the gaps are the differences of its ELBOs and bound.
    rows = table_rows(section, "test #")
    assert len(rows) == 5
    for row in rows:
        encoder_elbo, optimized_elbo, log_p, gap_a, gap_b = map(float, row)
        assert abs(optimized_elbo - encoder_elbo - gap_a) <= 0.0015
        assert abs(log_p - optimized_elbo - gap_b) <= 0.0015
    assert re.search(r"Converged: \d+ of 60 inputs", section)
    assert "![inference gaps](inference_gaps.png)" in section
    assert (tmp_path / "inference_gaps.png").read_bytes()[:4] == b"\x89PNG"


def test_an_encoder_without_sigma_gets_the_gap_section_marked(tmp_path):
    vae = pv.VAE(6, 2, encoder=pv.DeltaEncoder(6, 2, hidden_dims=(8,)), hidden_dims=(8,))
    x = torch.bernoulli(torch.full((20, 6), 0.5))
    report = pv.explain(vae, x, torch.arange(20) % 2, (2, 3), ["a", "b"], tmp_path, 50)
    section = sections(report.read_text())["7"]
    assert "Not measured" in section and "σ(x) > 0" in section
    assert not (tmp_path / "inference_gaps.png").exists()
