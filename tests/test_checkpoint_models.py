"""Checkpoints of the models other than the VAE: M2 and the CVAE (and its baseline), named by
the config's "model" key. Each round-trips exactly; a resume through a checkpoint file ends
bit-identical to a run never stopped; crafted configs are refused before the model is built for
real (only ever on the meta device, which allocates nothing); save refuses a config that does
not describe the model it saves."""

import copy
import functools
from pathlib import Path

import pyro
import pytest
import torch
from torch import nn

import pyro_vae as pv
from pyro_vae import checkpoint
from pyro_vae.models.cvae import (
    ConditionalBaseline,
    ConditionalVAE,
    build_cvae,
    build_cvae_baseline,
)
from pyro_vae.models.labels import hide_labels, labelled_subset
from pyro_vae.models.m2 import M2, build_m2

M2_CONFIG = {
    "model": "m2",
    "data_dim": 12,
    "num_labels": 3,
    "latent_dim": 2,
    "alpha": 0.7,
    "num_labelled": 6,  # m2_data's labelled rows: the scale of their sites in batches
    "hidden_dims": [8],
}
M2_IMAGE_CONFIG = {
    "model": "m2",
    "data_dim": 64,
    "num_labels": 3,
    "latent_dim": 2,
    "alpha": 5.0,
    "hidden_dims": [8],
    "image_shape": [8, 8],
}
CVAE_CONFIG = {
    "model": "cvae",
    "data_dim": 6,
    "condition_dim": 10,
    "latent_dim": 3,
    "beta": 0.5,
    "hidden_dims": [8],
}
BASELINE_CONFIG = {"model": "cvae-baseline", "data_dim": 6, "condition_dim": 10, "hidden_dims": [8]}
CONFIGS = {
    "m2": M2_CONFIG,
    "m2-conv": M2_IMAGE_CONFIG,
    "cvae": CVAE_CONFIG,
    "cvae-baseline": BASELINE_CONFIG,
}
# The builder of each model name other than the VAE's; tests watch them in checkpoint's registry
# (checkpoint.MODEL_BUILDERS), where the loader finds them.
BUILDERS = {"m2": build_m2, "cvae": build_cvae, "cvae-baseline": build_cvae_baseline}


def build(config: dict) -> nn.Module:
    arguments = {k: v for k, v in config.items() if k != "model"}
    return BUILDERS[config["model"]](**arguments)


def outputs(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """What each model computes from a fixed input: every network's output."""
    with torch.no_grad():
        if isinstance(model, M2):
            x = torch.rand(5, model.data_dim, generator=generator)
            y = torch.tensor([0, 1, 2, 0, 1])
            z = torch.randn(5, model.latent_dim, generator=generator)
            return [model.label_posterior(x).logits, *model.encode(x, y), model.decode(z, y)]
        c = torch.rand(5, model.condition_dim, generator=generator)
        if isinstance(model, ConditionalBaseline):
            return [model.predict(c)]
        assert isinstance(model, ConditionalVAE)
        x = torch.rand(5, model.data_dim, generator=generator)
        z = torch.randn(5, model.latent_dim, generator=generator)
        prior = model.prior(c)
        posterior = model.encoder(torch.cat([x, c], -1))
        return [
            prior.mean,
            prior.stddev,
            posterior.mean,
            posterior.stddev,
            model.decoder(torch.cat([z, c], -1)),
        ]


@pytest.mark.parametrize("kind", CONFIGS)
def test_each_model_round_trips_exactly(tmp_path, kind):
    config = CONFIGS[kind]
    torch.manual_seed(0)
    original = build(config)
    path = tmp_path / "c.pt"
    pv.save_checkpoint(path, original, config, epoch=3)
    torch.manual_seed(1)  # another seed: the weights must come from the file
    loaded, payload = pv.load_checkpoint(path)
    assert type(loaded) is type(original)
    assert payload["config"] == config and payload["epoch"] == 3
    expected = original.state_dict()
    assert list(loaded.state_dict()) == list(expected)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    for got, want in zip(
        outputs(loaded, torch.Generator().manual_seed(2)),
        outputs(original, torch.Generator().manual_seed(2)),
        strict=True,
    ):
        assert torch.equal(got, want)
    for setting in ("alpha", "beta", "image_shape"):
        if hasattr(original, setting):
            assert getattr(loaded, setting) == getattr(original, setting), setting


def test_an_explicit_model_vae_loads_like_a_config_without_the_key(tmp_path):
    config = {"data_dim": 12, "latent_dim": 2, "hidden_dims": [8]}
    vae = pv.build_vae(**config)
    pv.save_checkpoint(tmp_path / "c.pt", vae, dict(config, model="vae"))
    loaded, _ = pv.load_checkpoint(tmp_path / "c.pt")
    assert isinstance(loaded, pv.VAE)
    for name, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


# ---------------------------------------------------------------------------- resume


def easy_problem(num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 12 binary pixels, each lighting its own block of four more often."""
    labels = torch.randint(0, 3, (num,), generator=generator)
    probs = torch.where(torch.arange(12) // 4 == labels[:, None], 0.9, 0.1)
    return torch.bernoulli(probs, generator=generator), labels


def m2_data() -> tuple[torch.Tensor, torch.Tensor]:
    x, labels = easy_problem(30, torch.Generator().manual_seed(3))
    return x, hide_labels(labels, labelled_subset(labels, 6, seed=0))


def cvae_data() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(30, 16, generator=torch.Generator().manual_seed(3))
    return images[:, :6], images[:, 6:]


def train(model: nn.Module, config: dict, directory: Path, resume=None, seed: int = 0):
    """Two epochs of 4 steps, a checkpoint file every 3 steps and at each epoch's end, written
    as a script writes it: weights, config and the training state."""
    pyro.set_rng_seed(seed)
    m2 = isinstance(model, M2)
    data = m2_data() if m2 else cvae_data()
    files = []

    def save(state: pv.TrainingState) -> None:
        path = directory / f"{len(files)}.pt"
        pv.save_checkpoint(path, model, config, training=state.to_dict())
        files.append(path)

    history = pv.fit(
        model,
        data,
        loss=model.loss() if m2 else None,
        num_epochs=2,
        batch_size=8,  # 4 steps per epoch, the last of 6 rows
        # For the CVAE, β rises through both epochs: checkpoints taken mid-warm-up.
        kl_warmup_epochs=0 if m2 else 2,
        checkpoint=save,
        checkpoint_every=3,
        resume=resume,
        generator=torch.Generator().manual_seed(seed + 1),
        progress=False,
    )
    return history, files


@pytest.mark.parametrize("kind", ["m2", "cvae"])
def test_a_resume_through_a_checkpoint_file_ends_like_an_uninterrupted_run(tmp_path, kind):
    config = CONFIGS[kind]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.manual_seed(0)
    reference = build(config)
    reference_history, files = train(reference, config, tmp_path / "a")
    # Files: after global steps 3 and 4 (epoch 1's end), then 6: step 2 of epoch 2.
    loaded, payload = pv.load_checkpoint(files[2])
    state = pv.TrainingState.from_dict(payload["training"])
    assert (state.epoch, state.step) == (1, 2)
    # Another seed: everything that matters must come from the file.
    history, _ = train(loaded, config, tmp_path / "b", resume=state, seed=99)
    assert history.step_loss == reference_history.step_loss
    expected = reference.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    if kind == "cvae":
        assert loaded.beta == reference.beta == config["beta"]  # warm-up over, β restored


# ---------------------------------------------------------------------------- crafted configs


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The device of every build of a model other than the VAE (the default device in force
    when its builder is called); the builders are watched where checkpoint.py finds them."""
    devices: list[str] = []
    for kind, original in BUILDERS.items():
        assert checkpoint.MODEL_BUILDERS[kind] is original

        @functools.wraps(original)  # keeps the signature, which the config is checked against
        def spy(*args, _original=original, **kwargs):
            devices.append(torch.empty(0).device.type)
            return _original(*args, **kwargs)

        monkeypatch.setitem(checkpoint.MODEL_BUILDERS, kind, spy)
    return devices


def crafted(tmp_path: Path, model: nn.Module, config: dict) -> Path:
    """``model``'s weights with ``config``, past save_checkpoint's checks."""
    path = tmp_path / "crafted.pt"
    payload = {"format": checkpoint.FORMAT, "config": config, "state_dict": model.state_dict()}
    torch.save(payload, path)
    return path


def refused(path: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        pv.load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message


HUGE = [
    ("m2", {"data_dim": 10**9}),
    ("m2", {"hidden_dims": [10**5, 10**5]}),
    ("m2", {"latent_dim": 10**7}),
    ("m2-conv", {"image_shape": [10**5, 10**5], "data_dim": 10**10}),
    ("cvae", {"latent_dim": 10**6}),
    ("cvae", {"condition_dim": 10**8}),
    ("cvae-baseline", {"hidden_dims": [10**6]}),
]


@pytest.mark.parametrize(
    ("kind", "changes"),
    HUGE,
    ids=[f"{kind}:" + ",".join(f"{k}={v}" for k, v in ch.items()) for kind, ch in HUGE],
)
def test_huge_sizes_are_refused_after_a_build_on_meta_only(tmp_path, builds, kind, changes):
    path = crafted(tmp_path, build(CONFIGS[kind]), dict(CONFIGS[kind], **changes))
    builds.clear()
    refused(
        path,
        r"refused before building its model: the config \(model .*\) describes a model of "
        r"\d+ weights, and the checkpoint holds \d+$",
    )
    assert builds == ["meta"]


def test_a_config_of_countless_layers_is_refused_before_even_a_meta_build(tmp_path, builds):
    # Meta allocates nothing, but ten thousand layers take time to build even there.
    config = dict(CVAE_CONFIG, hidden_dims=[1] * 10_000)
    path = crafted(tmp_path, build(CVAE_CONFIG), config)
    builds.clear()
    refused(path, r"hidden_dims has 10000 layers, and the checkpoint holds 1\d tensors$")
    assert builds == []


def test_weights_of_other_shapes_are_refused_before_building(tmp_path, builds):
    # Fewer weights than the file holds, but not the file's: a wider model's file, say.
    path = crafted(tmp_path, build(dict(CVAE_CONFIG, hidden_dims=[9])), CVAE_CONFIG)
    builds.clear()
    refused(
        path,
        r"refused before building its model: weights do not fit the saved config \(model cvae"
        r".*\): 'prior\.net\.0\.weight' is \(9, 10\) in the file but \(8, 10\) for the config$",
    )
    assert builds == ["meta"]


BAD_CONFIGS = [
    ({"model": "gan"}, r"config\['model'\] is 'gan': not a model a checkpoint holds \(one of "),
    ({"model": 3}, r"config\['model'\] is int: not a model a checkpoint holds"),
    ({"prior": "vamp"}, r"config has keys that the m2 builder does not take: \['prior'\]"),
    ({"num_bins": 256}, r"config has keys that the m2 builder does not take: \['num_bins'\]"),
    ({"alpha": None}, r"config of a m2 has no 'alpha'"),
    ({"num_labels": True}, r"config\['num_labels'\] must be a plain int, got bool"),
    ({"latent_dim": 0}, r"config\['latent_dim'\] must be a positive int"),
    ({"hidden_dims": 8}, r"config\['hidden_dims'\] must be a list of ints, got int"),
    ({"hidden_dims": [8.0]}, r"config\['hidden_dims'\]\[0\] must be a plain int, got float"),
    ({"alpha": [1.0]}, r"config\['alpha'\] must be a number or a name, got list"),
]


@pytest.mark.parametrize(
    ("changes", "message"), BAD_CONFIGS, ids=[str(changes) for changes, _ in BAD_CONFIGS]
)
def test_malformed_configs_are_refused_before_any_build(tmp_path, builds, changes, message):
    config = dict(M2_CONFIG, **changes)
    if changes.get("alpha", 0) is None:
        del config["alpha"]
    path = crafted(tmp_path, build(M2_CONFIG), config)
    builds.clear()
    refused(path, message)
    assert builds == []


def test_a_config_whose_meta_build_fails_is_refused(tmp_path, builds):
    path = crafted(tmp_path, build(M2_CONFIG), dict(M2_CONFIG, num_labels=1))
    builds.clear()
    refused(
        path,
        r"refused before building its model: its config does not describe a model: its build "
        r"on the meta device fails \(num_labels must be at least 2, got 1\)$",
    )
    assert builds == ["meta"]


def test_the_weights_of_one_kind_under_another_kinds_config_are_refused(tmp_path):
    vae = pv.build_vae(12, 2, hidden_dims=[8])
    refused(crafted(tmp_path, vae, M2_CONFIG), "refused before building its model")
    refused(
        crafted(tmp_path, build(M2_CONFIG), {"data_dim": 12, "latent_dim": 2, "hidden_dims": [8]}),
        r"weights do not fit the saved config \(latent_dim 2, prior standard-normal, .*\): "
        r'Unexpected key\(s\) in state_dict: "classifier\.0\.weight", ',
    )


# ---------------------------------------------------------------------------- save


class Impostor(nn.Module):
    """An M2's very parts in another class: the same weights, names and shapes."""

    def __init__(self, m2: M2) -> None:
        super().__init__()
        for name, part in m2.named_children():
            self.add_module(name, copy.deepcopy(part))


MISMATCHES = [
    # (loc, scale) of 2 latents, 3 for the config
    ({"latent_dim": 3}, r"'encoder\.net\.2\.weight' is \(4, 8\) in the model but \(6, 8\)"),
    ({"num_labels": 4}, r"'classifier\.2\.weight' is \(3, 8\) in the model but \(4, 8\)"),
    ({"hidden_dims": [8, 8]}, r"'classifier\.2\.weight' is \(3, 8\) in the model but \(8, 8\)"),
    ({"alpha": 0.5}, r"its alpha is 0\.7, and the config's model's 0\.5$"),
    ({"image_shape": [3, 4]}, r"the model has 'classifier\.0\.weight' \(8, 12\), which the conf"),
    (
        {"model": "cvae", "condition_dim": 3},
        r"describes a ConditionalVAE, and the model saved is a M2",
    ),
    (
        {"num_labels": 1},
        r"its config does not describe a model: its build on the meta device fails",
    ),
]


@pytest.mark.parametrize(
    ("changes", "message"), MISMATCHES, ids=[str(changes) for changes, _ in MISMATCHES]
)
def test_save_refuses_a_config_that_does_not_describe_the_model(tmp_path, changes, message):
    config = dict(M2_CONFIG, **changes)
    if changes.get("model") == "cvae":
        del config["alpha"], config["num_labels"], config["num_labelled"]
    with pytest.raises(ValueError, match=message) as error:
        pv.save_checkpoint(tmp_path / "c.pt", build(M2_CONFIG), config)
    assert str(error.value).startswith(f"{tmp_path / 'c.pt'}: checkpoint not written: ")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_model_of_another_class_with_the_same_weights(tmp_path):
    impostor = Impostor(build(M2_CONFIG))
    with pytest.raises(ValueError, match=r"describes a M2, and the model saved is a Impostor$"):
        pv.save_checkpoint(tmp_path / "c.pt", impostor, M2_CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_save_builds_on_meta_only_and_draws_no_random_numbers(tmp_path, builds):
    model = build_cvae(6, 10, 3, hidden_dims=[8])
    builds.clear()
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    pv.save_checkpoint(tmp_path / "c.pt", model, CVAE_CONFIG | {"beta": 1.0})
    assert torch.equal(torch.rand(3), expected_next)
    # Once to compare with the model, once as the file is read back before it is written.
    assert builds == ["meta", "meta"]
