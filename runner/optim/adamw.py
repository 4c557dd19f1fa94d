"""AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), torch.optim.AdamW:
w <- w - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w); eps outside the square root."""
from dataclasses import dataclass

import torch

from runner.optim import ADAPTIVE, OPTIMIZERS, no_threshold
from runner.optim.params import LR, Betas, Eps, WeightDecay


@dataclass
class AdamWParams(Eps, Betas, WeightDecay, LR):
    weight_decay: float = 0.01


@OPTIMIZERS.register("adamw", AdamWParams, "AdamW (Loshchilov & Hutter 2019); decoupled weight decay",
                     passes_per_step=1, stability=no_threshold(ADAPTIVE))
def adamw(params, lr, weight_decay, betas, eps) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
