"""Grams: Gradient Descent with Adaptive Momentum Scaling (Yang Cao, Xiaoyu Li, Zhao Song, arXiv:2412.17107, 2024;
ICLR 2025 workshop).

Adam's moments set the size of each coordinate's step; the sign of the current gradient sets its direction:
    w <- w * (1 - lr * weight_decay)                 # decoupled weight decay, scaled by lr, on w before the step
    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g²,   t <- t + 1
    w <- w - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * sign(g) * |m| / (sqrt(v) + eps)
Defaults (the official release's): lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0.0.

Epsilon placement, the point of difference between implementations. The official release (the `grams-pytorch`
package, version 0.0.2, that github.com/Gunale0926/Grams installs; its `grams.py`, written in the style of
Hugging Face's old AdamW) adds eps to sqrt(v) of the *uncorrected* second moment and folds both bias corrections
into the step size, as above. Written with the bias-corrected moments m̂ = m / (1 - beta1^t),
v̂ = v / (1 - beta2^t) that is
    w <- w - lr * sign(g) * |m̂| / (sqrt(v̂) + eps / sqrt(1 - beta2^t)),
so the effective epsilon is eps / sqrt(1 - beta2^t): about 31.6 eps at the first step with beta2 = 0.999, tending
to eps. pytorch_optimizer's `Grams` (and the paper's algorithm, written with m̂, v̂) uses sqrt(v̂) + eps. The two
agree exactly when eps = 0, or when pytorch_optimizer's eps at step t is eps / sqrt(1 - beta2^t)
(tests/test_grams.py checks both). This file follows the official release.

Other conventions, as the official release: weight decay is applied to the weights before the moments and the
step (w_t = (1 - lr wd) w_{t-1} - lr u_t, u_t from the gradient at w_{t-1}); the step count t is kept per
parameter (a parameter without a gradient is neither decayed nor counted); bias correction is always on (the
release's `correct_bias=False` option, for BERT-style training, is not offered). Unlike the release, the gradient
in `p.grad` is left as it was (the release overwrites it with sign(g) |m|).
State per parameter: `step` (int), `exp_avg` (m), `exp_avg_sq` (v).
"""
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from runner.optim import ADAPTIVE, OPTIMIZERS, no_threshold
from runner.optim.params import LR, Betas, Eps, WeightDecay


class Grams(torch.optim.Optimizer):
    """Grams (Cao, Li, Song 2024) with the official release's epsilon placement (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            by_step = defaultdict(lambda: ([], [], [], []))  # t -> (params, grads, m, v): one bias correction each
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Grams does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                bucket = by_step[state["step"]]
                for lst, x in zip(bucket, (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    lst.append(x)
            for t, (params, grads, exp_avgs, exp_avg_sqs) in by_step.items():
                if wd != 0:
                    torch._foreach_mul_(params, 1 - lr * wd)                        # w *= 1 - lr wd
                torch._foreach_mul_(exp_avgs, beta1)                                # m = beta1 m + (1 - beta1) g
                torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)                             # v = beta2 v + (1 - beta2) g²
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
                denom = torch._foreach_sqrt(exp_avg_sqs)                            # sqrt(v) + eps (v uncorrected)
                torch._foreach_add_(denom, eps)
                step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                update = torch._foreach_sign(grads)                                 # sign(g) |m|
                torch._foreach_mul_(update, torch._foreach_abs(exp_avgs))
                torch._foreach_addcdiv_(params, update, denom, value=-step_size)
        return loss


@dataclass
class GramsParams(Eps, Betas, WeightDecay, LR):
    eps: float = 1e-6
    weight_decay: float = 0.0


@OPTIMIZERS.register("grams", GramsParams, "Grams (Cao et al. 2024): sign of the gradient, Adam's |m|/(sqrt(v)+eps) "
                     "as the magnitude; official release's eps placement", passes_per_step=1,
                     stability=no_threshold(ADAPTIVE))
def grams(params, lr, betas, eps, weight_decay) -> torch.optim.Optimizer:
    return Grams(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
