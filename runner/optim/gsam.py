"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization (Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda,
Duncan, Liu; ICLR 2022, published as "Surrogate Gap Minimization Improves Sharpness-Aware Training").

Update, per step with g = g(w), the gradient of the batch loss at w (paper, Algorithm 1):
    rho_t  = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)    # rho follows the lr schedule
    e      = rho_t g / (||g|| + 1e-12)
    g_sam  = g(w + e)                                     # the perturbed loss's gradient
    g_par  = (<g, g_sam> / ||g_sam||²) g_sam,   g_orth = g - g_par   # g split along g_sam and orthogonal to it
    w     <- base_step(w, g_sam - alpha g_orth)
Descending along g_sam minimizes the perturbed loss f_p; -alpha g_orth is an ascent step on f along the direction
orthogonal to g_sam, which lowers the surrogate gap h = f_p - f without changing f_p to first order. rho_max = rho_min
and alpha = 0 is SAM. Cost: 2 forward+backward passes per step (no m-sharpness: the decomposition is of the batch's
gradients; the authors' code decomposes per worker, which on one device is the whole batch).

The sign: every reference agrees with the paper, final gradient g_sam - alpha g_orth: big_vision's gsam.py
(`g_robust - alpha * (g_clean - <g_clean, ĝ_robust> ĝ_robust)`), juntang-zhuang/GSAM and pytorch_optimizer
(`p.grad.add_(old_g - cos ||old_g|| g / ||g||, alpha=-alpha)`, p.grad holding g_sam). We compute the projection as
they do, cos = <g, g_sam> / (||g|| ||g_sam|| + 1e-12), g_par = cos ||g|| g_sam / (||g_sam|| + 1e-12).

The rho schedule: lr_t is the param group's scheduled lr (group["lr"], what the base step uses this step); lr_max is
the group's peak, group["initial_lr"] when a torch scheduler set it (the runner's LambdaLR does), else the lr the
group had when this optimizer was built; lr_min is a hyperparameter (default 0, the runner's cosine schedule ends at
0; big_vision passes the schedule's end lr). lr_max <= lr_min gives rho_max. Differences from the references, on
purpose: (1) rho_t per param group from that group's own lr (pytorch_optimizer's / the authors' ProportionScheduler
reads param_groups[0] only; the same with one group or one schedule for all); (2) lr outside [lr_min, lr_max] is
clamped, so rho_t stays in [rho_min, rho_max] (the references extrapolate: a warmup from 0 with lr_min > 0 would give
a negative rho, a perturbation up the wrong way); (3) rho_t is computed inside `step` from the current lr, not by a
separate `update_rho_t()` call after the scheduler (the same value: the lr the step uses); (4) w is restored by copy,
not by subtracting e; (5) no `adaptive` (ASAM-style) variant: the paper's GSAM is the plain one, and big_vision's
(|w|) and the PyTorch ports' (w²) adaptive variants disagree.
Conventions shared with SAM (runner/optim/sam.py): the norms are over all parameters of all groups; weight decay by
the base optimizer (pytorch_optimizer, the authors' PyTorch code: both g and g_sam are data gradients) unless
`weight_decay_in_loss=true`, then wd·w enters g and wd·(w + e) enters g_sam before the decomposition; BN running
statistics from the first pass only; a step with a non-finite gradient in either pass is skipped and counted (the
decomposition of a non-finite gradient is non-finite too, so nothing else guards it).
"""
from dataclasses import dataclass

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs

EPS = 1e-12


class GSAM(PerturbationOptimizer):
    def __init__(self, params, base, rho_max: float = 0.05, rho_min: float = 0.01, alpha: float = 0.2,
                 lr_min: float = 0.0, **kwargs):
        if not 0 <= rho_min <= rho_max:
            raise ValueError(f"need 0 <= rho_min <= rho_max, got rho_min={rho_min}, rho_max={rho_max}")
        if alpha < 0 or lr_min < 0:
            raise ValueError(f"alpha and lr_min must be >= 0, got alpha={alpha}, lr_min={lr_min}")
        if kwargs.get("m") is not None:
            raise ValueError("GSAM has no m-sharpness: the decomposition is of the whole batch's gradients")
        super().__init__(params, base, dict(rho_max=rho_max, rho_min=rho_min, alpha=alpha, lr_min=lr_min), **kwargs)
        self._lr_built = [group["lr"] for group in self.param_groups]  # lr_max where no scheduler set initial_lr
        self._g: list[torch.Tensor] | None = None                       # g(w), kept across the second pass

    def rho_t(self, index: int, group: dict) -> float:
        """The group's radius this step: linear in its scheduled lr between (lr_min, rho_min) and (lr_max, rho_max)."""
        lr_max = group.get("initial_lr", self._lr_built[index] if index < len(self._lr_built) else group["lr"])
        lr_min, rho_max, rho_min = group["lr_min"], group["rho_max"], group["rho_min"]
        if lr_max <= lr_min:
            return rho_max
        fraction = min(1.0, max(0.0, (group["lr"] - lr_min) / (lr_max - lr_min)))
        return rho_min + (rho_max - rho_min) * fraction

    def perturbation(self, groups):
        norm = paramspace.global_norm([p.grad for ps, _ in groups for p in ps])           # ||g||
        index = {id(g): i for i, g in enumerate(self.param_groups)}
        return [torch._foreach_mul([p.grad for p in ps], self.rho_t(index[id(g)], g) / (norm + EPS)) if ps else []
                for ps, g in groups]                                                     # rho_t g / ||g||

    @torch.no_grad()
    def decompose(self, g: list[torch.Tensor]) -> None:
        """p.grad <- g_sam - alpha g_orth, with p.grad holding g_sam and `g` the gradients at w (same order)."""
        groups = self._groups()
        g_sam = [p.grad for ps, _ in groups for p in ps]
        inner = torch.stack([torch.vdot(a.flatten(), b.flatten()) for a, b in zip(g, g_sam)]).sum()
        norm_g, norm_sam = paramspace.global_norm(g), paramspace.global_norm(g_sam)
        cosine = inner / (norm_g * norm_sam + EPS)
        along = cosine * norm_g / (norm_sam + EPS)                  # g_par = along · g_sam  (a 0-d tensor, no sync)
        start = 0
        for ps, group in groups:
            if not ps:
                continue
            g_group, sam_group = g[start:start + len(ps)], g_sam[start:start + len(ps)]
            start += len(ps)
            orth = torch._foreach_sub(g_group, torch._foreach_mul(sam_group, along))          # g - g_par
            torch._foreach_add_(sam_group, orth, alpha=-group["alpha"])                       # g_sam - alpha g_orth

    def step(self, closure=None):
        closure = self._checked(closure)
        loss = closure()                    # g(w)
        self.after_pass()
        grads = self.grads()
        self._g = paramspace.snapshot(grads, into=self._g if self._g is not None and len(self._g) == len(grads)
                                      else None)
        self.ascend()                       # w + e, e = rho_t g / ||g||
        closure()                           # g_sam = g(w + e)
        self.after_pass()
        self.decompose(self._g)             # p.grad <- g_sam - alpha g_orth
        self.commit()                       # back to w, base step
        return loss


@dataclass
class GSAMParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    rho_max: float = 0.05    # radius at the peak lr
    rho_min: float = 0.01    # radius at lr_min
    alpha: float = 0.2       # weight of the ascent step orthogonal to g_sam
    lr_min: float = 0.0      # the lr at which rho = rho_min (the schedule's end lr)
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.rho_max >= 0, "rho_max", self.rho_max, ">= 0")
        check(0 <= self.rho_min <= self.rho_max, "rho_min", self.rho_min, f"in [0, rho_max={self.rho_max}]")
        check(self.alpha >= 0, "alpha", self.alpha, ">= 0")
        check(self.lr_min >= 0, "lr_min", self.lr_min, ">= 0")


@OPTIMIZERS.register("gsam", GSAMParams, "GSAM (Zhuang et al. 2022): SAM's gradient minus alpha times the part of g "
                     "orthogonal to it; rho follows the lr schedule", passes_per_step=2)
def gsam(params, rho_max, rho_min, alpha, lr_min, base, weight_decay_in_loss, skip_nonfinite, **shared):
    return GSAM(params, rho_max=rho_max, rho_min=rho_min, alpha=alpha, lr_min=lr_min,
                **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
