"""Evaluate a model at any point of its parameter space without touching it.

Every analysis (landscapes, Hessians, sharpness) asks "what are the loss and accuracy at w + d?". `Probe`
answers with `torch.func.functional_call`: the parameters are passed explicitly and the buffers are copies, so
the live model's parameters, buffers and the training data order stay bitwise as they were (tests check it).

- The model is evaluated in eval mode (BN uses its running statistics, dropout is off), unless the BN mode
  `recalibrate` is asked for: then the BN statistics are first re-estimated at the point on the training
  evaluation set (a cumulative average over its batches, as `torch.optim.swa_utils.update_bn` does), into copied
  buffers.
- `EvalSet`s are fixed, seeded subsets of each split, resident on the device, transformed without augmentation.
- Losses are summed in float32 on the device and read by the caller once per analysis, not once per point.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.func import functional_call

from runner import paramspace
from runner.losses import at_least_float32, measured_loss

BN_MODES = ("eval", "recalibrate")


@dataclass
class EvalSet:
    """A fixed set of model inputs and targets on the device, evaluated in batches of `batch_size`."""
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int

    def __len__(self) -> int:
        return len(self.y)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.y), self.batch_size):
            yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]


def evaluation_sets(task, samples: int | None, seed: int, batch_size: int,
                    splits: tuple[str, ...] | None = None) -> dict[str, EvalSet]:
    """`train` plus the task's evaluation splits, each a seeded subset of at most `samples` samples (all when None),
    in a fixed order, without augmentation. The subset is drawn from a CPU generator seeded with `seed`, so it is
    the same on every device and never draws from the training data generator."""
    sources = {"train": task.train, **task.evals}
    out = {}
    for split, batches in sources.items():
        if splits is not None and split not in splits:
            continue
        n = batches.num_samples
        if samples is not None and samples < n:
            generator = torch.Generator().manual_seed(seed)
            index = torch.randperm(n, generator=generator)[:samples].sort().values
        else:
            index = torch.arange(n)
        x, y = batches.plain_inputs(index.to(batches.device))
        out[split] = EvalSet(x, y, batch_size)
    return out


@contextlib.contextmanager
def modes(model: torch.nn.Module, training: bool):
    """Every submodule in train or eval mode for the duration; each module's own flag restored afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class Probe:
    """The model as a function of its trainable parameters (a list of tensors in `paramspace.named_trainable`
    order). `params` is the model's own point (detached, never written); `buffers` are copies of its buffers."""

    def __init__(self, model: torch.nn.Module, autocast=None):
        self.model = model
        self.names, live = paramspace.named_trainable(model)
        self.params = [p.detach() for p in live]
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.has_batch_norm = bool(_batch_norms(model))

    def logits(self, params: list[torch.Tensor], x: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
        """The model's output at `params` (eval mode), differentiable in `params`."""
        with modes(self.model, training=False):
            return self._call(params, x, buffers)

    def _call(self, params: list[torch.Tensor], x: torch.Tensor, buffers: dict | None) -> torch.Tensor:
        return functional_call(self.model, ({**dict(zip(self.names, params)), **(buffers or self.buffers)}), (x,),
                               strict=False)

    def loss(self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, objective=None,
             buffers: dict | None = None) -> torch.Tensor:
        """Mean loss at `params` in float32 (`objective`, else plain cross-entropy), differentiable."""
        logits = at_least_float32(self.logits(params, x, buffers))
        if objective is None:
            return measured_loss(logits, y)
        return objective(logits, y)

    @torch.no_grad()
    def sums(self, params: list[torch.Tensor], data: EvalSet, buffers: dict | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed plain cross-entropy, number correct) over `data` at `params`: device tensors, no host sync."""
        loss = torch.zeros((), device=data.y.device)
        correct = torch.zeros((), device=data.y.device, dtype=torch.long)
        with modes(self.model, training=False):  # once per pass, not per batch (a walk over every module)
            for x, y in data.batches():
                with self.autocast:
                    logits = self._call(params, x, buffers)
                loss += measured_loss(logits, y, reduction="sum")
                correct += (logits.argmax(1) == y).sum()
        return loss, correct

    def evaluate(self, params: list[torch.Tensor], data: EvalSet, buffers: dict | None = None) -> dict[str, float]:
        """{"loss", "acc"} over `data` at `params` (one host sync)."""
        loss, correct = self.sums(params, data, buffers)
        return {"loss": loss.item() / len(data), "acc": correct.item() / len(data)}

    @torch.no_grad()
    def recalibrated_buffers(self, params: list[torch.Tensor], train: EvalSet,
                             buffers: dict | None = None) -> dict:
        """Copies of the buffers with every BatchNorm's running statistics re-estimated at `params` over `train`
        (reset, then a cumulative average over its batches in train mode). Without BatchNorm: the buffers."""
        base = buffers or self.buffers
        if not self.has_batch_norm:
            return base
        fresh = {n: b.clone() for n, b in base.items()}
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                fresh[f"{name}.running_mean" if name else "running_mean"].zero_()
                fresh[f"{name}.running_var" if name else "running_var"].fill_(1)
                fresh[f"{name}.num_batches_tracked" if name else "num_batches_tracked"].zero_()
        norms = _batch_norms(self.model)
        momenta = [m.momentum for m in norms]
        try:
            for m in norms:
                m.momentum = None  # cumulative moving average: every batch weighs the same
            with modes(self.model, training=True):
                for x, _ in train.batches():
                    with self.autocast:
                        functional_call(self.model, ({**dict(zip(self.names, params)), **fresh}), (x,), strict=False)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
        return fresh

    def buffers_at(self, params: list[torch.Tensor], bn: str, train: EvalSet | None,
                   buffers: dict | None = None) -> dict:
        """The buffers to evaluate `params` with in BN mode `bn` ("eval": as saved; "recalibrate": re-estimated)."""
        if bn not in BN_MODES:
            raise ValueError(f"unknown BN mode {bn!r}; one of {', '.join(BN_MODES)}")
        if bn == "eval" or train is None:
            return buffers or self.buffers
        return self.recalibrated_buffers(params, train, buffers)
