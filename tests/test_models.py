"""Model zoo: every conf/model/*.yaml builds, runs forward with the right output shape, matches the published
parameter counts, and rejects bad parameters with a ConfigError naming the key."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from runner.config import ConfigError
from runner.models import MODELS
from tasks import FeatureInput, ImageInput, TokenInput


def validate_model(node):
    choice = MODELS.validate(node)
    return choice.entry, choice.params


def build_model(node, num_classes, in_channels, image_size):
    return MODELS.validate(node).build(input=ImageInput(in_channels, image_size), num_classes=num_classes)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
YAMLS = sorted(CONF.glob("*.yaml"))
BIG = {"resnet18.yaml", "wrn28_10.yaml", "wrn16_8.yaml"}


def load(name: str):
    return OmegaConf.load(CONF / name)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_yaml_is_registered():
    assert YAMLS, "no model configs found"
    for path in YAMLS:
        node = OmegaConf.load(path)
        assert node.name in MODELS, path.name
        validate_model(node)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
@pytest.mark.parametrize("in_channels,image_size", [(3, 32), (1, 28), (1, 8)])
def test_forward_shape(path, in_channels, image_size):
    torch.manual_seed(0)
    model = build_model(OmegaConf.load(path), num_classes=10, in_channels=in_channels, image_size=image_size)
    model.train()
    out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_channels_last_autocast_backward(path):
    torch.manual_seed(0)
    model = build_model(OmegaConf.load(path), num_classes=7, in_channels=1, image_size=8)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 8, 8).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 7)
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name,expected", [
    ("resnet18.yaml", 11_173_962),  # kuangliu/pytorch-cifar ResNet18, 10 classes
    ("wrn16_8.yaml", 10_961_370),   # WRN-16-8, 11.0M in Zagoruyko & Komodakis 2016
    ("wrn28_10.yaml", 36_479_194),  # WRN-28-10, 36.5M in Zagoruyko & Komodakis 2016
])
def test_published_parameter_counts(name, expected):
    model = build_model(load(name), num_classes=10, in_channels=3, image_size=32)
    assert n_params(model) == expected


def test_mlp_and_cnn_sizes_follow_params():
    mlp = build_model({"name": "mlp", "hidden": [32], "dropout": 0.5}, num_classes=10, in_channels=1, image_size=8)
    assert n_params(mlp) == 64 * 32 + 32 + 32 * 10 + 10
    cnn = build_model({"name": "cnn", "width": 8, "blocks": 4}, num_classes=10, in_channels=1, image_size=8)
    assert cnn(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("node,key", [
    ({"name": "wrn", "depth": 15, "width_factor": 8}, "model.depth"),
    ({"name": "wrn", "depth": 4, "width_factor": 8}, "model.depth"),
    ({"name": "wrn", "depth": 16, "width_factor": 0}, "model.width_factor"),
    ({"name": "wrn", "depth": 16, "dropout": 1.0}, "model.dropout"),
    ({"name": "wrn", "depth": "deep"}, "model.depth"),
    ({"name": "wrn", "widht_factor": 8}, "model.widht_factor"),
    ({"name": "resnet18", "width": 0}, "model.width"),
    ({"name": "cnn", "blocks": 5}, "model.blocks"),
    ({"name": "cnn", "width": -1}, "model.width"),
    ({"name": "mlp", "hidden": [256, 0]}, "model.hidden"),
    ({"name": "mlp", "dropout": -0.1}, "model.dropout"),
    ({"name": "vgg"}, "model.name"),
])
def test_bad_params_raise_config_error(node, key):
    with pytest.raises(ConfigError) as err:
        validate_model(node)
    assert err.value.key == key
    assert key in str(err.value)
    with pytest.raises(ConfigError):
        build_model(node, num_classes=10, in_channels=3, image_size=32)


def test_yaml_name_may_differ_from_file_name():
    entry, params = validate_model(load("wrn16_8.yaml"))
    assert entry.name == "wrn" and (params.depth, params.width_factor, params.dropout) == (16, 8, 0.0)
    entry, params = validate_model(load("wrn28_10.yaml"))
    assert entry.name == "wrn" and (params.depth, params.width_factor) == (28, 10)
    assert MODELS.get("wrn").capabilities["batchnorm"] and not MODELS.get("mlp").capabilities["batchnorm"]


def test_mlp_takes_any_input_the_task_declares():
    """The same MLP config on features (flattened) and on token pairs (one-hot, concatenated)."""
    node = {"name": "mlp", "hidden": [8]}
    on_features = MODELS.validate(node).build(input=FeatureInput(13), num_classes=3)
    assert on_features(torch.randn(5, 13)).shape == (5, 3)
    on_tokens = MODELS.validate(node).build(input=TokenInput(vocab=7, length=2), num_classes=7)
    tokens = torch.tensor([[0, 6], [3, 3]])
    assert on_tokens[1].in_features == 14 and on_tokens(tokens).shape == (2, 7)
    # one-hot(a) ‖ one-hot(b) through the first layer = the sum of two weight columns
    w, b = on_tokens[1].weight, on_tokens[1].bias
    torch.testing.assert_close(on_tokens[1](on_tokens[0](tokens))[0], w[:, 0] + w[:, 7 + 6] + b)


def test_mlp_embeds_tokens_when_asked_and_refuses_to_embed_anything_else():
    """`model.embedding=d`: each token through a learned nn.Embedding(vocab, d), concatenated (the grokking
    paper's --use_embedding); images and features cannot be embedded: a ConfigError naming the key."""
    node = {"name": "mlp", "hidden": [8], "embedding": 5}
    model = MODELS.validate(node).build(input=TokenInput(vocab=7, length=2), num_classes=7)
    tokens = torch.tensor([[0, 6], [3, 3]])
    table = model[0].embedding.weight
    assert tuple(table.shape) == (7, 5) and model[1].in_features == 10
    torch.testing.assert_close(model[0](tokens), torch.cat([table[tokens[:, 0]], table[tokens[:, 1]]], dim=1))
    model(tokens).sum().backward()
    assert table.grad[[0, 3, 6]].abs().sum() > 0 and table.grad[[1, 2, 4, 5]].abs().sum() == 0  # only seen rows
    with pytest.raises(ConfigError, match="model.embedding"):
        MODELS.validate(node).build(input=FeatureInput(13), num_classes=3)
    with pytest.raises(ConfigError, match="embedding"):
        MODELS.validate({"name": "mlp", "embedding": 0})


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_image_models_refuse_other_inputs(name):
    with pytest.raises(ConfigError, match="needs image input"):
        MODELS.validate({"name": name}).build(input=FeatureInput(13), num_classes=3)
