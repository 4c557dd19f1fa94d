"""SGD with (heavy-ball or Nesterov) momentum, torch.optim.SGD: coupled L2 weight decay (added to the gradient)."""
from dataclasses import dataclass

import torch

from runner.optim import OPTIMIZERS, gradient_descent
from runner.optim.params import LR, Momentum, Nesterov, WeightDecay


@dataclass
class SGDParams(Nesterov, Momentum, WeightDecay, LR):
    lr: float = 0.05
    weight_decay: float = 5e-4


@OPTIMIZERS.register("sgd", SGDParams, "SGD with momentum; coupled L2 weight decay", passes_per_step=1,
                     stability=lambda p: gradient_descent(p.momentum, p.nesterov))
def sgd(params, lr, momentum, weight_decay, nesterov) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
