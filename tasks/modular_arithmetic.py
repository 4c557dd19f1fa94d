"""Modular arithmetic, the grokking task (Power et al. 2022; the setting of Prieto et al. 2025, "Grokking at the
Edge of Numerical Stability"): learn c = a ∘ b mod p from a fraction of all pairs, tested on the rest.

Data: every pair (a, b) with a, b in [0, p) (for division b in [1, p), and a / b = a * b^(p-2) mod p, p prime),
labelled with the result in [0, p). A permutation seeded by the run's seed puts the first `train_fraction` of
the pairs in the training split and the rest in the test split (the papers: p = 113, fraction 0.4). Generated,
no download. A sample is the token pair (a, b): `TokenInput(vocab=p, length=2)`; the MLP sees one-hot(a) ‖
one-hot(b). `batch_size: null` is full batch, as in the papers: one step per epoch, so count training in
`trainer.steps` and record every `trainer.eval_every_steps`.

Each evaluation also logs the paper's diagnostics (runner/analysis/grokking.py): softmax collapse and the
zero-loss fraction of the training split, the weight norm, and the gradient's norm and cosine with the weights.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from runner.analysis.grokking import GrokkingMetrics
from runner.config import check
from runner.data import DeviceBatches
from tasks import TASKS, Task, TokenInput

OPERATIONS = ("add", "sub", "mul", "div")


@dataclass
class ModularParams:
    """Schema of `conf/dataset/modular_arithmetic.yaml`."""
    p: int = 113                     # the modulus, prime (division needs inverses)
    operation: str = "add"           # add | sub | mul | div
    train_fraction: float = 0.4      # of all pairs; the rest is the test split
    batch_size: Optional[int] = None  # null = full batch
    eval_batch_size: int = 16384

    def __post_init__(self):
        check(2 <= self.p <= 2000 and all(self.p % d for d in range(2, int(self.p ** 0.5) + 1)), "p", self.p,
              "a prime in [2, 2000]")
        check(self.operation in OPERATIONS, "operation", self.operation, ", ".join(OPERATIONS))
        check(0.0 < self.train_fraction < 1.0, "train_fraction", self.train_fraction, "(0, 1)")
        check(self.batch_size is None or self.batch_size >= 1, "batch_size", self.batch_size, "null or >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")


@dataclass
class ModularTask(Task):
    """A Task whose evaluations also log the grokking diagnostics: `callbacks` are factories `(cadence) ->
    runner.train.Callback` the loop runs on the evaluation cadence."""
    callbacks: tuple = field(default=(GrokkingMetrics,))


def all_pairs(p: int, operation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair (a, b) as int64 (N, 2) and its label (N,), in row-major order of (a, b)."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(1 if operation == "div" else 0, p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    if operation == "add":
        y = (a + b) % p
    elif operation == "sub":
        y = (a - b) % p
    elif operation == "mul":
        y = (a * b) % p
    else:  # a / b = a * b^(p-2) mod p (Fermat), p prime; exact in int64 for p <= 2000
        inverse = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])
        y = (a * inverse[b]) % p
    return torch.stack([a, b], dim=1), y


def build_modular_task(*, seed: int, device: torch.device, channels_last: bool = False, with_indices: bool = False,
                       cluster=None,
                       p: int, operation: str, train_fraction: float, batch_size: Optional[int],
                       eval_batch_size: int) -> Task:
    x, y = all_pairs(p, operation)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * len(y))
    train, test = order[:n_train], order[n_train:]
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    train_split = DeviceBatches(x[train].to(device), y[train].to(device), batch_size or n_train, shuffle=True,
                                generator=generator, with_indices=with_indices)
    test_split = DeviceBatches(x[test].to(device), y[test].to(device), eval_batch_size, shuffle=False)
    return ModularTask(train=train_split, evals={"test": test_split}, input=TokenInput(vocab=p, length=2),
                       num_classes=p)


TASKS.register("modular_arithmetic", ModularParams, "modular arithmetic (grokking): c = a op b mod p",
               input="tokens")(build_modular_task)
