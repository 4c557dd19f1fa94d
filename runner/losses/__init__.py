"""Training objectives: `nn.Module`s taking `(logits, targets)`, registered by the name in `conf/loss/<name>.yaml`.

The objective shapes training only. Reported losses (train/loss, test/loss), landscapes and Hessians use
`measured_loss`, plain mean cross-entropy, so numbers stay comparable across objectives.
"""
import dataclasses
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from runner.config import Registry, check

LOSSES = Registry("loss")


@dataclass
class CrossEntropyConfig:
    label_smoothing: float = 0.0  # torch convention: (1 - s) * onehot + s / num_classes

    def __post_init__(self):
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "[0, 1)")


@LOSSES.register("cross_entropy", CrossEntropyConfig)
class CrossEntropy(nn.Module):
    """Softmax cross-entropy with optional label smoothing (Szegedy et al. 2016), torch's convention."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets):
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)


def measured_loss(logits, targets, reduction: str = "mean"):
    """The loss we report everywhere: plain cross-entropy, computed in float32."""
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def build_loss(node) -> nn.Module:
    entry, params = LOSSES.validate(node)
    return entry.build(**dataclasses.asdict(params))
