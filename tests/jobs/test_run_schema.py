"""The schema of a run's checkpoint (pyro_vae/jobs/run_schema.py): what scripts/train.py
stores beside the weights passes, and each crafted entry is refused with one line naming the
file and the entry, fast, before anything uses it."""

import copy
import io
import time
from pathlib import Path

import pytest
import torch
from scripts_in_process import call, load_script

import pyro_vae as pv
from pyro_vae.jobs import run_schema
from pyro_vae.jobs.run_schema import check_run_payload
from pyro_vae.jobs.runs import run_arguments

PATH = Path("runs/digits/checkpoint.pt")
train_script = load_script("train")


@pytest.fixture(scope="module")
def saved_states() -> list[dict]:
    """What fit hands its checkpoint, as to_dict() gives it to the file: 2 steps into epoch 1
    (with its shuffle), then the end of epoch 1."""
    states = []
    torch.manual_seed(0)
    vae = pv.VAE(6, 2, hidden_dims=(4,))
    pv.fit(
        vae,
        torch.bernoulli(torch.full((12, 6), 0.5)),
        num_epochs=1,
        batch_size=4,
        checkpoint_every=2,
        checkpoint=lambda state: states.append(copy.deepcopy(state.to_dict())),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert [(s["epoch"], s["step"]) for s in states] == [(0, 2), (1, 0)]
    return states


def payload_of(states: list[dict], kind: str = "vae", mid_epoch: bool = False) -> dict:
    """A checkpoint of scripts/train.py as load_checkpoint returns it."""
    argv = ["--model", kind, "--num-epochs", "2"] + (["--num-labelled", "100"] * (kind == "m2"))
    training = copy.deepcopy(states[0 if mid_epoch else 1])
    payload = {
        "format": "pyro_vae.checkpoint/1",
        "config": {"model": kind} if kind != "vae" else {"data_dim": 6, "latent_dim": 2},
        "state_dict": {},
        "epoch": training["epoch"],
        "step": training["step"],
        "metrics": [
            {"epoch": 1, "train_loss": 45.7, "val_elbo": -45.0, "val_kl": 0.45, "seconds": 0.03}
        ][: training["epoch"]],
        "args": run_arguments(train_script.parse_args(argv)),
        "training": training,
        "evaluation_digest": "0123456789abcdef" * 4,
        "validation_indices": torch.arange(0, 144, 3),
    }
    if kind == "m2":
        payload["labelled_indices"] = torch.tensor([5, 2, 9])
    return payload


@pytest.mark.parametrize("kind", ["vae", "m2", "cvae"])
@pytest.mark.parametrize("mid_epoch", [False, True], ids=["between-epochs", "mid-epoch"])
def test_what_train_py_stores_passes(saved_states, kind, mid_epoch):
    check_run_payload(payload_of(saved_states, kind, mid_epoch), PATH)


def _nested(depth: int) -> list:
    """A list nested ``depth`` times, each level twice the one below (shared): 2**depth
    leaves to anything that walks it, a few hundred bytes pickled."""
    nested: list = [0.0]
    for _ in range(depth):
        nested = [nested, nested]
    return nested


def _set(entry: str, *keys, value):
    def change(payload):
        target = payload[entry] if keys else payload
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1] if keys else entry] = value

    return change


def _delete(*keys):
    def change(payload):
        target = payload
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return change


CASES = {
    # The three crafted training entries of issue 23, and more of the same.
    "training-a-string": (_set("training", value="resume me"), r"'training' entry is a str"),
    "optimizer-without-param-groups": (
        _delete("training", "optimizer", "param_groups"),
        r"'training' entry 'optimizer' has no 'param_groups'",
    ),
    "rng-of-3-bytes": (
        _set("training", "torch_rng", value=torch.tensor([1, 2, 3], dtype=torch.uint8)),
        r"'training' entry 'torch_rng' is a 3-byte tensor, not a random state .*5056",
    ),
    "rng-of-floats": (
        _set("training", "torch_rng", value=torch.zeros(5056, dtype=torch.float64)),
        r"'torch_rng' is .*float64 tensor",
    ),
    "generator-of-3-bytes": (
        _set("training", "generator_rng", value=torch.zeros(3, dtype=torch.uint8)),
        r"'generator_rng' is a 3-byte tensor",
    ),
    "cuda-rng-not-a-list": (_set("training", "cuda_rng", value=7), r"'cuda_rng' is a int"),
    "one-rank": (
        _set("training", "rank_states", value=[{}]),
        r"'rank_states' holds 1 rank\(s\)",
    ),
    "history-of-lists": (
        _set("training", "history", "step_loss", value=[1.0, [2.0]]),
        r"'history' 'step_loss' holds a list at 1, not a number",
    ),
    "history-unknown-key": (
        _set("training", "history", "extra", value=1),
        r"'history' holds 'extra'",
    ),
    "optimizer-param-twice": (
        _set("training", "optimizer", "param_groups", value=[{"params": [0, 0], "lr": 1e-3}]),
        r"names a parameter twice",
    ),
    "optimizer-state-of-no-group": (
        _set("training", "optimizer", "state", 999, value={"step": torch.tensor(1.0)}),
        r"'state' holds 999, a parameter of no group",
    ),
    "position-disagrees": (_set("training", "epoch", value=7), r"says epoch 7, and the"),
    "training-key-missing": (_delete("training", "history"), r"has no 'history'"),
    # The metrics bomb of issue 23: a nested list planted in a row, or as the rows.
    "metrics-nested-list": (_set("metrics", value=_nested(2000)), r"'metrics' entry row 1 is"),
    "metrics-row-nested": (
        _set("metrics", value=[{"epoch": 1, "val_elbo": _nested(2000)}]),
        r"row 1's 'val_elbo' is a list, not a number or a name \(rows are flat\)",
    ),
    "metrics-too-many-rows": (
        _set("metrics", value=[{"epoch": 1}] * (run_schema.MAX_ROWS + 1)),
        r"'metrics' entry holds 1000001 entries",
    ),
    "metrics-epochs-not-rising": (
        _set("metrics", value=[{"epoch": 1}, {"epoch": 1}]),
        r"row 2's 'epoch' is 1, not an epoch after",
    ),
    "metrics-a-dict": (_set("metrics", value={"epoch": 1}), r"'metrics' entry is a dict"),
    "digest-short": (_set("evaluation_digest", value="abc"), r"'evaluation_digest' entry is 'abc'"),
    "digest-upper": (
        _set("evaluation_digest", value="A" * 64),
        r"not a SHA-256 \(64 hexadecimal digits\)",
    ),
    "labelled-float64": (
        _set("labelled_indices", value=torch.tensor([5.0, 2.0, 9.0], dtype=torch.float64)),
        r"'labelled_indices' entry is a torch.float64 tensor .*not row indices",
    ),
    "labelled-2d": (
        _set("labelled_indices", value=torch.zeros(2, 2, dtype=torch.long)),
        r"'labelled_indices' entry is a torch.int64 tensor of shape \(2, 2\)",
    ),
    "labelled-negative": (
        _set("labelled_indices", value=torch.tensor([-1, 2])),
        r"holds the negative row -1",
    ),
    "validation-twice": (
        _set("validation_indices", value=torch.tensor([3, 3])),
        r"'validation_indices' entry names a row twice",
    ),
    "m2-without-labels": (
        _delete("labelled_indices"),
        r"holds no 'labelled_indices'; it was not written by train.py",
    ),
    "args-nested": (_set("args", "hidden_dims", value=[[8]]), r"'hidden_dims' holds a list at 0"),
    "args-seed-a-bool": (_set("args", "seed", value=True), r"'seed' is True, not a seed"),
    "args-no-dataset": (_delete("args", "dataset"), r"'args' entry has no 'dataset'"),
    "args-not-a-device": (
        _set("args", "device", value="gpu!"),
        r"'device' is 'gpu!', not a device",
    ),
    "args-other-model": (_set("args", "model", value="vae"), r"'model' is 'vae', and the config"),
    "args-a-tensor": (
        _set("args", "beta", value=torch.ones(3, dtype=torch.float64)),
        r"'beta' is a torch.float64",
    ),
    "epoch-negative": (_set("epoch", value=-1), r"its 'epoch' is -1, not a count"),
    "unknown-entry": (_set("surprise", value=1), r"holds 'surprise', an entry no run"),
    "no-digest": (_delete("evaluation_digest"), r"holds no 'evaluation_digest'.*train them again"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_crafted_entry_is_refused_with_one_line_naming_the_file_and_the_entry(
    saved_states, case
):
    change, message = CASES[case]
    payload = payload_of(saved_states, "m2", mid_epoch=True)
    change(payload)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message) as refused:
        check_run_payload(payload, PATH)
    assert time.perf_counter() - started < 0.5
    text = str(refused.value)
    assert text.startswith(f"{PATH}: ") and "\n" not in text and len(text) < 300, text


def test_a_shuffle_that_is_no_permutation_is_refused(saved_states):
    payload = payload_of(saved_states, mid_epoch=True)
    payload["training"]["order"] = torch.tensor([0, 0, 1, *range(3, 12)])
    with pytest.raises(ValueError, match=r"'order' is no permutation of 0..11"):
        check_run_payload(payload, PATH)
    payload["training"]["order"] = None  # mid-epoch: its shuffle is needed
    with pytest.raises(ValueError, match=r"'order' is None, not a shuffle"):
        check_run_payload(payload, PATH)


def test_a_metrics_bomb_read_back_from_a_file_is_refused_at_once(saved_states):
    """A nested list 60 levels deep, each level the one below twice: a few kilobytes pickled
    (pickle keeps shared objects once), 2**60 values to anything that walks it, such as the
    metrics.json a resume rewrites from the checkpoint's rows."""
    payload = payload_of(saved_states)
    payload["metrics"] = [{"epoch": 1, "train_loss": _nested(60)}]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    assert buffer.tell() < 100_000
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"row 1's 'train_loss' is a list"):
        check_run_payload(loaded, PATH)
    assert time.perf_counter() - started < 0.1


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ("--model", "vae", "--num-iw-particles", "0"),
        ("--model", "m2", "--num-labelled", "100"),
        ("--model", "cvae", "--num-iw-particles", "2"),
    ],
    ids=["vae", "m2", "cvae"],
)
def test_the_checkpoints_train_py_writes_pass(flags, tmp_path, capsys, float32):
    out = tmp_path / "run"
    argv = (*flags, "--num-epochs", "1", "--latent-dim", "2", "--hidden-dims", "8")
    code, _, err = call(train_script, *argv, "--no-progress", "--out-dir", str(out), capsys=capsys)
    assert code == 0, err
    _, payload = pv.load_checkpoint(out / "checkpoint.pt")
    check_run_payload(payload, out / "checkpoint.pt")
