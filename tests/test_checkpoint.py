"""Checkpoints: what load_checkpoint refuses (damaged, hostile or malformed files), before
building anything, with a ValueError naming the file and the problem; and what save_checkpoint
refuses before writing. Files are crafted here with torch.save and zipfile directly."""

import itertools
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_vae as pv
from pyro_vae import checkpoint
from pyro_vae.models.build import ENCODER_NAMES, LIKELIHOOD_NAMES, PRIOR_NAMES, least_weights

CONFIG = {"data_dim": 64, "latent_dim": 3, "hidden_dims": [16], "image_shape": [8, 8]}

# Every (network, decoder) pair build_vae builds: a Bayesian decoder is an MLP.
ARCHITECTURES = [("mlp", "deterministic"), ("conv", "deterministic"), ("mlp", "bayesian")]


def architecture(config: dict, network: str, decoder: str) -> dict:
    """``config`` with that network and decoder; conv's layers are fixed, so no hidden_dims."""
    config = dict(config, network=network, decoder=decoder)
    if network == "conv":
        config.pop("hidden_dims", None)
    return config


def small_vae() -> pv.VAE:
    return pv.build_vae(**CONFIG)


def saved(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "checkpoint.pt"
    pv.save_checkpoint(path, small_vae(), CONFIG, **extra)
    return path


def payload_of(vae: pv.VAE, **changes) -> dict:
    """A checkpoint's payload as save_checkpoint writes it, with ``changes``."""
    payload = {"format": checkpoint.FORMAT, "config": dict(CONFIG), "state_dict": vae.state_dict()}
    return payload | changes


def crafted(tmp_path: Path, payload: object) -> Path:
    """``payload`` written with torch.save directly, past save_checkpoint's checks."""
    path = tmp_path / "crafted.pt"
    torch.save(payload, path)
    return path


def rezip(path: Path, edit=lambda name, data: data, compression=zipfile.ZIP_STORED) -> None:
    """Rewrite the archive at ``path`` member by member, with fresh CRCs."""
    with zipfile.ZipFile(path) as source:
        members = [
            (info.filename, edit(info.filename, source.read(info))) for info in source.infolist()
        ]
    with zipfile.ZipFile(path, "w", compression) as target:
        for name, data in members:
            target.writestr(name, data)


def refused(path: Path, match: str) -> str:
    """load_checkpoint's one-line message for ``path``, which names the file."""
    with pytest.raises(ValueError, match=match) as error:
        pv.load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    return message


def test_a_saved_model_of_every_kind_loads_back_exactly(tmp_path):
    # Each component at least once, so that no legitimate checkpoint fails the size checks.
    parts = zip(
        itertools.product(PRIOR_NAMES, ENCODER_NAMES),
        itertools.cycle(LIKELIHOOD_NAMES),
        itertools.cycle(ARCHITECTURES),
        strict=False,
    )
    for (prior, encoder), likelihood, (network, decoder) in parts:
        config = dict(CONFIG, prior=prior, encoder=encoder, likelihood=likelihood)
        config = architecture(config, network, decoder)
        try:
            vae = pv.build_vae(**config)
        except ValueError:
            continue  # a combination build_vae refuses
        pv.save_checkpoint(tmp_path / "c.pt", vae, config, epoch=3)
        loaded, payload = pv.load_checkpoint(tmp_path / "c.pt")
        assert payload["epoch"] == 3
        for name, value in vae.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), (config, name)


# Configs as pyro_vae 0.1 saved them, and the same models in today's names.
VERSION_0_1 = [
    (
        dict(CONFIG, decoder="conv", likelihood="discretized-logistic", num_bins=17),
        {
            "data_dim": 64,
            "latent_dim": 3,
            "image_shape": [8, 8],
            "network": "conv",
            "decoder": "deterministic",
            "likelihood": "discretized-logistic",
            "num_levels": 17,
        },
    ),
    (dict(CONFIG, decoder="mlp"), dict(CONFIG, network="mlp", decoder="deterministic")),
    (
        dict(CONFIG, decoder="bayesian-mlp", prior_scale=0.5),
        dict(CONFIG, network="mlp", decoder="bayesian", prior_scale=0.5),
    ),
]


@pytest.mark.parametrize(("old", "new"), VERSION_0_1, ids=["conv", "mlp", "bayesian-mlp"])
def test_a_checkpoint_of_version_0_1_loads_in_todays_names(tmp_path, old, new):
    """0.1's decoder="conv" built a conv encoder network too (and ignored hidden_dims); its
    checkpoints load as network="conv", with every weight in place."""
    vae = pv.build_vae(**new)
    path = crafted(tmp_path, payload_of(vae, config=old))
    loaded, payload = pv.load_checkpoint(path)
    assert payload["config"] == new
    assert type(loaded.encoder.net) is type(vae.encoder.net)
    assert type(loaded.decoder) is type(vae.decoder)
    for name, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def sizes(config: dict) -> tuple[int, int, int]:
    """The size bound of ``config``, and what its model stores and allocates."""
    vae = pv.build_vae(**config)
    stored = sum(v.numel() for v in vae.state_dict().values())
    allocated = sum(t.numel() for t in itertools.chain(vae.parameters(), vae.buffers()))
    return least_weights(config), stored, allocated


# Each size a crafted config could inflate, from a small model to a larger one.
GROWTH = {
    "latent_dim": {"latent_dim": 16},
    "hidden_dims": {"hidden_dims": [128]},
    "image": {"image_shape": [1, 24, 24], "data_dim": 576},
    "channels": {"image_shape": [16, 8, 8], "data_dim": 1024},
    "flow_depth": {"flow_depth": 6},
    "num_components": {"num_components": 100},
}


@pytest.mark.parametrize(("network", "decoder"), ARCHITECTURES)
@pytest.mark.parametrize(
    ("prior", "encoder"),
    # The VampPrior refuses encoders without a density everywhere (tested in test_components).
    [
        (p, e)
        for p in PRIOR_NAMES
        for e in ENCODER_NAMES
        if (p, e) not in {("vamp", "iaf"), ("vamp", "delta")}
    ],
)
def test_the_size_bound_is_below_the_true_size_and_grows_with_it(prior, encoder, network, decoder):
    # Below: no real checkpoint is refused. Growing with it, within a factor: a config that
    # passes the bound cannot make building allocate much more than the checkpoint stores.
    base = {
        "data_dim": 64,
        "latent_dim": 4,
        "hidden_dims": [16],
        "image_shape": [1, 8, 8],
        "prior": prior,
        "encoder": encoder,
        "likelihood": "normal",
        "likelihood_scale": "learned-per-feature",
    }
    base = architecture(base, network, decoder)
    if prior in ("mixture", "vamp"):
        base["num_components"] = 10
    least, stored, allocated = sizes(base)
    assert least <= stored
    irrelevant = {  # knobs this model does not use: they would only repeat the base
        "hidden_dims": network == "conv",
        "channels": network != "conv",
        "flow_depth": prior != "flow" and encoder != "iaf",
        "num_components": "num_components" not in base,
    }
    for knob, changes in GROWTH.items():
        if irrelevant.get(knob):
            continue
        grown_least, grown_stored, grown_allocated = sizes(base | changes)
        assert grown_least <= grown_stored, knob
        assert grown_allocated - allocated <= 4 * (grown_least - least), knob


# ---------------------------------------------------------------- damage


def test_a_flipped_sign_bit_in_a_weight_is_refused_as_corrupt(tmp_path):
    vae = small_vae()
    path = tmp_path / "checkpoint.pt"
    pv.save_checkpoint(path, vae, CONFIG)
    weight = vae.state_dict()["decoder.0.weight"]
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    data[at + 7] ^= 0x80  # the sign bit of the first float64 (little-endian)
    path.write_bytes(bytes(data))
    # torch.load itself takes the damaged weight silently:
    loaded = torch.load(path, weights_only=True)["state_dict"]["decoder.0.weight"]
    assert loaded[0, 0] == -weight[0, 0]
    message = refused(path, r"corrupt: its member .* fails its CRC-32 check")
    assert "run code" not in message


def test_overwritten_optimizer_state_is_refused_as_corrupt(tmp_path):
    # 64 bytes of 0xFF in Adam's second moments read as NaN: resuming would "diverge".
    vae = small_vae()
    optimizer = torch.optim.Adam(vae.parameters())
    sum(p.sum() for p in vae.parameters()).backward()
    optimizer.step()
    path = saved(tmp_path, training={"optimizer": optimizer.state_dict()})
    moments = optimizer.state_dict()["state"][0]["exp_avg_sq"]
    data = bytearray(path.read_bytes())
    at = data.find(moments.numpy().tobytes())
    data[at : at + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    assert (
        torch.load(path, weights_only=True)["training"]["optimizer"]["state"][0]["exp_avg_sq"]
        .isnan()
        .any()
    )
    refused(path, "corrupt")


def write_not_a_zip(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(1000))


def write_empty(path: Path) -> None:
    path.write_bytes(b"")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def garbage_pickle(path: Path) -> None:
    rezip(path, lambda name, data: b"\x00garbage" * 10 if name.endswith("data.pkl") else data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (write_not_a_zip, "not a zip archive, which is what torch.save writes"),
        (write_empty, "the file is empty"),
        (truncate, "corrupt or truncated"),
        (garbage_pickle, "its pickled data are not a checkpoint's"),
    ],
    ids=["not-a-zip", "empty", "truncated", "garbage-pickle-with-valid-crcs"],
)
def test_garbage_is_not_reported_as_code(tmp_path, damage, message):
    path = saved(tmp_path)
    damage(path)
    assert "run code" not in refused(path, message)


def test_code_in_the_pickle_is_still_named_as_such(tmp_path):
    path = crafted(tmp_path, payload_of(small_vae(), epoch=object()))
    refused(path, "objects other than tensors and plain values, which could run code")


# ---------------------------------------------------------------- sizes


def test_a_compressed_member_is_refused_before_it_inflates(tmp_path):
    # 8 MB of zeros deflate to a few kB, which torch.load inflates without a second thought.
    path = saved(tmp_path, padding=torch.zeros(10**6))
    rezip(path, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000
    assert torch.load(path, weights_only=True)["padding"].shape == (10**6,)
    refused(path, r"its member .* is compressed")


def test_members_claiming_more_bytes_than_the_file_has_are_refused(tmp_path):
    path = saved(tmp_path)
    with zipfile.ZipFile(path) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
        # More directory entries for the same stored bytes: a small file read many times.
        alias = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
        for i in range(50):
            entry = zipfile.ZipInfo(f"archive/alias{i}")
            entry.header_offset, entry.CRC = alias.header_offset, alias.CRC
            entry.file_size = entry.compress_size = alias.file_size
            archive.filelist.append(entry)
    torch.load(path, weights_only=True)  # which reads past the aliases
    refused(path, r"its members claim \d+ bytes, more than the file's")


def test_a_tensor_view_claiming_more_than_its_stored_bytes_is_refused(tmp_path):
    vae = small_vae()
    state = vae.state_dict()
    # Stride 0: one stored value seen as a whole matrix. Copying it allocates the matrix.
    state["decoder.0.weight"] = torch.zeros(1).expand(state["decoder.0.weight"].shape)
    path = crafted(tmp_path, payload_of(vae, state_dict=state))
    refused(path, r"a tensor of shape \(16, 3\) claims 384 bytes from a stored block of 8")


@pytest.mark.parametrize(
    "changes",
    [
        {"latent_dim": 10**6},
        {"hidden_dims": [10**5, 10**5]},
        {"prior": "flow", "flow_depth": 10**7},
        {"encoder": "iaf", "flow_depth": 10**7},
        {"prior": "mixture", "num_components": 10**8},
        {"prior": "vamp", "num_components": 10**8},
        {"encoder": "full-covariance", "latent_dim": 10**5},
        {"network": "conv", "image_shape": [10**5, 10**5], "data_dim": 10**10},
    ],
    ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()),
)
def test_a_crafted_config_is_refused_before_anything_is_built(tmp_path, monkeypatch, changes):
    path = crafted(tmp_path, payload_of(small_vae(), config=dict(CONFIG, **changes)))

    def build_vae(**config):
        raise AssertionError(f"build_vae was called with {config}")

    monkeypatch.setitem(checkpoint.MODEL_BUILDERS, "vae", build_vae)
    refused(
        path,
        r"refused before building its model: .* at least \d+ weights, and the "
        r"checkpoint holds \d+$",
    )


def test_an_absurd_pixel_depth_is_refused(tmp_path):
    config = dict(CONFIG, likelihood="discretized-logistic", num_levels=10**9)
    path = crafted(tmp_path, payload_of(pv.build_vae(**dict(config, num_levels=17)), config=config))
    refused(path, "num_levels.* is 1000000000: more pixel levels than 16-bit images have")


# ---------------------------------------------------------------- structure


def no_state_dict(vae):
    payload = payload_of(vae)
    del payload["state_dict"]
    return payload


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda vae: [1, 2, 3], "not a pyro_vae checkpoint"),
        (lambda vae: payload_of(vae, format="other/1"), "not a pyro_vae checkpoint"),
        (no_state_dict, "its 'state_dict' should be a dict, got nothing"),
        (lambda vae: payload_of(vae, config=[64, 3]), "its 'config' should be a dict, got list"),
        (
            lambda vae: payload_of(vae, state_dict={"decoder.0.weight": "zeros"}),
            "maps 'decoder.0.weight' to a str, not a tensor",
        ),
        (
            lambda vae: payload_of(vae, config={"latent_dim": 3}),
            "config has no 'data_dim'",
        ),
        (
            lambda vae: payload_of(vae, config=dict(CONFIG, data_dim="64")),
            r"config\['data_dim'\] must be a plain int, got str '64'",
        ),
        (
            lambda vae: payload_of(vae, config=dict(CONFIG, latent_dim=-3)),
            r"config\['latent_dim'\] must be a positive int, got -3",
        ),
        (
            lambda vae: payload_of(vae, config=dict(CONFIG, latent_dim=True)),
            r"config\['latent_dim'\] must be a plain int, got bool",
        ),
        (
            lambda vae: payload_of(vae, config=dict(CONFIG, hidden_dims=16)),
            r"config\['hidden_dims'\] must be a list of ints, got int",
        ),
        (
            lambda vae: payload_of(vae, config=dict(CONFIG, hidden_dims=[16, -1])),
            r"config\['hidden_dims'\]\[1\] must be a positive int, got -1",
        ),
        (
            lambda vae: payload_of(vae, config=dict(CONFIG, network="conv", image_shape=None)),
            "network 'conv' needs an image_shape",
        ),
        (
            lambda vae: payload_of(vae, config=dict(CONFIG, width=3)),
            r"config has keys that build_vae does not take: \['width'\]",
        ),
        (
            lambda vae: payload_of(vae, config=dict(CONFIG, prior=["flow"])),
            r"config\['prior'\] must be a number or a name, got list",
        ),
    ],
    ids=[
        "not-a-dict",
        "foreign-format",
        "no-state-dict",
        "config-not-a-dict",
        "weight-not-a-tensor",
        "no-data-dim",
        "size-a-string",
        "negative-size",
        "size-a-bool",
        "hidden-dims-an-int",
        "negative-hidden-width",
        "conv-without-image-shape",
        "unknown-key",
        "name-a-list",
    ],
)
def test_a_malformed_payload_is_refused_naming_the_problem(tmp_path, make, message):
    refused(crafted(tmp_path, make(small_vae())), message)


def test_non_finite_weights_are_refused(tmp_path):
    vae = small_vae()
    state = vae.state_dict()
    state["encoder.net.0.bias"][2] = float("nan")
    refused(
        crafted(tmp_path, payload_of(vae, state_dict=state)),
        "its weights 'encoder.net.0.bias' hold NaN or infinite values",
    )


def test_tensors_saved_on_a_gpu_load_on_the_cpu(tmp_path):
    # The storage locations are names in the pickle: rename them, as a GPU machine writes.
    path = saved(tmp_path)

    def on_cuda(name: str, data: bytes) -> bytes:
        if not name.endswith("data.pkl"):
            return data
        cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # BINUNICODE
        assert cpu in data
        return data.replace(cpu, cuda)

    rezip(path, on_cuda)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the payload really claims a GPU
            torch.load(path, weights_only=True)
    vae, _ = pv.load_checkpoint(path)
    assert all(p.device.type == "cpu" for p in vae.parameters())


def test_a_bad_map_location_is_refused(tmp_path):
    with pytest.raises(ValueError, match="device 'bogus'"):
        pv.load_checkpoint(saved(tmp_path), map_location="bogus")


# ---------------------------------------------------------------- not a file


def test_a_fifo_is_refused_at_once(tmp_path):
    path = tmp_path / "checkpoint.pt"
    os.mkfifo(path)

    def release_a_blocked_reader():  # so that a reader stuck in open() ends the test
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody is reading: nothing to release

    timer = threading.Timer(5, release_a_blocked_reader)
    timer.start()
    started = time.monotonic()
    try:
        refused(path, "not a loadable checkpoint: it is a FIFO or a device, not a file")
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5


def test_a_directory_is_refused(tmp_path):
    refused(tmp_path, "it is a directory, not a file")


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        pv.load_checkpoint(tmp_path / "none.pt")


# ---------------------------------------------------------------- saving


@pytest.mark.parametrize(
    ("config", "extra", "message"),
    [
        (dict(CONFIG, latent_dim=np.int64(3)), {}, r"config\['latent_dim'\] must be a plain int"),
        (dict(CONFIG, beta=object()), {}, r"config\['beta'\] must be a number or a name"),
        (CONFIG, {"epoch": object()}, "objects other than tensors and plain values"),
        (CONFIG, {"callback": lambda: None}, "cannot be saved"),
        (dict(CONFIG, decoder="conv"), {}, "config uses pyro_vae 0.1 names"),
        (dict(CONFIG, num_bins=17), {}, "config uses pyro_vae 0.1 names"),
        # A config that builds another model than the one saved: the first weight that differs
        # is named, in the model's order.
        (
            dict(CONFIG, latent_dim=4),
            {},
            r"does not describe the model saved: 'prior\.loc' is \(3,\) in the model but "
            r"\(4,\) for the config$",
        ),
        (
            dict(CONFIG, hidden_dims=[8]),
            {},
            r"'encoder\.net\.0\.weight' is \(16, 64\) in the model but \(8, 64\) for the config$",
        ),
        (
            dict(CONFIG, encoder="delta"),
            {},
            r"'encoder\.net\.2\.weight' is \(6, 16\) in the model but \(3, 16\) for the config$",
        ),
        (
            dict(CONFIG, likelihood="normal"),
            {},
            r"the config's model has 'likelihood\.raw_scale' \(\), which the model has not$",
        ),
        (
            architecture(CONFIG, "conv", "deterministic"),
            {},
            r"the model has 'encoder\.net\.0\.weight' \(16, 64\), which the config's model "
            r"has not$",
        ),
        (  # built on the CPU: Pyro's autoregressive networks cannot be built on meta
            dict(CONFIG, prior="flow"),
            {},
            r"the config's model has 'prior\.reverse' \(3,\), which the model has not$",
        ),
        (
            architecture(CONFIG, "conv", "bayesian"),
            {},
            "its config does not describe a model: decoder 'bayesian' is an MLP",
        ),
    ],
    ids=[
        "numpy-int-in-config",
        "object-in-config",
        "object-in-extra",
        "lambda-in-extra",
        "old-decoder-name",
        "old-num-bins",
        "other-latent-dim",
        "other-hidden-dims",
        "other-encoder",
        "other-likelihood",
        "other-network",
        "other-prior-with-a-flow",
        "config-build-vae-refuses",
    ],
)
def test_save_refuses_what_load_would_refuse_and_keeps_the_old_file(
    tmp_path, config, extra, message
):
    path = saved(tmp_path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message) as error:
        pv.save_checkpoint(path, small_vae(), config, **extra)
    assert str(error.value).startswith(f"{path}: checkpoint not written")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_save_refuses_non_finite_weights(tmp_path):
    vae = small_vae()
    with torch.no_grad():
        vae.decoder[0].weight[0, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"checkpoint not written: its weights 'decoder\.0\.weight'"
    ):
        pv.save_checkpoint(tmp_path / "c.pt", vae, CONFIG)
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize(
    ("options", "devices"),
    [({}, ["meta"]), ({"prior": "flow"}, ["meta", "cpu"]), ({"encoder": "iaf"}, ["meta", "cpu"])],
    ids=["mlp", "flow-prior", "iaf-encoder"],
)
def test_save_builds_the_configs_model_on_meta_when_it_can_and_draws_no_random_numbers(
    tmp_path, monkeypatch, options, devices
):
    # The config's model is built to compare its weights' shapes with the model's: on the meta
    # device, which allocates nothing, except where Pyro's autoregressive networks need the
    # CPU (they read a value while being built). Either way the caller's random stream is
    # left as it was, so that saving mid-training changes no later draw.
    config = dict(CONFIG, **options)
    vae = pv.build_vae(**config)
    attempts = []

    def spy(**kwargs):
        attempts.append(torch.empty(0).device.type)  # the default device of this build
        return pv.build_vae(**kwargs)

    monkeypatch.setitem(checkpoint.MODEL_BUILDERS, "vae", spy)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    pv.save_checkpoint(tmp_path / "c.pt", vae, config)
    assert torch.equal(torch.rand(3), expected_next)
    assert attempts == devices
    monkeypatch.undo()
    loaded, _ = pv.load_checkpoint(tmp_path / "c.pt")
    for name, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="a machine with a cuda:7")
def test_a_device_this_machine_lacks_is_refused_before_the_file_is_read(tmp_path):
    # The device is the first thing wrong, whether or not the file is there.
    with pytest.raises(ValueError, match="cuda:7"):
        pv.load_checkpoint(tmp_path / "missing.pt", map_location="cuda:7")
