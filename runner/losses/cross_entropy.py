"""Softmax cross-entropy with optional label smoothing (Szegedy et al. 2016, "Rethinking the Inception
Architecture"), torch's convention: target = (1 - s) * onehot + s / num_classes (the smoothing mass is spread
over all classes, the true one included; some papers spread it over the other C - 1 classes only).
Computed in float32 whatever the autocast dtype (float64 in float64 runs).
"""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from runner.config import check
from runner.losses import LOSSES, at_least_float32


@dataclass
class CrossEntropyParams:
    label_smoothing: float = 0.0  # torch convention: (1 - s) * onehot + s / num_classes

    def __post_init__(self):
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "[0, 1)")


class CrossEntropy(nn.Module):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets, reduction: str = "mean"):
        return F.cross_entropy(at_least_float32(logits), targets, label_smoothing=self.label_smoothing,
                               reduction=reduction)


@LOSSES.register("cross_entropy", CrossEntropyParams, "softmax cross-entropy, optional label smoothing")
def build_cross_entropy(num_classes: int, label_smoothing: float) -> nn.Module:
    return CrossEntropy(label_smoothing)
