"""SAM: Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021); ASAM (Kwon et al. 2021).

Update, per step with gradient g(w) of the batch loss L (runner/optim/perturbation.py does the rest):
    e(w) = rho * T² g / ||T g||,  T = I (SAM) or diag(|w|) (ASAM, `adaptive=True`)
    w   <- base_step(w, g(w + e(w)))
Cost: 2 forward+backward passes per step.

Conventions (davda54/sam, the reference PyTorch port):
- the gradient norm is over all parameters of all groups; epsilon 1e-12 is added to the norm, not inside it;
- ASAM scales every parameter, biases and BN included, with T = |w| (no eta);
- weight decay is applied by the base optimizer to g(w + e(w)) (coupled L2 for SGD), not in the perturbation;
- BN running statistics are updated by the first pass only (the loop's closure, runner/step.py).
"""
from dataclasses import dataclass

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import PerturbationOptimizer


class SAM(PerturbationOptimizer):
    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **base_kwargs):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), **base_kwargs)

    def perturbation(self, groups):
        scaled = []                                                             # T g, per group
        for ps, g in groups:
            grads = [p.grad for p in ps]
            scaled += torch._foreach_mul(torch._foreach_abs(ps), grads) if g["adaptive"] and ps else grads
        norm = paramspace.global_norm(scaled)                                   # ||T g||
        e = []
        for ps, g in groups:
            if not ps:
                e.append([])
                continue
            grads = [p.grad for p in ps]
            e_w = torch._foreach_mul(torch._foreach_mul(ps, ps), grads) if g["adaptive"] else grads  # T² g
            e.append(torch._foreach_mul(e_w, g["rho"] / (norm + 1e-12)))       # rho T² g / ||T g||
        return e


@dataclass
class SAMParams(Wraps, Betas, Nesterov, Momentum, WeightDecay, LR):
    rho: float = 0.05        # radius of the perturbation ball
    adaptive: bool = False   # ASAM
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.rho >= 0, "rho", self.rho, ">= 0")


@OPTIMIZERS.register("sam", SAMParams, "SAM (Foret et al. 2021) / ASAM over any base optimizer", passes_per_step=2)
def sam(params, rho, adaptive, base, **shared) -> torch.optim.Optimizer:
    """`base` is the validated base optimizer (a Choice); `shared` were handed to it during validation."""
    return SAM(params, base.build, rho=rho, adaptive=adaptive)
