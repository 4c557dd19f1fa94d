"""Lion: EvoLved Sign Momentum (Xiangning Chen, Chen Liang, Da Huang, Esteban Real, Kaiyuan Wang, Hieu Pham,
Xuanyi Dong, Thang Luong, Cho-Jui Hsieh, Yifeng Lu, Quoc V. Le, "Symbolic Discovery of Optimization Algorithms",
NeurIPS 2023, arXiv:2302.06675).

Update, per parameter w with gradient g and momentum m (m_0 = 0), every step (paper Algorithm 2):
    w <- w * (1 - lr * weight_decay)                 # decoupled weight decay, scaled by lr
    c  = beta1 * m + (1 - beta1) * g                 # interpolation: only its sign is used
    w <- w - lr * sign(c)                            # every coordinate moves by exactly lr (sign(0) = 0)
    m <- beta2 * m + (1 - beta2) * g                 # the momentum is tracked with beta2, not beta1
Defaults: lr 1e-4, betas (0.9, 0.99), weight_decay 0.0, those of the official code. The paper advises an lr
3-10x smaller than AdamW's and a weight decay 3-10x larger (the effective decay lr * weight_decay stays similar).

Reference implementation followed: the official PyTorch code, google/automl `lion/lion_pytorch.py`, operation for
operation (weight decay first, on the weights before the step, as `w *= 1 - lr * wd`; the interpolation as
`m * beta1 + g * (1 - beta1)`; then the momentum update). No epsilon, no bias correction. pytorch_optimizer's
`Lion` (weight_decouple=True, fixed_decay=False, its defaults) computes the same rule with `lerp`, so it agrees up
to rounding (tests/test_lion.py). Only parameters with a gradient are decayed and stepped. State: `exp_avg` (m).
"""
from dataclasses import dataclass, field
from typing import List

import torch

from runner.optim import OPTIMIZERS, no_threshold
from runner.optim.params import LR, Betas, WeightDecay


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., NeurIPS 2023); hyperparameters are read from each param group at every step, so lr
    schedules and wrappers (SAM and kin hand their param groups to the base) reach it."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = []
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                grads.append(p.grad)
            exp_avgs = []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avgs.append(state["exp_avg"])
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)                    # w *= 1 - lr wd
            update = torch._foreach_mul(exp_avgs, beta1)                    # c = beta1 m + (1 - beta1) g
            torch._foreach_add_(update, grads, alpha=1 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-lr)                  # w -= lr sign(c)
            torch._foreach_mul_(exp_avgs, beta2)                            # m = beta2 m + (1 - beta2) g
            torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)
        return loss


@dataclass
class LionParams(Betas, WeightDecay, LR):
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0


@OPTIMIZERS.register("lion", LionParams, "Lion (Chen et al., NeurIPS 2023): sign of interpolated momentum; "
                     "decoupled weight decay scaled by lr", passes_per_step=1,
                     stability=no_threshold("a sign step: its size does not depend on the curvature"))
def lion(params, lr, betas, weight_decay) -> torch.optim.Optimizer:
    return Lion(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
