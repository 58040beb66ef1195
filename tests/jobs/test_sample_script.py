"""scripts/sample.py on a tiny VAE, M2 and CVAE run, in this process: the files it writes, in
the data's image shape, hold exactly the draws recomputed here from the run's model with the
same seed; bad input is one line, exit 2, and nothing written."""

from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.jobs import load_run

train_script = load_script("train")
sample_script = load_script("sample")
SEED = 3
SHAPE = (8, 8)  # digits
TINY = ("--latent-dim", "3", "--hidden-dims", "16", "--num-epochs", "2", "--no-progress",
        "--seed", str(SEED))  # fmt: skip
RUNS = {
    "vae": (*TINY, "--num-iw-particles", "5"),
    "m2": ("--model", "m2", "--num-labelled", "30", *TINY),
    "cvae": ("--model", "cvae", "--given-quadrants", "1", "--num-iw-particles", "5", *TINY),
}

# Every test here runs the scripts, in float32 (conftest.py).
pytestmark = pytest.mark.usefixtures("float32")


class Runs(dict):
    """One finished tiny run of each kind (a few seconds each), made the first time a test
    asks for it."""

    def __init__(self, tmp_path_factory) -> None:
        super().__init__()
        self.factory = tmp_path_factory

    def __missing__(self, kind: str) -> Path:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        out = self.factory.mktemp(kind) / "run"
        try:
            assert train_script.run([*RUNS[kind], "--out-dir", str(out)]) == 0
        finally:
            torch.set_default_dtype(previous)
        self[kind] = out
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory)


def sample(*argv: str, capsys) -> tuple[int, str, str]:
    return call(sample_script, *argv, capsys=capsys)


def drawn(run_dir: Path, name: str, *argv: str, capsys, out: Path | None = None) -> np.ndarray:
    out = out or run_dir / "samples"
    code, stdout, err = sample(str(run_dir), *argv, "--out", str(out), capsys=capsys)
    assert code == 0, err
    assert f"written {out / name}.npy" in stdout and (out / f"{name}.png").is_file()
    return np.load(out / f"{name}.npy")


def test_vae_prior_samples_are_the_models_draws_with_the_seed(runs, capsys, tmp_path):
    values = drawn(runs["vae"], "prior", "--seed", "7", "--num-samples", "13", capsys=capsys)
    assert values.shape == (13, *SHAPE)
    run = load_run(runs["vae"])
    pyro.set_rng_seed(7)
    expected = run.model.sample(13).reshape(13, *SHAPE)
    np.testing.assert_array_equal(values, expected.numpy())
    # One seed, one set of draws; another seed, others.
    again = drawn(runs["vae"], "prior", "--seed", "7", "--num-samples", "13", capsys=capsys,
                  out=tmp_path / "again")  # fmt: skip
    other = drawn(runs["vae"], "prior", "--seed", "8", "--num-samples", "13", capsys=capsys,
                  out=tmp_path / "other")  # fmt: skip
    np.testing.assert_array_equal(values, again)
    assert not np.array_equal(values, other)


def test_the_default_is_64_prior_samples_under_the_run_directory(runs, capsys):
    code, _, err = sample(str(runs["vae"]), capsys=capsys)
    assert code == 0, err
    assert np.load(runs["vae"] / "samples" / "prior.npy").shape == (64, *SHAPE)


def test_vae_interpolation_runs_from_one_mu_to_the_other(runs, capsys):
    values = drawn(
        runs["vae"], "interpolation", "--interpolate", "--images", "4,9", "--num-samples", "5",
        capsys=capsys,
    )  # fmt: skip
    assert values.shape == (5, *SHAPE)
    run = load_run(runs["vae"])
    vae = run.model
    with torch.no_grad():
        loc, _ = vae.encode(run.x_test[[4, 9]])
        points = torch.stack([loc[0], 0.75 * loc[0] + 0.25 * loc[1], loc.mean(0), loc[1]])
        expected = vae.likelihood(vae.decode(points)).mean.reshape(4, *SHAPE).numpy()
    np.testing.assert_allclose(values[[0, 1, 2, 4]], expected, rtol=1e-5, atol=1e-6)


def test_m2_draws_a_row_per_class_with_the_same_z_in_every_row(runs, capsys):
    values = drawn(runs["m2"], "classes", "--num-samples", "4", "--seed", "5", capsys=capsys)
    run = load_run(runs["m2"])
    m2 = run.model
    assert values.shape == (m2.num_labels, 4, *SHAPE)
    torch.manual_seed(5)
    z = torch.randn(4, m2.latent_dim)
    for k in range(m2.num_labels):
        row = m2.decode(z, torch.full((4,), k)).reshape(4, *SHAPE)
        np.testing.assert_allclose(values[k], row.numpy(), rtol=1e-5, atol=1e-6)


def test_cvae_completes_the_test_images_keeping_their_given_pixels(runs, capsys):
    values = drawn(
        runs["cvae"], "completions", "--images", "2,0,7", "--num-samples", "3", "--seed", "1",
        capsys=capsys,
    )  # fmt: skip
    assert values.shape == (3, 3, *SHAPE)
    run = load_run(runs["cvae"])
    cvae, images = run.model, run.data.x_test[[2, 0, 7]]
    mask = pv.quadrant_mask(SHAPE, 1)
    _, c = pv.split_by_mask(images, mask)
    pyro.set_rng_seed(1)
    completed = cvae.sample(c, 3)  # (draws, images, missing pixels)
    for i in range(3):
        for k in range(3):
            expected = pv.merge_by_mask(completed[k, i : i + 1], c[i : i + 1], mask)
            np.testing.assert_allclose(
                values[i, k].reshape(-1), expected[0].numpy(), rtol=1e-5, atol=1e-6
            )
            # The given pixels are the test image's own.
            flat = values[i, k].reshape(-1)
            np.testing.assert_array_equal(flat[mask.numpy()], images[i][mask].numpy())


def test_a_run_of_unusual_image_shape_is_drawn_in_that_shape(tmp_path, capsys):
    # Colour images (3, 6, 4) from a .npy: the draws come back (N, 3, 6, 4).
    images = torch.rand(60, 3, 6, 4, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "colour.npy", images.numpy())
    out = tmp_path / "run"
    code, _, err = call(train_script, "--dataset", str(tmp_path / "colour.npy"),
                        "--likelihood", "normal", *TINY, "--out-dir", str(out),
                        capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert drawn(out, "prior", "--num-samples", "3", capsys=capsys).shape == (3, 3, 6, 4)
    values = drawn(out, "interpolation", "--interpolate", capsys=capsys)
    assert values.shape == (10, 3, 6, 4)


BAD = [
    ("{missing}", "no such run directory"),
    ("{not_a_run}", "no checkpoint.pt there"),
    ("{vae} --num-samples 0", "expected a positive integer"),
    ("{vae} --num-samples -3", "expected a positive integer"),
    ("{vae} --num-samples 10001", "more than 10000"),
    ("{m2} --num-samples 1001", "more than 10000"),
    ("{vae} --interpolate --num-samples 1", "give 2 or more"),
    ("{vae} --interpolate --images 1,2,3", "joins two test images, got 3"),
    ("{vae} --interpolate --images 1,360", "test image 360 is not there"),
    ("{vae} --images 1,2", "--images chooses the ends of --interpolate"),
    ("{cvae} --images 5,-1", "indices of 0 or more"),
    ("{cvae} --images 5,x", "separated by commas"),
    ("{m2} --interpolate", "--interpolate is for a VAE run"),
    ("{m2} --images 1", "M2 draws a row per class"),
    ("{vae} --seed -1", "--seed"),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(runs, tmp_path, capsys, argv, message):
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "notes.txt").write_text("mine")
    kinds = [kind for kind in RUNS if "{" + kind + "}" in argv]
    places = {kind: str(runs[kind]) for kind in kinds}
    places.update(missing=str(tmp_path / "missing"), not_a_run=str(tmp_path / "not_a_run"))
    before = {kind: sorted(p.name for p in runs[kind].iterdir()) for kind in kinds}
    out = tmp_path / "out"
    capsys.readouterr()  # what the training of a run said, if it was made just now
    code, stdout, err = sample(*argv.format(**places).split(), "--out", str(out), capsys=capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sample.py: error: ") and message in err, err
    assert stdout == ""
    assert not out.exists()
    assert {kind: sorted(p.name for p in runs[kind].iterdir()) for kind in kinds} == before
    assert sorted(p.name for p in (tmp_path / "not_a_run").iterdir()) == ["notes.txt"]


def test_out_that_is_a_file_is_refused(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = sample(str(runs["vae"]), "--out", str(tmp_path / "file"), capsys=capsys)
    assert code == 2 and "is a file, not a directory" in err
