"""StableMax cross-entropy (Prieto, Barsbey, Mediano, Birdal 2025, "Grokking at the Edge of Numerical
Stability"): softmax with exp replaced by a function that grows linearly, not exponentially, so that the
training loss cannot reach float32's "softmax collapse" (probabilities of exactly 1, gradients of exactly 0).

    s(x) = x + 1        for x >= 0
    s(x) = 1 / (1 - x)  for x <  0          (continuous, s(0) = 1; positive and increasing everywhere)
    p_i  = s(x_i) / sum_j s(x_j),   loss = -log p_y

Conventions: computed in float32 (float64 when the logits are float64), or in `dtype`: the paper's StableMax
runs keep the model float32 and compute this loss in float64 (`--cross_entropy_dtype float64`), which is
`loss.dtype=float64` here. The paper's s(x) adds 1e-30 to 1 - x, which changes nothing in float32 or float64.
The negative branch is evaluated on min(x, 0) so that neither branch can produce inf or nan for the other's
inputs (torch.where differentiates both). Reported losses stay plain softmax cross-entropy
(runner/losses/__init__.py), so numbers compare across objectives.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from runner.config import check
from runner.losses import LOSS_DTYPES, LOSSES, in_loss_dtype


def stablemax_s(x: torch.Tensor) -> torch.Tensor:
    """s(x): x + 1 for x >= 0, 1 / (1 - x) below."""
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))


def log_stablemax(logits: torch.Tensor, dtype: str | None = None) -> torch.Tensor:
    """log p over the last dimension, (N, C) -> (N, C), computed in `dtype` (see `in_loss_dtype`)."""
    s = stablemax_s(in_loss_dtype(logits, dtype))
    return torch.log(s) - torch.log(s.sum(dim=-1, keepdim=True))


@dataclass
class StableMaxParams:
    dtype: str | None = None  # the loss's precision: null = float32 (float64 in float64 runs); paper: float64

    def __post_init__(self):
        check(self.dtype in LOSS_DTYPES, "dtype", self.dtype, "null, float16, float32 or float64")


class StableMaxCrossEntropy(nn.Module):
    def __init__(self, dtype: str | None = None):
        super().__init__()
        self.dtype = dtype

    def forward(self, logits, targets, reduction: str = "mean"):
        losses = -log_stablemax(logits, self.dtype).gather(1, targets[:, None]).squeeze(1)  # (N,)
        return {"mean": losses.mean, "sum": losses.sum}.get(reduction, lambda: losses)()


@LOSSES.register("stablemax", StableMaxParams, "StableMax cross-entropy (Prieto et al. 2025)")
def build_stablemax(num_classes: int, dtype: str | None) -> nn.Module:
    return StableMaxCrossEntropy(dtype)
