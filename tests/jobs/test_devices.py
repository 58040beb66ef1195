"""A run trained on a GPU, read back on a machine without one (issue 23, item 1): resumed on the
CPU with --device cpu, saying that it cannot be bit-identical, refused in one line without it;
evaluated and explained on the CPU.

No GPU is needed: the checkpoints are made on the CPU and then rewritten as a GPU run writes
them (saved device "cuda", its generator's 16-byte Philox state, the CUDA random states, and
every tensor's storage marked as on cuda:0, which torch.load refuses on a CPU-only machine
unless the tensors are mapped to the CPU).
"""

import io
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.jobs import load_run
from pyro_vae.jobs.runs import carry_random_states

pytestmark = pytest.mark.usefixtures("float32")
train_script, evaluate_script, explain_script = map(load_script, ("train", "evaluate", "explain"))

TINY = (
    *("--latent-dim", "2", "--hidden-dims", "8", "--num-iw-particles", "0"),
    *("--no-progress", "--num-threads", "1"),
)
# A CUDA generator's state: its seed and offset, 8 bytes each.
PHILOX_STATE = torch.zeros(16, dtype=torch.uint8)


def as_if_written_on_a_gpu(path: Path) -> None:
    """Rewrite the checkpoint at ``path`` as a run on a GPU writes it."""
    payload = torch.load(path, weights_only=True)
    if "args" in payload:
        payload["args"]["device"] = "cuda"
    if "training" in payload:
        payload["training"]["generator_rng"] = PHILOX_STATE.clone()
        payload["training"]["cuda_rng"] = [PHILOX_STATE.clone()]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    archive = zipfile.ZipFile(buffer)
    rewritten = io.BytesIO()
    with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_STORED) as out:
        for name in archive.namelist():
            data = archive.read(name)
            if name.endswith("data.pkl"):
                # Every storage's location, a pickled 'cpu' (memoized: written once).
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(name, data)
    path.write_bytes(rewritten.getvalue())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # what torch.load does unmapped
            torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> Path:
    """A finished one-epoch run of 2, its checkpoints rewritten as a GPU writes them."""
    torch.set_default_dtype(torch.float32)
    out = tmp_path_factory.mktemp("gpu") / "run"
    assert train_script.run([*TINY, "--num-epochs", "1", "--out-dir", str(out)]) == 0
    for name in ("checkpoint.pt", "best.pt"):
        as_if_written_on_a_gpu(out / name)
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_run_resumed_on_a_cpu_machine_needs_device_cpu(gpu_run, tmp_path, capsys):
    run = copy_of(gpu_run, tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    code, out, err = call(train_script, "--resume", str(run), "--num-epochs", "2", capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and out == "", err
    assert "trained on cuda" in err and f"--resume {run} --device cpu" in err, err
    assert "bit-identical" in err
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_run_goes_on_on_the_cpu_and_says_it_cannot_be_bit_identical(
    gpu_run, tmp_path, capsys
):
    finished = []
    for attempt in ("first", "second"):
        run = copy_of(gpu_run, tmp_path / attempt)
        code, out, err = call(
            train_script,
            *("--resume", str(run), "--num-epochs", "2", "--device", "cpu"),
            capsys=capsys,
        )
        assert code == 0, err
        notes = [line for line in out.splitlines() if "bit-identical" in line]
        assert len(notes) == 1 and "trained on cuda and goes on on cpu" in notes[0], out
        assert "epoch   2/2" in out
        model, payload = pv.load_checkpoint(run / "checkpoint.pt")
        # The run is now a CPU run: a later resume needs no --device.
        assert payload["args"]["device"] == "cpu" and payload["epoch"] == 2
        assert payload["training"]["generator_rng"].numel() == torch.get_rng_state().numel()
        finished.append(model.state_dict())
    # The generator starts afresh from the seed and the position: the same every time.
    for name, value in finished[0].items():
        assert torch.equal(value, finished[1][name]), name


def test_a_resume_on_the_same_kind_of_device_carries_every_state_over():
    training = {"epoch": 3, "step": 0, "generator_rng": torch.get_rng_state()}
    assert carry_random_states(training, "cpu", "cpu", 0) == (training, None)
    mapped, note = carry_random_states(
        {"epoch": 3, "step": 2, "generator_rng": PHILOX_STATE, "rank_states": None},
        "cuda:0",
        "cpu",
        7,
    )
    assert note is not None and "cannot be bit-identical" in note
    assert mapped["generator_rng"].numel() == torch.get_rng_state().numel()
    again, _ = carry_random_states(
        {"epoch": 3, "step": 2, "generator_rng": PHILOX_STATE, "rank_states": None},
        "cuda:0",
        "cpu",
        7,
    )
    assert torch.equal(mapped["generator_rng"], again["generator_rng"])


def test_a_gpu_run_is_evaluated_and_explained_on_the_cpu(gpu_run, tmp_path, capsys):
    run = copy_of(gpu_run, tmp_path)
    loaded = load_run(run)
    assert loaded.args["device"] == "cuda"
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    code, _, err = call(
        evaluate_script,
        *(str(run), "--num-iw-particles", "5", "--no-progress", "--max-examples", "50"),
        capsys=capsys,
    )
    assert code == 0, err
    assert (run / "evaluation.json").is_file()
    code, _, err = call(explain_script, str(run), "--num-particles", "50", capsys=capsys)
    assert code == 0, err
    assert (run / "explain" / "report.md").is_file()
