"""Multi-layer perceptron: input -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear.

Works on any input a task declares, without knowing the task: images and feature vectors are flattened
(8x8 digits: 64 features); token sequences are one-hot encoded and concatenated (the pair (a, b) of modular
arithmetic: one-hot(a) ‖ one-hot(b), as in the grokking papers' MLPs).
PyTorch's default Linear initialization (Kaiming-uniform), as in most MLP baselines. `bias: false` drops every
bias (the MLP of Prieto et al. 2025: one-hot(a) ‖ one-hot(b) -> 200 -> 200 -> p, ReLU, no biases).
`embedding: d` feeds tokens through a learned `nn.Embedding(vocab, d)` instead (each token's d-vector,
concatenated; torch's N(0, 1) initialization), as the paper's `--use_embedding` (there d = p, so the first layer
keeps the one-hot version's width).
"""
from dataclasses import dataclass, field
from typing import List

import math

import torch
import torch.nn.functional as F
from torch import nn

from runner.config import ConfigError, check
from runner.models import MODELS


class OneHotFlatten(nn.Module):
    """int64 tokens (N, L) -> float (N, L * vocab): the one-hot codes of the L tokens, concatenated."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        # follows the model's dtype (`model.to(torch.float64)`); not saved in checkpoints
        self.register_buffer("dtype_probe", torch.zeros(0), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, self.vocab).flatten(1).to(self.dtype_probe.dtype)


class EmbedFlatten(nn.Module):
    """int64 tokens (N, L) -> float (N, L * dim): the learned embeddings of the L tokens, concatenated."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens).flatten(1)


def flat_input(input, embedding: int | None = None) -> tuple[nn.Module, int]:
    """The layer that turns one sample of `input` into a flat float vector, and that vector's width."""
    if embedding is not None:
        if input.kind != "tokens":
            raise ConfigError("model.embedding", message=f"model.embedding={embedding} embeds tokens; this dataset "
                                                         f"gives {input.kind} input (leave model.embedding=null)")
        return EmbedFlatten(input.vocab, embedding), input.length * embedding
    if input.kind == "tokens":
        return OneHotFlatten(input.vocab), input.length * input.vocab
    return nn.Flatten(), math.prod(input.shape)


@dataclass
class MLPParams:
    hidden: List[int] = field(default_factory=lambda: [256, 256])  # widths of the hidden layers
    dropout: float = 0.0  # dropout probability after each hidden ReLU
    bias: bool = True     # biases in every Linear layer (false: the grokking paper's MLP)
    embedding: int | None = None  # tokens through a learned embedding of this width (null: one-hot)

    def __post_init__(self):
        check(all(w > 0 for w in self.hidden), "hidden", list(self.hidden), "a list of positive widths")
        check(self.embedding is None or self.embedding >= 1, "embedding", self.embedding, "null or >= 1")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "0 <= dropout < 1")


@MODELS.register("mlp", MLPParams, batchnorm=False, inputs=("image", "features", "tokens"))
def build_mlp(input, num_classes: int, hidden: List[int], dropout: float, bias: bool = True,
              embedding: int | None = None) -> nn.Module:
    """MLP on flattened (one-hot or embedded) inputs, ReLU hidden layers with optional dropout, with or without
    biases."""
    first, width = flat_input(input, embedding)
    layers: List[nn.Module] = [first]
    for h in hidden:
        layers += [nn.Linear(width, h, bias=bias), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes, bias=bias))
    return nn.Sequential(*layers)
