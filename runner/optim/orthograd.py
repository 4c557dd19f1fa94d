"""⊥Grad / OrthoGrad (Prieto, Barsbey, Mediano, Birdal, "Grokking at the Edge of Numerical Stability", ICLR 2025),
a wrapper over any one-pass base optimizer (`optimizer=orthograd optimizer.base=adamw`, or the nested
`optimizer.base={name: adamw, ...}`).

Update, per step, for each parameter tensor w with gradient g (flattened, each tensor on its own):
    g_perp = g - (w·g) / (w·w + 1e-30) · w          # remove the component along w
    g     <- g_perp · ||g|| / (||g_perp|| + 1e-30)  # rescaled to the norm g had
    w     <- base_step(w, g)
so the step cannot simply scale the weights along their own direction ("naïve loss minimization", which drives
the logits to softmax collapse): with plain SGD (no momentum, no weight decay) the update is orthogonal to w.

Reference followed: the paper's code (LucasPrietoAl/grokking-at-the-edge-of-numerical-stability, orthograd.py, read
in EIFY's fork: eps 1e-30 added to w·w and to ||g_perp||, computed in the parameter's dtype, every parameter);
pytorch_optimizer.OrthoGrad (>= 4.1) is the same rule (it also computes in float32 for half-precision parameters
and zeroes g_perp when g is parallel to w to rounding: both only matter in degenerate cases; our oracle test
compares the two). Weight decay, momentum, Adam moments: the base optimizer's, applied to the projected gradient.

Defaults (conf/optimizer/orthograd.yaml): the paper's ⊥AdamW of its Figure 1 as its script states it (base adamw,
lr 1e-2, betas [0.9, 0.99], no weight decay). Note: in the paper's script the wrapper was built with torch's AdamW
defaults and the intended betas/eps were loaded into the wrapper's own param groups only (`load_state_dict` on the
wrapper replaces its group dicts, which the base no longer shares), so the published ⊥AdamW runs used betas
(0.9, 0.999) and eps 1e-8 (as noted in EIFY's fork, wd_experiments.sh); `optimizer.betas=[0.9,0.999]` gives that.
Either way ⊥AdamW reaches 95% test accuracy on addition mod 113 within 110-120 full-batch steps here (CPU, float32;
betas 0.99 with eps 1e-8: seeds 0-2; betas 0.999: seed 0; eps 1e-25: seed 0).

Cost: one forward+backward pass per step (the projection is a few reductions per tensor, no host sync).
`state_dict()` is the base optimizer's, so a checkpoint of the plain base optimizer loads into this wrapper too.
Parameter groups are shared with the base, so lr schedules reach it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List

import torch

from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Eps, Momentum, Nesterov, WeightDecay

EPS = 1e-30  # the paper's: added to w·w and to ||g_perp||


@torch.no_grad()
def orthogonalize_(params, eps: float = EPS) -> None:
    """Replace each parameter's gradient, in place, by its component orthogonal to the parameter, rescaled to the
    gradient's norm (per tensor, flattened). Parameters without a gradient are left alone."""
    for p in params:
        if p.grad is None:
            continue
        w, g = p.reshape(-1), p.grad.reshape(-1)
        g_perp = g - (torch.dot(w, g) / (torch.dot(w, w) + eps)) * w
        p.grad.copy_((g_perp * (torch.linalg.vector_norm(g) / (torch.linalg.vector_norm(g_perp) + eps)))
                     .view_as(p.grad))


class OrthoGrad(torch.optim.Optimizer):
    """`base(param_groups) -> Optimizer` builds the base optimizer over this wrapper's (shared) groups."""

    def __init__(self, params, base: Callable[[list], torch.optim.Optimizer], eps: float = EPS):
        super().__init__(params, {})
        self.base_optimizer = base(self.param_groups)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: lr schedules reach the base
        self.defaults.update(self.base_optimizer.defaults)
        self.eps = eps

    @torch.no_grad()
    def step(self, closure=None):
        """The closure (if any) computes g at w; the gradients are projected; the base takes its step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            orthogonalize_(group["params"], self.eps)
        self.base_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


@dataclass
class OrthoGradParams(Wraps, Eps, Betas, Nesterov, Momentum, WeightDecay, LR):
    """Flat spelling: lr, betas, eps, momentum, nesterov, weight_decay go to the base where its schema has them."""
    base: Any = "adamw"
    lr: float = 1e-2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0


@OPTIMIZERS.register("orthograd", OrthoGradParams, "⊥Grad (Prieto et al. 2025): the gradient made orthogonal to "
                     "the weights (norm kept), then any one-pass base optimizer", passes_per_step=1)
def orthograd(params, base, **shared) -> torch.optim.Optimizer:
    """`base` is the validated base optimizer (a Choice); `shared` were handed to it during validation."""
    return OrthoGrad(params, base=base.build)
