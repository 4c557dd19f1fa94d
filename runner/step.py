"""The loop's contract with an optimizer step: `StepClosure`, torch's closure protocol plus what multi-pass
methods need. Any optimizer the loop drives gets one per step as `optimizer.step(closure)`.

    loss = closure()           zero grads, forward, objective, backward at the current weights; returns the
                               batch-mean objective (a tensor). Call it as often as the method needs.
    closure(select=idx)        the same over a subset of the batch (a bool mask or indices into it): the forward
                               and backward run on those samples only (e.g. ESAM's sharpness-sensitive selection).
    closure(extra=f)           adds f(logits, y, indices) to the objective before backward (SAF, MESA).
    closure(create_graph=True) keeps the gradients' graph (exact gradient-norm penalty by double backprop).
    closure.split(m)           sub-closures over consecutive chunks of m samples (m-sharpness): each computes its
                               chunk's own gradient; averaging their gradients gives the batch gradient.
    closure.indices            the batch's sample indices into the training split (when the optimizer declares
                               `sample_indices`, or the loss does), else None. An objective with `needs_indices`
                               (ALDR-KL's per-sample lambda) gets them at each pass: `objective(..., indices=)`.
    closure.per_sample_loss    after a call: the per-sample objective of that pass, detached, shape (n,) (when
                               the optimizer declares `per_sample_loss`), else None.
    closure.logits             after a call: that pass's logits, detached.
    closure.passes             forward+backward passes so far, in batches (a pass over m of B samples is m/B).
    closure.forward(select=, x=)  a forward without backward (BN statistics untouched): the logits, detached;
                               counted apart in `closure.forward_passes` (summary.json: forward_only_passes).

Many devices (runner/cluster.py): `x, y` are this rank's part of the global batch; a pass's gradient is averaged over
the ranks during its backward (DistributedDataParallel), unless the step runs its passes apart:
    closure.apart = True       (set by the perturbation engine for `perturbation_sync=local`) passes keep the rank's
                               own gradient (DDP's `no_sync`, forward and backward inside);
    with closure.together():   a pass inside is averaged over the ranks even so (SAM's descent pass);
    closure.synced             whether the gradients now in p.grad are averaged over the ranks (the engine averages
                               them before its base step when they are not: `closure.mean_grads()`).
A synced pass returns the loss averaged over the ranks (MoMo's step size reads it). With one process all of this is
the identity.

Conventions the loop guarantees:
- BN running statistics are updated by the first pass of a step only; later passes (at w + e(w), or on a
  subset) normalize with their own batch statistics but leave `running_mean/var` alone (davda54/sam);
- train metrics (`train/loss`, `train/acc`, and `train/objective`: the training loss's own value, without any
  `extra` term) come from the first full-batch pass, at the weights w (with m-sharpness: from each chunk's first
  pass, at w): `on_first_pass(logits, y, objective)`;
- gradient clipping (`trainer.grad_clip`) applies to the gradient of every pass, before the optimizer sees it;
- autocast (bf16) covers every pass; the objective is computed in float32.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from runner.cluster import SINGLE, Cluster


class StepClosure:
    def __init__(self, model: torch.nn.Module, objective: Callable, x: torch.Tensor, y: torch.Tensor, *,
                 autocast, frozen_bn, params: list[torch.Tensor], zero_grad: Callable[[], None],
                 grad_clip: Optional[float] = None, on_first_pass: Optional[Callable] = None,
                 indices: Optional[torch.Tensor] = None, per_sample: bool = False, cluster: Cluster = SINGLE,
                 weight: float = 1.0, _parent: "StepClosure" = None):
        self.model, self.objective, self.x, self.y = model, objective, x, y
        self.autocast, self.frozen_bn, self.params, self.zero_grad = autocast, frozen_bn, params, zero_grad
        self.grad_clip, self.on_first_pass, self.indices, self.per_sample = grad_clip, on_first_pass, indices, per_sample
        self._root = _parent._root if _parent is not None else self
        self._batch_size = len(y) if _parent is None else _parent._batch_size
        self.samples = 0  # forward+backward samples of this closure's calls (and its chunks')
        self._calls = 0   # calls of this closure itself (not of its chunks)
        self.forward_samples = 0  # samples of forward-only passes (`forward`), counted at the root
        self.per_sample_loss: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self.cluster, self.weight = cluster, weight  # weight: this rank's share of the global batch (cluster.weight)
        self.apart, self.synced = False, True         # read at the root (see the module docstring)

    def __call__(self, select: Optional[torch.Tensor] = None, extra: Optional[Callable] = None,
                 create_graph: bool = False) -> torch.Tensor:
        """One forward+backward. `extra(logits, y, indices) -> tensor` is added to the objective before backward
        (e.g. SAF's trajectory loss); `create_graph=True` keeps the graph of the gradients (double backprop)."""
        x, y = (self.x, self.y) if select is None else (self.x[select], self.y[select])
        first = self._root.samples == 0
        # train metrics at w: the first full pass of the step, or (m-sharpness) each chunk's first pass
        report = select is None and self.samples == 0 and (first if self._root is self else self._root._calls == 0)
        self.zero_grad()
        indices = self.indices if select is None or self.indices is None else self.indices[select]
        kwargs = {"indices": indices} if getattr(self.objective, "needs_indices", False) else {}
        apart = self._root.apart and self.cluster.distributed
        with self.cluster.no_sync(self.model) if apart else contextlib.nullcontext():
            with torch.enable_grad(), (contextlib.nullcontext() if first else self.frozen_bn), self.autocast:
                logits = self.model(x)
                if self.per_sample:
                    losses = self.objective(logits, y, reduction="none", **kwargs)
                    loss = losses.mean()
                    self.per_sample_loss = losses.detach()
                else:
                    loss = self.objective(logits, y, **kwargs)
                objective = loss.detach()
                if extra is not None:
                    loss = loss + extra(logits, y, indices)
                if self.weight != 1.0:
                    loss = loss * self.weight
            loss.backward(create_graph=create_graph)
        self._root.synced = not apart
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.logits = logits.detach()
        if report and self.on_first_pass is not None:
            self.on_first_pass(self.logits, y, objective)
        self.samples += len(y)
        if self._root is not self:
            self._root.samples += len(y)
        else:
            self._calls += 1
        if self.cluster.distributed and not apart:
            return self.cluster.mean(loss)
        return loss

    @contextlib.contextmanager
    def together(self):
        """Passes inside are averaged over the ranks, even in a step that runs its passes apart."""
        root, before = self._root, self._root.apart
        root.apart = False
        try:
            yield
        finally:
            root.apart = before

    def mean_grads(self) -> None:
        """Average the gradients in p.grad over the ranks, unless the last pass did (a no-op on one process)."""
        if self.cluster.distributed and not self._root.synced:
            self.cluster.mean_grads(self.params)
            self._root.synced = True

    @torch.no_grad()
    def forward(self, select: Optional[torch.Tensor] = None, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A forward pass without backward at the current weights (BN running statistics left alone, autocast as
        the training passes): the logits, detached. Counted apart (`forward_passes`), e.g. ESAM's ranking forward,
        TRAM's reference logits, MESA's teacher. `x` replaces the batch's inputs (e.g. noised ones)."""
        if x is None:
            x = self.x if select is None else self.x[select]
        with self.frozen_bn, self.autocast:
            logits = self.cluster.unwrap(self.model)(x)  # past DDP: no gradient to average
        self._root.forward_samples += len(x)
        return logits

    @property
    def forward_passes(self) -> int | float:
        """Forward-only passes so far, in batches (a forward costs about a third of a forward+backward)."""
        whole, rest = divmod(self.forward_samples, self._batch_size)
        return whole if rest == 0 else self.forward_samples / self._batch_size

    @property
    def passes(self) -> int | float:
        """Forward+backward passes in units of the batch (exact: counted in samples)."""
        whole, rest = divmod(self.samples, self._batch_size)
        return whole if rest == 0 else self.samples / self._batch_size

    def split(self, m: int) -> list["StepClosure"]:
        """Sub-closures over chunks x[i:i+m] (the last may be smaller), sharing this step's pass count."""
        if m <= 0:
            raise ValueError(f"chunk size must be >= 1, got {m}")
        chunks = []
        for start in range(0, len(self.y), m):
            part = slice(start, start + m)
            chunks.append(StepClosure(
                self.model, self.objective, self.x[part], self.y[part], autocast=self.autocast,
                frozen_bn=self.frozen_bn, params=self.params, zero_grad=self.zero_grad, grad_clip=self.grad_clip,
                indices=None if self.indices is None else self.indices[part], per_sample=self.per_sample,
                on_first_pass=self.on_first_pass, cluster=self.cluster, weight=self.weight, _parent=self))
        return chunks
