"""Multi-layer perceptron: flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear.

Sized for small inputs such as the 8x8 sklearn digits (64 features); expects float input.
PyTorch's default Linear initialization (Kaiming-uniform), as in most MLP baselines.
"""
from dataclasses import dataclass, field
from typing import List

from torch import nn

from runner.config import check
from runner.models import MODELS


@dataclass
class MLPParams:
    hidden: List[int] = field(default_factory=lambda: [256, 256])  # widths of the hidden layers
    dropout: float = 0.0  # dropout probability after each hidden ReLU

    def __post_init__(self):
        check(all(w > 0 for w in self.hidden), "hidden", list(self.hidden), "a list of positive widths")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "0 <= dropout < 1")


@MODELS.register("mlp", MLPParams, batchnorm=False)
def build_mlp(num_classes: int, in_channels: int, image_size: int, hidden: List[int], dropout: float) -> nn.Module:
    """MLP on flattened pixels, ReLU hidden layers with optional dropout."""
    layers: List[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
