"""Poly-1 loss (Leng, Tan, Liu, Cubuk, Shi, Cheng, Anguelov, "PolyLoss: A Polynomial Expansion Perspective of
Classification Loss Functions", ICLR 2022): cross-entropy plus the first polynomial term of its expansion in
(1 - p_t), with its coefficient moved by epsilon,

    t    = (1 - s) onehot(y) + s / K                  (label smoothing, torch's convention; s = 0: one-hot)
    p_t  = sum_k t_k softmax(z)_k                     (target-weighted: with s = 0 it is softmax(z)_y)
    loss = -sum_k t_k log softmax(z)_k + epsilon (1 - p_t)

epsilon = 0 is (label-smoothed) cross-entropy, exactly (tested). Defaults: epsilon = 1 (the paper's listing:
"=1 for first try"; the paper tunes it per task and dataset), label smoothing 0; epsilon >= -1, as the listing
requires, keeps the loss decreasing in p_t.

Reference followed: the paper's code listing (poly1_cross_entropy, and its label-smoothing variant, which takes
p_t = sum(smoothed labels * softmax) and the cross-entropy against the smoothed labels). Implementations that
smooth the CE term but take p_t from the one-hot label are a different loss once s > 0; this one is the paper's.
Smoothing is torch's convention (s / K on every class, as `loss=cross_entropy loss.label_smoothing`), not
davda54's eps / (K - 1) (`loss=smooth_cross_entropy`). Computed in float32, or float64 when the logits are
float64. Reported train/test losses stay plain cross-entropy (runner/losses/__init__.py: `measured_loss`).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from runner.config import check
from runner.losses import LOSSES
from runner.losses import at_least_float32, reduce as _reduce


@dataclass
class Poly1Params:
    epsilon: float = 1.0          # coefficient added to the first polynomial term (1 - p_t); 0 = cross-entropy
    label_smoothing: float = 0.0  # torch convention: (1 - s) * onehot + s / num_classes

    def __post_init__(self):
        check(self.epsilon >= -1.0, "epsilon", self.epsilon, ">= -1")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "[0, 1)")


class Poly1Loss(nn.Module):
    def __init__(self, num_classes: int, epsilon: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.num_classes, self.epsilon, self.label_smoothing = num_classes, epsilon, label_smoothing

    def forward(self, logits, targets, reduction: str = "mean"):
        logits = at_least_float32(logits)
        log_p = torch.log_softmax(logits, dim=-1)
        s, k = self.label_smoothing, self.num_classes
        target = torch.full_like(log_p, s / k).scatter_(1, targets[:, None], 1 - s + s / k)  # (1 - s) onehot + s / K
        ce = -(target * log_p).sum(-1)
        pt = (target * log_p.exp()).sum(-1)
        return _reduce(ce + self.epsilon * (1 - pt), reduction)


@LOSSES.register("poly1", Poly1Params, "Poly-1: CE + epsilon (1 - p_t) (Leng et al. 2022)")
def build_poly1(num_classes: int, epsilon: float, label_smoothing: float) -> nn.Module:
    return Poly1Loss(num_classes, epsilon, label_smoothing)
