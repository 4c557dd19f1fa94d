"""Softmax (multi-class) focal loss (Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection",
ICCV 2017): cross-entropy with the well-classified samples down-weighted,

    p_t  = softmax(z)_y
    loss = -alpha_y (1 - p_t)^gamma log p_t

gamma = 0 (and no alpha) is plain cross-entropy, exactly (tested). Defaults: gamma = 2, the paper's best value;
alpha off. The paper states the loss for the sigmoid (binary, one-vs-all) case, with alpha = 0.25 for the
foreground, and notes that it extends to the multi-class softmax case; this is that softmax extension, the form
used on classification benchmarks. Here alpha, when given, is a list of K per-class weights (alpha_t = alpha[y]);
a single scalar alpha would only rescale the softmax loss (a learning-rate change), so it is not offered.

Conventions: log p_t comes from log_softmax (stable); 1 - p_t = -expm1(log p_t) (accurate near p_t = 1), clamped
at the smallest positive float so that gamma < 1 has a finite gradient where softmax collapses (p_t == 1 exactly:
the loss is 0 there and so is its gradient). reduction="mean" is the plain mean over samples (alpha does not
renormalize it). Computed in float32, or float64 when the logits are float64. Reported train/test losses stay
plain cross-entropy (runner/losses/__init__.py: `measured_loss`).
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from runner.config import ConfigError, check
from runner.losses import LOSSES
from runner.losses import at_least_float32, reduce as _reduce


@dataclass
class FocalParams:
    gamma: float = 2.0                   # focusing parameter: (1 - p_t)^gamma; 0 = cross-entropy
    alpha: Optional[List[float]] = None  # per-class weights alpha_y (K values, >= 0); null = none

    def __post_init__(self):
        check(self.gamma >= 0.0, "gamma", self.gamma, ">= 0")
        if self.alpha is not None:
            check(len(self.alpha) > 0 and all(a >= 0 for a in self.alpha), "alpha", self.alpha,
                  "null or a list of num_classes weights >= 0")


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, alpha: Optional[List[float]] = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", None if alpha is None else torch.tensor(alpha, dtype=torch.float64),
                             persistent=False)

    def forward(self, logits, targets, reduction: str = "mean"):
        logits = at_least_float32(logits)
        log_pt = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
        losses = -log_pt
        if self.gamma != 0:
            one_minus_pt = (-torch.expm1(log_pt)).clamp(min=torch.finfo(log_pt.dtype).tiny)
            losses = one_minus_pt.pow(self.gamma) * losses
        if self.alpha is not None:
            losses = self.alpha.to(device=losses.device, dtype=losses.dtype)[targets] * losses
        return _reduce(losses, reduction)


@LOSSES.register("focal", FocalParams, "softmax focal loss (Lin et al. 2017)")
def build_focal(num_classes: int, gamma: float, alpha: Optional[List[float]]) -> nn.Module:
    if alpha is not None and len(alpha) != num_classes:
        raise ConfigError("loss.alpha", list(alpha), f"null or a list of {num_classes} weights (one per class)")
    return FocalLoss(gamma, None if alpha is None else list(alpha))
