"""Optimizers by the name in `conf/optimizer/<name>.yaml`, with their capabilities declared.

Every optimizer is a `torch.optim.Optimizer` driven by `step(closure)` (torch's closure protocol), so the one
training loop drives them all. `passes_per_step` is the number of forward+backward passes one step costs.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import List

import torch

from runner.config import Registry, check
from runner.optim.sam import SAM

OPTIMIZERS = Registry("optimizer")


def _check_common(cfg) -> None:
    check(cfg.lr > 0, "lr", cfg.lr, "> 0")
    check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, ">= 0")
    if hasattr(cfg, "momentum"):
        check(0 <= cfg.momentum < 1, "momentum", cfg.momentum, "[0, 1)")
    if hasattr(cfg, "betas"):
        check(len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "betas", list(cfg.betas),
              "two numbers in [0, 1)")


@dataclass
class SGDConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False

    def __post_init__(self):
        _check_common(self)
        check(not self.nesterov or self.momentum > 0, "nesterov", self.nesterov, "false when momentum is 0")


@OPTIMIZERS.register("sgd", SGDConfig, "SGD with momentum; coupled L2 weight decay", passes_per_step=1)
def sgd(params, **cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, **cfg)


@dataclass
class AdamWConfig:
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self):
        _check_common(self)
        check(self.eps > 0, "eps", self.eps, "> 0")


@OPTIMIZERS.register("adamw", AdamWConfig, "AdamW (Loshchilov & Hutter 2019); decoupled weight decay",
                     passes_per_step=1)
def adamw(params, betas, **cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, betas=tuple(betas), **cfg)


@dataclass
class SAMConfig:
    rho: float = 0.05
    adaptive: bool = False
    base: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 5e-4

    def __post_init__(self):
        _check_common(self)
        check(self.rho >= 0, "rho", self.rho, ">= 0")
        check(self.base in ("sgd", "adamw"), "base", self.base, "sgd, adamw")


@OPTIMIZERS.register("sam", SAMConfig, "SAM (Foret et al. 2021) / ASAM, wrapping sgd or adamw", passes_per_step=2)
def sam(params, rho, adaptive, base, lr, momentum, nesterov, betas, weight_decay) -> torch.optim.Optimizer:
    if base == "sgd":
        return SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr, momentum=momentum,
                   nesterov=nesterov, weight_decay=weight_decay)
    return SAM(params, torch.optim.AdamW, rho=rho, adaptive=adaptive, lr=lr, betas=tuple(betas),
               weight_decay=weight_decay)


def build_optimizer(node, params) -> tuple[torch.optim.Optimizer, dict]:
    """The optimizer of `conf/optimizer/<name>.yaml` over `params`, and its declared capabilities."""
    entry, cfg = OPTIMIZERS.validate(node)
    return entry.build(params, **dataclasses.asdict(cfg)), entry.capabilities
