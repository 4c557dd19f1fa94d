"""Softmax cross-entropy with optional label smoothing (Szegedy et al. 2016, "Rethinking the Inception
Architecture"), torch's convention: target = (1 - s) * onehot + s / num_classes (the smoothing mass is spread
over all classes, the true one included; some papers spread it over the other C - 1 classes only).
Computed in float32 whatever the autocast dtype (float64 in float64 runs), or in `dtype` when set: Prieto et al.
2025 compare float16/32/64 cross-entropy on a float32 model (their `--cross_entropy_dtype`).
"""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from runner.config import check
from runner.losses import LOSS_DTYPES, LOSSES, in_loss_dtype


@dataclass
class CrossEntropyParams:
    label_smoothing: float = 0.0  # torch convention: (1 - s) * onehot + s / num_classes
    dtype: str | None = None      # the loss's precision: null = float32 (float64 in float64 runs)

    def __post_init__(self):
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "[0, 1)")
        check(self.dtype in LOSS_DTYPES, "dtype", self.dtype, "null, float16, float32 or float64")


class CrossEntropy(nn.Module):
    def __init__(self, label_smoothing: float = 0.0, dtype: str | None = None):
        super().__init__()
        self.label_smoothing, self.dtype = label_smoothing, dtype
        self.is_measured_loss = label_smoothing == 0 and dtype is None  # the reported loss: no train/objective

    def forward(self, logits, targets, reduction: str = "mean"):
        return F.cross_entropy(in_loss_dtype(logits, self.dtype), targets, label_smoothing=self.label_smoothing,
                               reduction=reduction)


@LOSSES.register("cross_entropy", CrossEntropyParams, "softmax cross-entropy, optional label smoothing")
def build_cross_entropy(num_classes: int, label_smoothing: float, dtype: str | None) -> nn.Module:
    return CrossEntropy(label_smoothing, dtype)
