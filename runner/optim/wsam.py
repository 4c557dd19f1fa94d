"""WSAM: Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization Term (Yue, Jiang, Ye, Gao,
Liu, Zhang; KDD 2023).

The loss is L(w) + gamma/(1 - gamma) · [max_{||e|| <= rho} L(w + e) - L(w)]: SAM's sharpness as a regularizer with
its own weight alpha = gamma/(1 - gamma) (gamma = 1/2 is SAM, gamma = 0 the base optimizer). Per step:
    g = g(w),  e = rho g / (||g|| + 1e-12),  g_sam = g(w + e),  h = g_sam - g      (the sharpness term's gradient)
    decoupled (default, the paper's Algorithm 1 and its recommendation):
        w <- base_step(w, g) - lr_t alpha h           (h taken by plain SGD at the scheduled lr, outside the
                                                       base's momentum / Adam moments, as AdamW decouples decay)
    coupled (`decouple=false`):
        w <- base_step(w, g + alpha h)                 (= alpha g_sam + (1 - alpha) g)
Cost: 2 forward+backward passes per step and one more gradient-sized buffer (g kept across the second pass). No
m-sharpness: it would need each chunk's g(w) as well as its g(w + e), which the engine's m-sharpness step does not
keep.

Conventions, as the authors' code (atorch WeightedSAM) and pytorch_optimizer.WSAM: the norm is over all parameters
of all groups; the decoupled term uses group["lr"] after the base step (the scheduled lr of this step); with a
base weight decay (the default) g, g_sam and h are data gradients and the base decays w with g; with
`weight_decay_in_loss=true` g carries wd·w and g_sam wd·(w + e), so h carries wd·e. A step with a non-finite
gradient in either pass is skipped whole (base step and the decoupled term) and counted. Differences from the
references: w is restored by copy, not by subtracting e; no `max_norm` of our own: the loop's `trainer.grad_clip`
clips every pass's gradient, as atorch's code clips both g and g_sam (max_norm 1.0 there; pytorch_optimizer clips
g_sam only, off by default); clipping g first leaves e unchanged (e is normalized); no `adaptive` variant.
"""
from dataclasses import dataclass

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs


class WSAM(PerturbationOptimizer):
    def __init__(self, params, base, rho: float = 0.05, gamma: float = 0.9, decouple: bool = True, **kwargs):
        if rho < 0 or not 0 <= gamma < 1:
            raise ValueError(f"need rho >= 0 and 0 <= gamma < 1, got rho={rho}, gamma={gamma}")
        if kwargs.get("m") is not None:
            raise ValueError("WSAM here has no m-sharpness")
        super().__init__(params, base, dict(rho=rho, gamma=gamma, decouple=decouple), **kwargs)
        self._g: list[torch.Tensor] | None = None      # g(w) across the second pass; then h (decoupled)

    def perturbation(self, groups):
        norm = paramspace.global_norm([p.grad for ps, _ in groups for p in ps])               # ||g||
        return [torch._foreach_mul([p.grad for p in ps], g["rho"] / (norm + 1e-12)) if ps else []
                for ps, g in groups]                                                         # rho g / ||g||

    def step(self, closure=None):
        closure = self._checked(closure)
        loss = closure()                    # g(w)
        self.after_pass()
        grads = self.grads()
        self._g = paramspace.snapshot(grads, into=self._g if self._g is not None and len(self._g) == len(grads)
                                      else None)
        self.ascend()                       # w + e
        closure()                           # g_sam = g(w + e)
        self.after_pass()
        decoupled = []                      # (params, h, step size) of each decoupled group
        with torch.no_grad():
            offset = 0
            for ps, group in self._groups():
                g, g_sam = self._g[offset:offset + len(ps)], [p.grad for p in ps]
                alpha = group["gamma"] / (1 - group["gamma"])
                if ps and group["decouple"]:
                    torch._foreach_sub_(g_sam, g)                  # p.grad <- h = g_sam - g
                    for i, p in enumerate(ps):                     # swap buffers: p.grad <- g, ours keep h
                        self._g[offset + i], p.grad = p.grad, self._g[offset + i]
                    decoupled.append((ps, self._g[offset:offset + len(ps)], group["lr"] * alpha))
                elif ps:
                    torch._foreach_lerp_(g_sam, g, 1 - alpha)      # g_sam + (1 - alpha)(g - g_sam) = g + alpha h
                offset += len(ps)
        if self.commit() and decoupled:     # back to w, base step with g (or g + alpha h)
            with torch.no_grad():
                for ps, h, size in decoupled:
                    torch._foreach_add_(ps, h, alpha=-size)    # w <- w - lr alpha h
        return loss


@dataclass
class WSAMParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    rho: float = 0.05        # radius of the perturbation ball
    gamma: float = 0.9       # sharpness weight alpha = gamma / (1 - gamma); 0.5 is SAM
    decouple: bool = True    # sharpness term by plain SGD after the base step (the paper's); false: in the gradient
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.rho >= 0, "rho", self.rho, ">= 0")
        check(0 <= self.gamma < 1, "gamma", self.gamma, "[0, 1)")


@OPTIMIZERS.register("wsam", WSAMParams, "WSAM (Yue et al. 2023): SAM's sharpness as a regularizer weighted by "
                     "gamma/(1-gamma), decoupled from the base step", passes_per_step=2)
def wsam(params, rho, gamma, decouple, base, weight_decay_in_loss, skip_nonfinite, **shared):
    return WSAM(params, rho=rho, gamma=gamma, decouple=decouple,
                **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
