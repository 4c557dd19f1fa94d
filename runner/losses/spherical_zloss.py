"""The Z-loss of the spherical family (de Brébisson & Vincent, "The Z-loss: a shift and scale invariant
classification loss belonging to the Spherical Family", 2016, arXiv:1604.08859): a classification
loss computed on the Z-normalized logits, so it is invariant to adding a constant to all logits and to
multiplying them by a positive number.

    mu    = mean_k o_k,   sigma = sqrt(mean_k (o_k - mu)^2)        (population std over the K classes)
    z_k   = (o_k - mu) / sigma
    loss  = (1 / a) softplus(a (b - z_y)) = (1 / a) log(1 + exp(a (b - z_y)))

It depends on the logits only through sum_k o_k, sum_k o_k^2 and o_y (the spherical family of Vincent et al.
2015), which is what makes its exact gradient computable in time independent of K for large output layers.
NOT the "z-loss" of PaLM (Chowdhery et al. 2022) / Mesh-TensorFlow, the auxiliary penalty 1e-4 * log^2 Z on the
softmax log-partition that keeps logits from drifting: a different thing with the same nickname, hence the name
`spherical_zloss`. Used alone as the objective, this loss has no softmax at all.

Hyperparameters: a > 0 sets the softplus's sharpness, b the target's Z-score beyond which the loss flattens
(z_y can reach at most sqrt(K - 1), when all other logits are equal: b near it asks for a clear winner, a small b
only for a rank near the top; the paper tunes a and b per task, to match top-k scores). Our defaults, a = 1 and
b = 3 (= sqrt(K - 1) for K = 10), are our choice for 10-class problems, not the paper's.

Conventions: no epsilon in sigma, so the invariance is exact (up to rounding) at every scale; a row of equal
logits (sigma = 0, e.g. a zero-initialized last layer) gets z = 0 and the finite gradient of sigma := 1 there,
not 0 / 0. Being scale invariant, the loss's gradient scales as 1 / sigma: tiny logits get large gradients.
Computed in float32, or float64 when the logits are float64. Reported train/test losses stay plain softmax
cross-entropy (runner/losses/__init__.py: `measured_loss`).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from runner.config import check
from runner.losses import LOSSES
from runner.losses import at_least_float32, reduce as _reduce

def z_normalize(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, K): (o - mean) / std over the classes (population std)."""
    centered = logits - logits.mean(dim=-1, keepdim=True)
    var = centered.pow(2).mean(dim=-1, keepdim=True)
    return centered / torch.where(var > 0, var, torch.ones_like(var)).sqrt()   # equal logits: 0 / 1, not 0 / 0


@dataclass
class SphericalZLossParams:
    a: float = 1.0  # softplus sharpness (> 0): loss = softplus(a (b - z_y)) / a
    b: float = 3.0  # Z-score of the true class beyond which the loss flattens (z_y <= sqrt(K - 1))

    def __post_init__(self):
        check(self.a > 0.0, "a", self.a, "> 0")


class SphericalZLoss(nn.Module):
    def __init__(self, a: float = 1.0, b: float = 3.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, logits, targets, reduction: str = "mean"):
        logits = at_least_float32(logits)
        z_y = z_normalize(logits).gather(1, targets[:, None]).squeeze(1)
        return _reduce(F.softplus(self.a * (self.b - z_y)) / self.a, reduction)


@LOSSES.register("spherical_zloss", SphericalZLossParams,
                 "Z-loss of the spherical family (de Brébisson & Vincent 2016), not PaLM's log-Z penalty")
def build_spherical_zloss(num_classes: int, a: float, b: float) -> nn.Module:
    return SphericalZLoss(a, b)
