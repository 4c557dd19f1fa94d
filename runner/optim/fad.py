"""FAD: Flatness-Aware Minimization for Domain Generalization (Xingxuan Zhang, Renzhe Xu, Han Yu, Yancheng Dong,
Pengfei Tian, Peng Cui, ICCV 2023, arXiv:2307.11108). NO REFERENCE CODE EXISTS (none released with the paper;
Papers with Code lists none): this is an implementation from our reading of the paper, not checked against anyone
else's code.

FAD optimizes zeroth-order and first-order flatness together:
    L_FAD(w) = L(w) + alpha R0(w) + beta R1(w),
    R0(w) = max_{||e|| <= rho} L(w + e) - L(w)                 (zeroth order: SAM's sharpness)
    R1(w) = rho max_{||e|| <= rho} ||g(w + e)||                (first order: GAM's gradient-norm flatness)
Each gradient is taken the way SAM and GAM do (first-order solution of the inner max, its dependence on w ignored),
with the Hessian-vector products replaced by finite differences of gradients with step rho, so that one pass
serves both terms. With û = u / (||u|| + 1e-12), the norm over all parameters:
    g0 = g(w)                                       # pass 1; BN running statistics updated here only
    g1 = g(w + rho ĝ0)                              # pass 2: grad R0 ~ g1 - g0
    f  = g1 - g0                                    # ~ rho H ĝ0 = rho grad ||g||(w): the ascent direction of ||g||
    w1 = w + rho f̂                                  # the point of largest gradient norm in the rho-ball
    g2 = g(w1)                                      # pass 3
    g3 = g(w1 + rho ĝ2)                             # pass 4: grad R1 = rho H(w1) ĝ2 ~ g3 - g2
    w <- base_step(w, g0 + alpha (g1 - g0) + beta (g3 - g2))
Cost: 4 forward+backward passes per step (w, w + rho ĝ0, w1, w1 + rho ĝ2). Memory: w, g0, g1, g2 kept.
alpha = 1, beta = 0 is SAM; alpha = 0, beta = 0 the base optimizer (at 4x the cost: the passes are still made).

Reading (what we implemented and why): we could not retrieve the text of the paper's algorithm, only its
abstract ("efficiently optimize both zeroth-order and first-order flatness simultaneously") and its authors'
earlier GAM (runner/optim/gam.py), whose R1 and finite-difference estimate this follows. We implemented the
objective above, a weighted sum of the loss and the two flatness measures, and its gradient estimated with 4
passes by reusing SAM's second pass for the finite-difference direction of grad ||g||. If the paper combines the
terms otherwise (e.g. a GSAM-style decomposition as in GAM's released code, separate radii for R0 and R1, or a
finite-difference step other than rho), this file is the place to change: `direction` and the radii.

Defaults are NOT the paper's (it reports DomainBed settings we could not retrieve; it gives none for CIFAR-10):
rho 0.05 (SAM's CIFAR radius), alpha 1 (the zeroth-order term at full weight: L + R0 is SAM's objective), beta 1
(the first-order term at the same weight), base SGD lr 0.05 momentum 0.9 weight decay 5e-4 (as our SAM).

Conventions (ours, as for SAM in this project): 1e-12 added to each norm; weight decay by the base optimizer,
applied to the combined direction (`weight_decay_in_loss=true` adds wd·w to every pass's gradient instead); BN
running statistics from the first pass only; w restored by copy; the loss returned is the one at w.
"""
from dataclasses import dataclass

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs


class FAD(PerturbationOptimizer):
    """`rho`: radius of both flatness balls (and the finite-difference step); `alpha`, `beta`: weights of the
    zeroth- and first-order flatness terms."""

    def __init__(self, params, base, rho: float = 0.05, alpha: float = 1.0, beta: float = 1.0, **kwargs):
        if rho <= 0 or alpha < 0 or beta < 0:
            raise ValueError(f"rho must be > 0, alpha and beta >= 0, got {rho}, {alpha}, {beta}")
        super().__init__(params, base, dict(rho=rho, alpha=alpha, beta=beta), **kwargs)

    def _along(self, v: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """rho * v / (||v|| + 1e-12) per group, the norm over all parameters: a perturbation for `perturb`."""
        norm = paramspace.global_norm(v)
        e, start = [], 0
        for ps, group in self._groups():
            part = v[start:start + len(ps)]
            e.append(torch._foreach_mul(part, group["rho"] / (norm + 1e-12)) if ps else [])
            start += len(ps)
        return e

    def _grads(self) -> list[torch.Tensor]:
        return [g.clone() for g in self.grads()]

    @torch.no_grad()
    def direction(self, g0, g1, g2, g3) -> list[torch.Tensor]:
        """g0 + alpha (g1 - g0) + beta (g3 - g2): the gradient of L + alpha R0 + beta R1 (module docstring)."""
        weights = [(group["alpha"], group["beta"]) for ps, group in self._groups() for _ in ps]
        return [a0 + alpha * (a1 - a0) + beta * (a3 - a2)
                for (alpha, beta), a0, a1, a2, a3 in zip(weights, g0, g1, g2, g3)]

    def step(self, closure=None):
        closure = self._checked(closure)
        loss = closure()                                          # g0 = g(w)
        self.after_pass()
        g0 = self._grads()
        self.perturb(self._along(g0))                             # w + rho ĝ0
        closure()                                                 # g1
        self.after_pass()
        g1 = self._grads()
        self.restore()
        self.perturb(self._along(torch._foreach_sub(g1, g0)))     # w1 = w + rho f̂, f = g1 - g0
        closure()                                                 # g2 = g(w1)
        self.after_pass()
        g2 = self._grads()
        self.perturb(self._along(g2))                             # w1 + rho ĝ2
        closure()                                                 # g3
        self.after_pass()
        with torch.no_grad():
            for p, u in zip(self.params_with_grad(), self.direction(g0, g1, g2, self.grads())):
                p.grad.copy_(u)
        self.commit()                                             # w <- base_step(w, g0 + alpha R0' + beta R1')
        return loss


@dataclass
class FADParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    rho: float = 0.05     # radius of both flatness balls and the finite-difference step
    alpha: float = 1.0    # weight of zeroth-order flatness R0 (1: SAM's objective)
    beta: float = 1.0     # weight of first-order flatness R1 (GAM's)
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.rho > 0, "rho", self.rho, "> 0")
        check(self.alpha >= 0, "alpha", self.alpha, ">= 0")
        check(self.beta >= 0, "beta", self.beta, ">= 0")


@OPTIMIZERS.register("fad", FADParams, "FAD (Zhang et al. 2023): zeroth- plus first-order flatness, from the paper "
                     "(no reference code exists), 4 passes", passes_per_step=4)
def fad(params, rho, alpha, beta, base, weight_decay_in_loss, skip_nonfinite, **shared):
    """FAD over the validated base optimizer (`shared` were handed to it during validation)."""
    return FAD(params, rho=rho, alpha=alpha, beta=beta, **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
