"""Schema mixins for the hyperparameters optimizers share: each field's range is checked once, here.

An optimizer's schema is a dataclass made of these (`@dataclass class SGDParams(Nesterov, Momentum, WeightDecay,
LR)`), redeclaring a field to change its default; `Checked` runs every mixin's `check` after validation.
"""
from dataclasses import dataclass, field
from typing import List

from runner.config import Checked, check


@dataclass
class LR(Checked):
    lr: float = 1e-3  # peak learning rate (schedulers scale it per step)

    def check(self):
        check(self.lr > 0, "lr", self.lr, "> 0")


@dataclass
class WeightDecay(Checked):
    weight_decay: float = 0.0

    def check(self):
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")


@dataclass
class Momentum(Checked):
    momentum: float = 0.9

    def check(self):
        check(0 <= self.momentum < 1, "momentum", self.momentum, "[0, 1)")


@dataclass
class Nesterov(Checked):
    nesterov: bool = False

    def check(self):
        check(not self.nesterov or getattr(self, "momentum", 0) > 0, "nesterov", self.nesterov,
              "false when momentum is 0")


@dataclass
class Betas(Checked):
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])

    def check(self):
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", list(self.betas),
              "two numbers in [0, 1)")


@dataclass
class Eps(Checked):
    eps: float = 1e-8

    def check(self):
        check(self.eps > 0, "eps", self.eps, "> 0")
