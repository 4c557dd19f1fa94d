"""Adam without weight decay (Diederik P. Kingma, Jimmy Ba, "Adam: A Method for Stochastic Optimization", ICLR
2015), torch.optim.Adam with weight_decay fixed at 0: the grokking baselines (Prieto et al. 2025, "Grokking at the
Edge of Numerical Stability": the run that memorizes and does not generalize without weight decay).

Update, per parameter, t the step count (m_0 = v_0 = 0):
    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g²
    w <- w - lr * m̂ / (sqrt(v̂) + eps),   m̂ = m / (1 - beta1^t),  v̂ = v / (1 - beta2^t)
eps outside the square root, added to the bias-corrected sqrt(v̂) (torch's placement). Defaults: torch's and the
paper's, lr 1e-3, betas (0.9, 0.999), eps 1e-8.

There is deliberately no `weight_decay` field: the schema has none, so `optimizer.weight_decay=...` is rejected,
and a wrapper's flat weight_decay (e.g. SAM's) is not handed to an adam base. For weight decay use `adamw`
(decoupled) or `sgd`. (With `optimizer=adamw optimizer.weight_decay=0` the update is the same as this one.)
"""
from dataclasses import dataclass

import torch

from runner.optim import ADAPTIVE, OPTIMIZERS, no_threshold
from runner.optim.params import LR, Betas, Eps


@dataclass
class AdamParams(Eps, Betas, LR):
    """lr, betas, eps; deliberately no weight_decay field: this is Adam without weight decay."""


@OPTIMIZERS.register("adam", AdamParams, "Adam (Kingma & Ba 2015) without weight decay", passes_per_step=1,
                     stability=no_threshold(ADAPTIVE))
def adam(params, lr, betas, eps) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0)
