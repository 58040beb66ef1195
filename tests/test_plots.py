"""The figures say what they show: integer epochs, labelled rows, labelled prior contours,
latent dimensions numbered from 1 as in the report; and each is written whole or not at all."""

import math
import os

import matplotlib.figure
import matplotlib.image
import pytest
import torch

from pyro_vae import explain_plots, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics(num_epochs: int) -> list[dict]:
    return [
        {
            "epoch": epoch,
            "train_loss": 100.0 / epoch,
            "train_elbo": -90.0 / epoch,
            "val_elbo": -95.0 / epoch,
            "val_reconstruction": -80.0 / epoch,
            "val_kl": 5.0 + epoch,
        }
        for epoch in range(1, num_epochs + 1)
    ]


@pytest.mark.parametrize("num_epochs", [2, 3, 7])
def test_the_epoch_axis_has_only_whole_epochs(tmp_path, num_epochs):
    # Left to itself matplotlib puts ticks at 1.25, 1.5, ... over 1..3 epochs.
    fig = plots.plot_loss_curves(metrics(num_epochs), tmp_path / "loss.png")
    for ax in fig.axes:
        low, high = ax.get_xlim()
        visible = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(visible) >= 2, visible
        assert all(t == round(t) for t in visible), visible


def row_labels(ax) -> dict[str, float]:
    return {
        label.get_text(): tick
        for label, tick in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True)
    }


@pytest.mark.parametrize(
    ("binary", "given", "expected"),
    [
        (True, None, "input (binary)"),
        (False, None, "input"),
        (True, "input (binarized)", "input (binarized)"),
    ],
)
def test_reconstruction_rows_are_labelled_at_their_rows(tmp_path, binary, given, expected):
    h, w = 8, 6
    inputs = torch.rand(4, h * w)
    if binary:
        inputs = torch.bernoulli(inputs)
    fig = plots.plot_reconstructions(
        inputs, torch.rand(4, h * w), (h, w), tmp_path / "r.png", input_label=given
    )
    labels = row_labels(fig.axes[0])
    assert set(labels) == {expected, "reconstruction\n(mean)"}
    # The image's first h pixel rows are the inputs; after a 1-pixel gap, the reconstructions.
    assert 0 <= labels[expected] <= h - 1
    assert h + 1 <= labels["reconstruction\n(mean)"] <= 2 * h


def test_weight_spread_labels_binary_inputs(tmp_path):
    inputs = torch.bernoulli(torch.full((3, 12), 0.5))
    fig = plots.plot_weight_spread(
        inputs, torch.rand(3, 12), torch.rand(3, 12), (3, 4), tmp_path / "w.png"
    )
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "input (binary)",
        "mean reconstruction",
        "std over weights",
    ]


def test_prior_contours_are_circles_labelled_with_the_mass_they_hold(tmp_path):
    z = torch.randn(50, 3)
    labels = torch.arange(50) % 2
    fig = explain_plots.plot_aggregate_posterior(z, labels, ["a", "b"], (0, 2), tmp_path / "a.png")
    ax = fig.axes[0]
    (contours,) = [c for c in ax.collections if hasattr(c, "levels")]
    assert list(contours.levels) == [1.0, 2.0, 3.0]
    for radius, path in zip(contours.levels, contours.get_paths(), strict=True):
        norms = torch.as_tensor(path.vertices).norm(dim=1)
        assert (norms - radius).abs().max() < 0.05  # the grid's spacing is 7/199
    # The mass of N(0, I) in 2-D within each circle, measured by sampling (SE < 0.0016).
    draws = torch.randn(100_000, 2, generator=torch.Generator().manual_seed(0)).norm(dim=1)
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 3
    for radius, text in zip((1, 2, 3), texts, strict=True):
        mass = float((draws <= radius).double().mean())
        printed = float(text.split("(")[1].rstrip("%)")) / 100
        assert text.startswith(f"{radius}σ")
        assert abs(printed - mass) < 0.005 + 5 * math.sqrt(mass * (1 - mass) / len(draws))
    legends = [child for child in ax.get_children() if type(child).__name__ == "Legend"]
    titles = " ".join(legend.get_title().get_text() for legend in legends)
    entries = " ".join(t.get_text() for legend in legends for t in legend.get_texts())
    assert "q(z)" in titles and {"a", "b"} <= set(entries.split())
    assert "p(z) = N(0, I)" in entries
    assert [ax.get_xlabel(), ax.get_ylabel()] == ["z_1", "z_3"]


def test_prior_contours_do_not_claim_to_be_another_models_prior(tmp_path):
    fig = explain_plots.plot_aggregate_posterior(
        torch.randn(20, 2), torch.zeros(20), ["a"], (0, 1), tmp_path / "a.png", standard_prior=False
    )
    ax = fig.axes[0]
    texts = [ax.get_title()] + [
        t.get_text()
        for child in ax.get_children()
        if type(child).__name__ == "Legend"
        for t in child.get_texts()
    ]
    assert not any("p(z)" in text for text in texts), texts


def test_latent_dimensions_are_numbered_from_one_as_in_the_report(tmp_path):
    cloud = explain_plots.plot_point_cloud(
        torch.randn(100, 4), torch.zeros(4), torch.ones(4), (0, 3), tmp_path / "c.png"
    )
    assert [cloud.axes[0].get_xlabel(), cloud.axes[0].get_ylabel()] == ["z_1", "z_4"]

    traversal = explain_plots.plot_traversal(
        torch.rand(6, 12), [2, 0], torch.linspace(-1, 1, 3), (3, 4), tmp_path / "t.png"
    )
    assert list(row_labels(traversal.axes[0])) == ["z_3", "z_1"]

    kl = explain_plots.plot_kl_per_dimension(
        torch.tensor([0.5, 0.0, 2.0]), torch.tensor([0.1, 1e-4, 0.3]), 0.01, tmp_path / "k.png"
    )
    for ax in kl.axes:
        bars = [patch.get_x() + patch.get_width() / 2 for patch in ax.patches]
        assert bars == [1, 2, 3]
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks == [1, 2, 3]
    (threshold,) = kl.axes[1].get_legend().get_texts()
    assert "0.01" in threshold.get_text()


def test_every_figure_is_a_whole_png_and_leaves_nothing_else(tmp_path):
    x = torch.bernoulli(torch.full((10, 12), 0.5))
    z = torch.randn(30, 2)
    labels = torch.arange(30) % 3
    figures = {
        "reconstructions": lambda p: plots.plot_reconstructions(x, x / 2, (3, 4), p),
        "samples": lambda p: plots.plot_samples(torch.rand(16, 12), (3, 4), p),
        "latent_space": lambda p: plots.plot_latent_space(torch.randn(30, 3), labels, "abc", p),
        "loss_curves": lambda p: plots.plot_loss_curves(metrics(3), p),
        "weights": lambda p: plots.plot_weight_spread(x, x, x / 3, (3, 4), p),
        "cloud": lambda p: explain_plots.plot_point_cloud(z, z[0], z[1].abs(), (0, 1), p),
        "aggregate": lambda p: explain_plots.plot_aggregate_posterior(z, labels, "abc", (0, 1), p),
        "traversal": lambda p: explain_plots.plot_traversal(
            x[:6], [0, 1], torch.ones(3), (3, 4), p
        ),
        "kl": lambda p: explain_plots.plot_kl_per_dimension(torch.ones(2), torch.ones(2), 0.01, p),
    }
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    for name, draw in figures.items():
        path = tmp_path / f"{name}.png"
        assert isinstance(draw(path), matplotlib.figure.Figure)
        assert path.read_bytes().startswith(PNG_SIGNATURE), name
        image = matplotlib.image.imread(path)  # decodes every chunk: a truncated file fails
        assert image.ndim == 3 and min(image.shape[:2]) > 20, name
        # Readable as open() would have made it, not private like a temporary file.
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}.png" for name in figures)


def test_a_figure_that_fails_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "loss.png"
    plots.plot_loss_curves(metrics(2), path)
    before = path.read_bytes()

    def fails_half_way(self, file, **kwargs):
        file.write(PNG_SIGNATURE + b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fails_half_way)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_loss_curves(metrics(3), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["loss.png"]  # no temporary file left behind
