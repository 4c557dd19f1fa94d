"""StableMax cross-entropy (Prieto, Barsbey, Mediano, Birdal 2025, "Grokking at the Edge of Numerical
Stability"): softmax with exp replaced by a function that grows linearly, not exponentially, so that the
training loss cannot reach float32's "softmax collapse" (probabilities of exactly 1, gradients of exactly 0).

    s(x) = x + 1        for x >= 0
    s(x) = 1 / (1 - x)  for x <  0          (continuous, s(0) = 1; positive and increasing everywhere)
    p_i  = s(x_i) / sum_j s(x_j),   loss = -log p_y

Conventions: computed in float32, or in float64 when the logits are float64 (the paper's StableMax runs use
float64); the negative branch is evaluated on min(x, 0) so that neither branch can produce inf or nan for the
other's inputs (torch.where differentiates both). Reported losses stay plain softmax cross-entropy
(runner/losses/__init__.py), so numbers compare across objectives.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from runner.losses import LOSSES, at_least_float32


def stablemax_s(x: torch.Tensor) -> torch.Tensor:
    """s(x): x + 1 for x >= 0, 1 / (1 - x) below."""
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))


def log_stablemax(logits: torch.Tensor) -> torch.Tensor:
    """log p over the last dimension, (N, C) -> (N, C)."""
    s = stablemax_s(at_least_float32(logits))
    return torch.log(s) - torch.log(s.sum(dim=-1, keepdim=True))


@dataclass
class StableMaxParams:
    """No parameters."""


class StableMaxCrossEntropy(nn.Module):
    def forward(self, logits, targets, reduction: str = "mean"):
        losses = -log_stablemax(logits).gather(1, targets[:, None]).squeeze(1)  # (N,)
        return {"mean": losses.mean, "sum": losses.sum}.get(reduction, lambda: losses)()


@LOSSES.register("stablemax", StableMaxParams, "StableMax cross-entropy (Prieto et al. 2025)")
def build_stablemax(num_classes: int) -> nn.Module:
    return StableMaxCrossEntropy()
