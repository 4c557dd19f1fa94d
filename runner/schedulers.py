"""Learning-rate schedules, updated every step: a factor of the peak lr as a function of the step.

All share an optional linear warmup from 0 over `warmup_epochs` (fractional epochs allowed).
"""
import math
from dataclasses import dataclass, field
from typing import Callable, List

import torch

from runner.config import Registry, check
from runner.train import MAX_EPOCHS

SCHEDULERS = Registry("scheduler")


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


@dataclass
class ConstantConfig:
    warmup_epochs: float = 0.0

    def __post_init__(self):
        check(0 <= self.warmup_epochs < MAX_EPOCHS, "warmup_epochs", self.warmup_epochs, f"a number in [0, {MAX_EPOCHS})")


@SCHEDULERS.register("constant", ConstantConfig, "constant lr after warmup")
def constant(total_steps: int, steps_per_epoch: int, warmup_epochs: float) -> Callable[[int], float]:
    warm = round(warmup_epochs * steps_per_epoch)
    return lambda step: _warmup(step, warm)


@dataclass
class CosineConfig:
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        check(0 <= self.warmup_epochs < MAX_EPOCHS, "warmup_epochs", self.warmup_epochs, f"a number in [0, {MAX_EPOCHS})")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "[0, 1]")


@SCHEDULERS.register("cosine", CosineConfig, "linear warmup, then cosine decay (Loshchilov & Hutter 2017)")
def cosine(total_steps: int, steps_per_epoch: int, warmup_epochs: float, min_lr_ratio: float):
    warm = round(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return _warmup(step, warm)
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class MultiStepConfig:
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_epochs: float = 0.0

    def __post_init__(self):
        check(all(0 < m < MAX_EPOCHS for m in self.milestones), "milestones", list(self.milestones),
              f"numbers in (0, {MAX_EPOCHS}): fractions of the run (<= 1) or epochs")
        check(0 < self.gamma <= 1, "gamma", self.gamma, "(0, 1]")
        check(0 <= self.warmup_epochs < MAX_EPOCHS, "warmup_epochs", self.warmup_epochs, f"a number in [0, {MAX_EPOCHS})")


@SCHEDULERS.register("multistep", MultiStepConfig, "lr times gamma at each milestone")
def multistep(total_steps: int, steps_per_epoch: int, milestones, gamma: float, warmup_epochs: float):
    epochs = total_steps / steps_per_epoch
    # milestones <= 1 are fractions of the run, larger ones are epochs
    at = sorted(round((m * epochs if m <= 1 else m) * steps_per_epoch) for m in milestones)
    warm = round(warmup_epochs * steps_per_epoch)
    return lambda step: _warmup(step, warm) * gamma ** sum(step >= s for s in at)


def build_scheduler(choice, optimizer, total_steps: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The validated `scheduler` choice as a per-step LambdaLR over `total_steps`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, choice.build(total_steps, steps_per_epoch))
