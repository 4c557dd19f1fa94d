"""LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022).

Update, with g = grad L(w) of the batch and t the step count (0, 1, 2, ...):
    t % k == 0 (a SAM step):  e = rho g / ||g||,  g_s = grad L(w + e),
                              g_v = g_s - ||g_s|| cos(g, g_s) g / ||g|| = g_s - (<g_s, g> / ||g||²) g   (kept)
                              w <- base_step(w, g_s)
    otherwise (one pass):     w <- base_step(w, g + alpha (||g|| / ||g_v||) g_v)
g_v is the component of SAM's gradient orthogonal to g; it changes slowly, so it is computed every k steps and
reused in between, rescaled to the current gradient's norm. Norms and the projection are over all parameters
(the whole gradient vector, as the paper writes them).
Cost: 2 forward+backward passes on SAM steps and 1 on the others: 1 + 1/k per step on average (exactly
1 + 1/k over a multiple of k steps; the loop measures it). The second pass is really skipped.

Reference implementations and how ours differs:
- The paper's authors released no code. pytorch_optimizer's LookSAM (4.1) computes g before `step` and calls
  the closure in EVERY step: off the SAM steps it skips the perturbation but still recomputes the gradient at w,
  so it costs 2 passes per step like SAM and saves nothing. It also takes g_v's projection and the reuse step's
  ||g|| / ||g_v|| per parameter tensor, not over the whole vector, and adds 1e-8 to ||g_v||. Ours follows the
  paper (global norms); e adds 1e-12 to ||g|| as our SAM does, and the projection and the ratio divide by norms
  clamped at 1e-12 (exactly the paper's formulas unless a gradient vanishes).
- The step count and g_v are in `state_dict()` (tensors, readable with weights_only), so a run resumed in the
  middle of a k-cycle reuses the g_v the uninterrupted run would have reused.
- A SAM step that is skipped (non-finite gradient, `skip_nonfinite`) keeps the previous g_v.
- Weight decay: the engine's flag; by default in the base optimizer, so g, g_s and g_v are data gradients.
- Look-LayerSAM (the paper's layer-wise scaling for large batches) is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs


class LookSAM(PerturbationOptimizer):
    def __init__(self, params, base_optimizer, rho: float = 0.05, k: int = 5, alpha: float = 0.7, **kwargs):
        if rho < 0 or k < 1 or alpha < 0:
            raise ValueError(f"need rho >= 0, k >= 1, alpha >= 0; got {rho}, {k}, {alpha}")
        super().__init__(params, base_optimizer, dict(rho=rho, k=k, alpha=alpha), **kwargs)
        self.steps = 0                                  # steps taken (skipped ones included)
        self.g_v: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its part of g_v

    @property
    def k(self) -> int:
        return int(self.param_groups[0]["k"])

    def perturbation(self, groups):
        """SAM's e = rho g / ||g|| (norm over all parameters)."""
        norm = paramspace.global_norm([p.grad for ps, _ in groups for p in ps])
        return [torch._foreach_mul([p.grad for p in ps], g["rho"] / (norm + 1e-12)) if ps else []
                for ps, g in groups]

    def step(self, closure=None):
        closure = self._checked(closure)
        sam_step = self.steps % self.k == 0
        self.steps += 1
        loss = closure()                                          # g(w)
        self.after_pass()
        if sam_step:
            params = self.params_with_grad()
            g = [p.grad.clone() for p in params]
            self.ascend()                                         # w + rho g / ||g||
            closure()                                             # g_s = g(w + e)
            self.after_pass()
            with torch.no_grad():
                g_s = self.grads()
                unit = torch._foreach_div(g, paramspace.global_norm(g).clamp_min(1e-12))
                g_v = torch._foreach_sub(g_s, torch._foreach_mul(unit, paramspace.dot(g_s, unit)))
            if self.commit():                                     # w <- base_step(w, g_s)
                self.g_v = dict(zip(params, g_v))
            return loss
        if self.g_v:                                              # g + alpha ||g|| / ||g_v|| g_v
            with torch.no_grad():
                params = [p for p in self.params_with_grad() if p in self.g_v]
                g_v = [self.g_v[p] for p in params]
                ratio = paramspace.global_norm(self.grads()) / paramspace.global_norm(g_v).clamp_min(1e-12)
                for group in self.param_groups:
                    mine = [p for p in group["params"] if p in self.g_v and p.grad is not None]
                    if mine:
                        torch._foreach_add_([p.grad for p in mine],
                                            torch._foreach_mul([self.g_v[p] for p in mine], ratio * group["alpha"]))
        self.commit()
        return loss

    # ------------------------------------------------------------------------------------------- state
    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self):
        index = {p: i for i, p in enumerate(self._all_params())}
        return {**super().state_dict(), "looksam_steps": self.steps,
                "looksam_g_v": {index[p]: v for p, v in self.g_v.items()}}

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop("looksam_steps", 0))
        g_v = state_dict.pop("looksam_g_v", {})
        super().load_state_dict(state_dict)
        params = self._all_params()
        self.g_v = {params[int(i)]: v.to(device=params[int(i)].device, dtype=params[int(i)].dtype).clone()
                    for i, v in g_v.items()}


@dataclass
class LookSAMParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    rho: float = 0.05    # radius of the perturbation ball (SAM steps)
    k: int = 5           # a SAM step every k steps; g_v reused in between
    alpha: float = 0.7   # weight of the reused g_v, relative to ||g||
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.rho >= 0, "rho", self.rho, ">= 0")
        check(self.k >= 1, "k", self.k, ">= 1")
        check(self.alpha >= 0, "alpha", self.alpha, ">= 0")


@OPTIMIZERS.register("looksam", LookSAMParams, "LookSAM (Liu et al. 2022): SAM every k steps, its orthogonal "
                     "component reused in between", passes_per_step=lambda p: 1 + 1 / p.k)
def looksam(params, rho, k, alpha, base, weight_decay_in_loss, skip_nonfinite, **shared):
    kwargs = engine_kwargs(base, weight_decay_in_loss, skip_nonfinite)
    kwargs["base_optimizer"] = kwargs.pop("base")
    kwargs.pop("m")
    return LookSAM(params, rho=rho, k=k, alpha=alpha, **kwargs)
