"""The model zoo: `conf/model/<file>.yaml` -> `nn.Module`.

Each model registers a schema dataclass under its YAML `name` in `MODELS`; its builder is called as
`build(num_classes=..., in_channels=..., image_size=..., **params)`. Capabilities recorded per entry:
`batchnorm` (the model has BatchNorm layers, which matters for SAM's second forward pass).
"""
import dataclasses
from typing import Any, Tuple

from torch import nn

from runner.config import Entry, Registry

MODELS = Registry("model")

from runner.models import cnn, mlp, resnet, wrn  # noqa: E402,F401  (import registers the models)


def validate_model(cfg_node) -> Tuple[Entry, Any]:
    """Check a `model` config node before any work: returns (entry, params dataclass); raises ConfigError."""
    return MODELS.validate(cfg_node)


def build_model(cfg_node, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Validate `cfg_node` and build the model for inputs of shape (N, in_channels, image_size, image_size)."""
    entry, params = validate_model(cfg_node)
    return entry.build(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                       **dataclasses.asdict(params))
