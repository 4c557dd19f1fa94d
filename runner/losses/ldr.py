"""LDR-KL and ALDR-KL losses (Zhu, Ying, Yang, "Label Distributionally Robust Losses for Multi-class
Classification: Consistency, Robustness and Adaptivity", ICML 2023).

A label-distributionally robust (LDR) loss takes the worst case, over a distribution p on the K labels, of the
margin-augmented score differences, regularized by the KL divergence of p to the uniform distribution; the
inner maximum has a closed form, a temperature-scaled, margin-augmented log-mean-exp (LDR-KL):

    psi_lam(z, y) = max_{p in simplex} sum_k p_k (d_k) - lam * KL(p || 1/K),   d_k = delta_{k,y} + z_k - z_y
                  = lam * log( (1/K) sum_k exp(d_k / lam) ),                   delta_{k,y} = c * [k != y]
    the maximizer: p*_k = softmax(d / lam)_k

    lam -> 0:    max_k d_k = max(0, max_{k != y} c + z_k - z_y)     (Crammer-Singer's multi-class hinge)
    lam -> inf:  (1/K) sum_k d_k                  (linear in z; symmetric, so noise-robust, for bounded scores)
    c = 0, lam = 1: cross-entropy - log K.

ALDR-KL (adaptive LDR) also maximizes over a per-sample lam, kept near lam_0 by a quadratic penalty:

    psi(z, y) = max_{lam > 0} psi_lam(z, y) - (rho / 2) (lam - lam_0)^2,       rho = alpha * log K / lam_0
    for a fixed p, the best lam is  lam = lam_0 * (1 - KL(p || 1/K) / (alpha log K))   (closed form)

Since 0 <= KL <= log K, alpha > 1 keeps lam in [lam_0 (1 - 1/alpha), lam_0]: a sample whose worst-case label
distribution is far from uniform (a confident, possibly wrong label) gets a smaller lam, closer to the hinge.
As in the reference code, each sample i keeps its lam_i (initially lam_0) and every time it is seen does one
step of alternating maximization: p = p*(lam_i) at the stored lam_i, then lam_i <- the closed form above (stored),
then the loss psi_{lam_i}(z, y) - (rho/2)(lam_i - lam_0)^2 with lam_i a constant (no gradient through it). So the
loss needs the samples' indices into the training split: the entry declares `sample_indices=True`, gets the
split's size as `num_samples`, and the loop's closure passes `indices=` (runner/step.py); lam_i lives in a buffer,
saved with the checkpoint (runner/experiment.py). A multi-pass optimizer (SAM: at w, then at w + e) updates lam_i at
each pass. Called without indices (outside the training loop: ESAM's ranking forward, curvature analyses), every
sample is treated as unseen (lam_i = lam_0) and nothing is stored.

Reference implementation followed: the authors' code (github.com/DixianZhu/LDR, `loss.py`: `LDRLoss_V1`,
`ALDRLoss_V1`; the paper points to Optimization-AI/ICML2023_LDR): margin c (`threshold`, their experiments' default
0.1), lam (`Lambda`, tuned over {0.1, 1, 10}; default 1 here), alpha (ALDR, default 2 as in their README; this is
their parametrization: the penalty weight is alpha log K / lam_0). Deviations, all stated:
- p in the lam update is the exact maximizer softmax((delta + z - z_y)/lam_i); their code uses softmax(z/lam_i)
  (no margin) plus 1e-5 and renormalization against log(0). Both coincide for c = 0 (up to their 1e-5).
- Score normalization is an option (`normalize`), off by default (the definition applied to the logits as is):
  their LDRLoss_V1 always maps z -> softplus(z) / mean_k softplus(z) (`normalize: softplus`); their ALDRLoss_V1
  divides z by mean_k |z_k| (`normalize: l1`), with the softplus first for CIFAR-100 (`normalize: softplus`).
  Here the divisor is clamped at 1e-12 (theirs is not), so all-zero scores give 0, not nan.
Computed in float32, or float64 when the logits are float64 (lam_i stored in float64: 8 bytes a sample).
Reported train/test losses stay plain cross-entropy (runner/losses/__init__.py: `measured_loss`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from runner.cluster import SINGLE, Cluster
from runner.config import ConfigError, check
from runner.losses import LOSSES
from runner.losses import at_least_float32, reduce as _reduce

NORMALIZE = ("none", "softplus", "l1")


def scores(logits: torch.Tensor, normalize: str) -> torch.Tensor:
    """The scores z the loss sees: the logits (float32 or float64), optionally normalized per sample."""
    z = at_least_float32(logits)
    if normalize == "softplus":
        z = F.softplus(z)
        return z / z.mean(dim=1, keepdim=True).clamp_min(1e-12)
    if normalize == "l1":
        return z / z.abs().mean(dim=1, keepdim=True).clamp_min(1e-12)
    return z


def margin_differences(z: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """d_k = c [k != y] + z_k - z_y, shape (N, K) (d_y = 0)."""
    delta = torch.full_like(z, margin).scatter_(1, targets[:, None], 0.0)
    return delta + z - z.gather(1, targets[:, None])


def ldr_kl(d: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """lam log((1/K) sum_k exp(d_k / lam)) per sample, (N, K) -> (N,); `lam` a float or a (N,) tensor."""
    lam_col = lam[:, None] if torch.is_tensor(lam) else lam
    return lam * (torch.logsumexp(d / lam_col, dim=1) - math.log(d.shape[1]))


@dataclass
class LDRParams:
    lam: float = 1.0           # temperature lambda > 0: -> 0 the Crammer-Singer hinge, -> inf the mean margin
    margin: float = 0.1        # c in delta_{k,y} = c [k != y]; the reference experiments' default
    normalize: str = "none"    # scores: none | softplus (softplus(z) / mean) | l1 (z / mean |z|)

    def __post_init__(self):
        check(math.isfinite(self.lam) and self.lam > 0, "lam", self.lam, "> 0")
        check(math.isfinite(self.margin) and self.margin >= 0, "margin", self.margin, ">= 0")
        check(self.normalize in NORMALIZE, "normalize", self.normalize, ", ".join(NORMALIZE))


@dataclass
class ALDRParams:
    lam0: float = 1.0          # lambda_0, each sample's initial and reference lambda (> 0)
    alpha: float = 2.0         # > 1; penalty weight alpha log K / lambda_0; lambda_i in [lam0 (1 - 1/alpha), lam0]
    margin: float = 0.1        # c in delta_{k,y} = c [k != y]
    normalize: str = "none"    # scores: none | softplus | l1 (as ldr_kl)

    def __post_init__(self):
        check(math.isfinite(self.lam0) and self.lam0 > 0, "lam0", self.lam0, "> 0")
        check(math.isfinite(self.alpha) and self.alpha > 1, "alpha", self.alpha,
              "> 1 (keeps every lambda_i >= lam0 (1 - 1/alpha) > 0)")
        check(math.isfinite(self.margin) and self.margin >= 0, "margin", self.margin, ">= 0")
        check(self.normalize in NORMALIZE, "normalize", self.normalize, ", ".join(NORMALIZE))


class LDRKL(nn.Module):
    def __init__(self, lam: float = 1.0, margin: float = 0.1, normalize: str = "none"):
        super().__init__()
        self.lam, self.margin, self.normalize = lam, margin, normalize

    def forward(self, logits, targets, reduction: str = "mean"):
        d = margin_differences(scores(logits, self.normalize), targets, self.margin)
        return _reduce(ldr_kl(d, self.lam), reduction)


class ALDRKL(nn.Module):
    """ALDR-KL with a per-sample lambda in the buffer `lambdas` (num_samples,), saved with the checkpoint."""

    needs_indices = True  # the loop's closure passes `indices=` (the batch's sample indices into the train split)
    # many devices: every rank stores the lambdas of the global batch's samples (the build sets the run's cluster)
    cluster: Cluster = SINGLE

    def __init__(self, num_classes: int, num_samples: Optional[int], lam0: float = 1.0, alpha: float = 2.0,
                 margin: float = 0.1, normalize: str = "none"):
        super().__init__()
        if num_classes < 2:
            raise ConfigError("loss.name", "aldr_kl", "a task with at least 2 classes (the penalty has log K)")
        self.lam0, self.alpha, self.margin, self.normalize = lam0, alpha, margin, normalize
        self.log_k = math.log(num_classes)
        self.rho = alpha * self.log_k / lam0            # the penalty's weight: (rho / 2) (lam - lam0)^2
        # num_samples None (built without a training split: config checks, a loss on its own): nothing to store,
        # every call treats its samples as unseen
        self.register_buffer("lambdas", torch.full((num_samples or 0,), float(lam0), dtype=torch.float64))

    @torch.no_grad()
    def adapt(self, d: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """One alternating step from `lam` (N,): p = softmax(d / lam), then the closed-form best lambda for p."""
        log_p = torch.log_softmax(d / lam[:, None], dim=1)
        kl = (log_p.exp() * log_p).sum(dim=1) + self.log_k          # KL(p || 1/K) = log K + sum p log p
        return self.lam0 * (1 - kl / (self.alpha * self.log_k))

    def forward(self, logits, targets, reduction: str = "mean", indices: Optional[torch.Tensor] = None):
        d = margin_differences(scores(logits, self.normalize), targets, self.margin)
        if indices is None:                    # outside training: every sample unseen, nothing stored
            previous = torch.full((len(d),), self.lam0, dtype=d.dtype, device=d.device)
        else:
            if len(self.lambdas) == 0:
                raise ValueError("aldr_kl was built without num_samples (the training split's size): it cannot "
                                 "keep per-sample lambdas; the runner passes it when the loss declares sample_indices")
            previous = self.lambdas[indices].to(d.dtype)
        lam = self.adapt(d.detach(), previous)
        if indices is not None:  # every rank's samples, gathered: the lambdas are the same on every rank
            self.lambdas[self.cluster.gather_rows(indices)] = self.cluster.gather_rows(lam).to(self.lambdas.dtype)
        losses = ldr_kl(d, lam) - self.rho / 2 * (lam - self.lam0) ** 2
        return _reduce(losses, reduction)


@LOSSES.register("ldr_kl", LDRParams, "LDR-KL loss (Zhu, Ying, Yang 2023)")
def build_ldr_kl(num_classes: int, lam: float, margin: float, normalize: str) -> nn.Module:
    return LDRKL(lam, margin, normalize)


@LOSSES.register("aldr_kl", ALDRParams, "adaptive LDR-KL loss, a lambda per sample (Zhu, Ying, Yang 2023)",
                 sample_indices=True)
def build_aldr_kl(num_classes: int, lam0: float, alpha: float, margin: float, normalize: str,
                  num_samples: Optional[int] = None) -> nn.Module:
    return ALDRKL(num_classes, num_samples, lam0, alpha, margin, normalize)
