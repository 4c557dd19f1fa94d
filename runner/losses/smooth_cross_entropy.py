"""Label-smoothed cross-entropy in davda54/sam's (and GSAM's) convention: the smoothing mass goes to the K - 1
OTHER classes only. Not torch's convention, which `loss=cross_entropy loss.label_smoothing=s` gives (s / K on every
class, the true one included): the two are named apart (`smoothing` here, `label_smoothing` there) so that one
is never taken for the other.

    target_k = 1 - eps          if k = y
    target_k = eps / (K - 1)    otherwise                      (sums to 1)
    loss     = -sum_k target_k log softmax(z)_k

Label smoothing itself: Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, "Rethinking the Inception Architecture for
Computer Vision", CVPR 2016. Reference implementation followed: davda54/sam, example/model/smooth_cross_entropy.py
(`smooth_crossentropy(pred, gold, smoothing=0.1)`), the SAM/GSAM papers' CIFAR baseline with smoothing 0.1.

Conventions:
- eps here equals torch's s = eps * K / (K - 1): the same target, two parametrizations (tested).
- davda54's function returns KL(target || softmax) = this loss - H(target), with H(target) a constant: the same
  gradients, values lower by H(target). We return the cross-entropy, so that eps = 0 is plain CE.
- Computed in float32, or float64 when the logits are float64. Default eps 0.1 (davda54/sam's training script).
- Reported train/test losses stay plain cross-entropy (runner/losses/__init__.py: `measured_loss`).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from runner.config import ConfigError, check
from runner.losses import LOSSES
from runner.losses import at_least_float32, reduce as _reduce


def smooth_targets(targets: torch.Tensor, num_classes: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """(N,) class indices -> (N, K) targets: 1 - eps on the true class, eps / (K - 1) on each other class."""
    out = torch.full((len(targets), num_classes), eps / (num_classes - 1), dtype=dtype, device=targets.device)
    return out.scatter_(1, targets[:, None], 1.0 - eps)


@dataclass
class SmoothCrossEntropyParams:
    smoothing: float = 0.1  # davda54/GSAM convention: 1 - eps on the true class, eps / (K - 1) on each other class

    def __post_init__(self):
        check(0.0 <= self.smoothing < 1.0, "smoothing", self.smoothing, "[0, 1)")


class SmoothCrossEntropy(nn.Module):
    def __init__(self, num_classes: int, smoothing: float = 0.1):
        super().__init__()
        self.num_classes, self.smoothing = num_classes, smoothing

    def forward(self, logits, targets, reduction: str = "mean"):
        logits = at_least_float32(logits)
        log_p = torch.log_softmax(logits, dim=-1)
        target = smooth_targets(targets, self.num_classes, self.smoothing, log_p.dtype)
        return _reduce(-(target * log_p).sum(-1), reduction)


@LOSSES.register("smooth_cross_entropy", SmoothCrossEntropyParams,
                 "label-smoothed cross-entropy, davda54/GSAM convention (eps / (K - 1) on the other classes)")
def build_smooth_cross_entropy(num_classes: int, smoothing: float) -> nn.Module:
    if num_classes < 2:
        raise ConfigError("loss.name", "smooth_cross_entropy", message=f"loss=smooth_cross_entropy needs at least 2 "
                                                                        f"classes, the task has {num_classes}")
    return SmoothCrossEntropy(num_classes, smoothing)
