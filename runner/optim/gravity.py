"""Gravity (Dariush Bahrami, Sadegh Pouriyan Zadeh, "Gravity Optimizer: a Kinematic Approach on Optimization in
Deep Learning", arXiv:2101.09192 preprint, 2021). Reference implementation followed: the authors' PyTorch implementation
(dariush-bahrami/gravity.optimizer, implementations/gravity_optimizer_pytorch.py), which is the paper's Algorithm 1;
pytorch_optimizer's `Gravity` computes the same update (the oracle of tests/test_gravity.py).

Update, per parameter tensor (the paper's "layer") with gradient g, at step t = 1, 2, ...:
    V_0 ~ N(0, (alpha / lr)^2)               drawn once per tensor when the optimizer is built (std alpha / lr)
    beta_t = (beta t + 1) / (t + 2)          (a running-average weight that rises from (beta + 1)/3 to beta)
    m      = 1 / max|g|                      (over the tensor)
    zeta   = g / (1 + (g / m)^2)             (the kinematic step: a gradient shrunk where |g| is large)
    V_t    = beta_t V_{t-1} + (1 - beta_t) zeta
    w     <- w - lr V_t
Defaults (the authors' PyTorch implementation): lr 0.1, alpha 0.01, beta 0.9. No weight decay (the paper has none).

Conventions:
- t counts from 1 at the first step (the authors' PyTorch code and pytorch_optimizer; the Keras snippet of the
  authors' README reads t from `iterations`, which is 0 at the first step, i.e. beta_t = 1/2 there).
- V_0 is drawn at construction from torch's global generator (seeded by the run), with the lr given then (the peak
  lr: a warmup that starts the schedule at lr 0 would otherwise make the std infinite); it is in `state_dict()`.
  pytorch_optimizer draws it at the first step with the group's lr of that moment: the same draws when the lr is
  unchanged and nothing else used the generator in between (how the oracle test compares them).
- A zero gradient gives m = inf, zeta = 0 (no nan): V only decays.
- The step count is the group's `t`, kept in the checkpoint with the groups.
Works as the base of the SAM-family wrappers (`optimizer=sam optimizer.base=gravity`): its step needs no closure.
"""
from dataclasses import dataclass

import torch

from runner.config import check
from runner.optim import OPTIMIZERS, no_threshold
from runner.optim.params import LR


class Gravity(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1, alpha: float = 0.01, beta: float = 0.9):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        super().__init__(params, dict(lr=lr, alpha=alpha, beta=beta, t=0))
        for group in self.param_groups:
            std = group["alpha"] / group["lr"]
            for p in group["params"]:
                self.state[p]["v"] = torch.empty_like(p, memory_format=torch.preserve_format).normal_(0.0, std)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["t"] += 1
            t, beta = group["t"], group["beta"]
            beta_t = (beta * t + 1) / (t + 2)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Gravity does not support sparse gradients")
                grad, v = p.grad, self.state[p]["v"]
                m = 1 / grad.abs().max()
                zeta = grad / (1 + (grad / m) ** 2)
                v.mul_(beta_t).add_(zeta, alpha=1 - beta_t)
                p.add_(v, alpha=-group["lr"])
        return loss


@dataclass
class GravityParams(LR):
    lr: float = 0.1      # learning rate (schedules scale it); V's initial std is alpha / lr with this value
    alpha: float = 0.01  # scale of V's random initialization (std alpha / lr)
    beta: float = 0.9    # the running average's weight beta_t = (beta t + 1) / (t + 2) tends to beta

    def check(self):
        check(self.alpha >= 0, "alpha", self.alpha, ">= 0")
        check(0 <= self.beta < 1, "beta", self.beta, "[0, 1)")


@OPTIMIZERS.register("gravity", GravityParams, "Gravity (Bahrami & Pouriyan Zadeh 2021): kinematic step "
                     "g / (1 + (g max|g|)^2) with a running-average velocity", passes_per_step=1,
                     stability=no_threshold("the kinematic step g / (1 + (g max|g|)^2) is not linear in g"))
def gravity(params, lr, alpha, beta) -> torch.optim.Optimizer:
    return Gravity(params, lr=lr, alpha=alpha, beta=beta)
