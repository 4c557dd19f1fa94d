"""Sparsemax and the sparsemax loss (Martins & Astudillo, "From Softmax to Sparsemax: A Sparse Model of Attention
and Multi-Label Classification", ICML 2016).

sparsemax(z) is the Euclidean projection of z onto the probability simplex, argmin_{p in simplex} ||p - z||^2:

    sort z descending: z_(1) >= ... >= z_(K)
    k(z) = max { k : 1 + k z_(k) > sum_{j <= k} z_(j) }         (the support size)
    tau  = (sum_{j <= k(z)} z_(j) - 1) / k(z)
    sparsemax(z)_i = max(z_i - tau, 0)

The sparsemax loss (its Fenchel-Young loss; the paper's eq. for a one-hot target q = onehot(y)):

    L(z, y) = -z_y + 1/2 sum_{j in S(z)} (z_j^2 - tau^2) + 1/2,   S(z) = { j : sparsemax(z)_j > 0 }
    grad_z L = sparsemax(z) - onehot(y)

L >= 0, and L = 0 exactly when sparsemax(z) = onehot(y) (z_y >= 1 + max_{j != y} z_j): unlike softmax
cross-entropy, a sample can be fitted with a finite margin, after which it gives no gradient at all.

Reference: the paper's Algorithm 1 (sort-based, O(K log K)) and its loss definition, written here with torch ops so
that autograd differentiates the closed form; its gradient is then exactly sparsemax(z) - onehot(y) (tested
against the formula), and sparsemax's Jacobian diag(s) - s s^T / |S| (s the support indicator). Computed in
float32, or float64 when the logits are float64. Reported train/test losses stay plain softmax cross-entropy
(runner/losses/__init__.py: `measured_loss`).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from runner.losses import LOSSES
from runner.losses import at_least_float32, reduce as _reduce


def sparsemax_threshold(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tau (N, 1) and the support size k(z) (N, 1) over the last dimension of z (N, K)."""
    sorted_z, _ = torch.sort(z, dim=-1, descending=True)
    cumsum = sorted_z.cumsum(dim=-1)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    in_support = 1 + k * sorted_z > cumsum            # true for k = 1..k(z), false after (a prefix)
    support = in_support.sum(dim=-1, keepdim=True)    # k(z) >= 1 always (k = 1: 1 + z_(1) > z_(1))
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return tau, support


def sparsemax(z: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each row of z (N, K) onto the probability simplex."""
    tau, _ = sparsemax_threshold(z)
    return (z - tau).clamp(min=0)


def sparsemax_loss(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample sparsemax loss (N,): -z_y + 1/2 sum_{j in S} (z_j^2 - tau^2) + 1/2."""
    tau, _ = sparsemax_threshold(z)
    in_s = (z > tau).to(z.dtype)
    z_y = z.gather(1, targets[:, None]).squeeze(1)
    return -z_y + 0.5 * (in_s * (z * z - tau * tau)).sum(dim=-1) + 0.5


@dataclass
class SparsemaxParams:
    """No parameters."""


class SparsemaxLoss(nn.Module):
    def forward(self, logits, targets, reduction: str = "mean"):
        logits = at_least_float32(logits)
        return _reduce(sparsemax_loss(logits, targets), reduction)


@LOSSES.register("sparsemax", SparsemaxParams, "sparsemax loss (Martins & Astudillo 2016)")
def build_sparsemax(num_classes: int) -> nn.Module:
    return SparsemaxLoss()
