"""Grokking diagnostics at each evaluation (Prieto, Barsbey, Mediano, Birdal, "Grokking at the Edge of Numerical
Stability", ICLR 2025): what the paper watches while a model memorizes and then does, or does not, generalize.

At the current weights w, over the whole training split (eval mode, no augmentation, the loop's autocast):
- `train/softmax_collapse`: the fraction of training samples whose float32 softmax has collapsed: the sum of
  exp(z_j - max_k z_k) rounds to exactly 1, so all the mass is on one class (the paper's code: `sum_exp == 1`,
  logger.py). Computed in float32 whatever the training dtype or objective: it says where float32 softmax CE
  would stand (a StableMax run's logits grow until it reads 1, while StableMax itself still has a gradient).
- `train/zero_loss`: the fraction whose float32 cross-entropy is exactly 0 (the paper's "zero terms"): those
  samples give no loss and no gradient any more.
- `weights/norm`: ||w||, the global L2 norm of the trainable parameters.
- `grad/norm`, `grad/cos_weights`: ||∇L(w)|| and cos(∇L(w), w), with ∇L the full-batch gradient of the training
  objective (`experiment.objective`, the loss the optimizer sees). Naïve loss minimization (NLM: the loss falls by
  scaling the weights, hence the logits, along their own direction) shows as cos(∇L, w) -> -1, i.e. the descent
  direction -∇L points along w.

Nothing in the training state changes: the gradient comes from `torch.autograd.grad` (p.grad is left as it was),
the forward runs in eval mode (BN running statistics untouched, restored to train mode after), inputs are read by
index (`plain_inputs`), never by iterating the split (which would draw from the data generator). Cost: one
forward+backward over the training split per evaluation (not counted in `passes`), and one host sync for all
five numbers. A task enables it by listing `GrokkingMetrics` in its `callbacks` (tasks/modular_arithmetic.py);
the loop runs it on the evaluation cadence.
"""
from __future__ import annotations

import torch

from runner import paramspace
from runner.losses import measured_loss
from runner.train import Cadence, Callback, Progress


def softmax_collapsed(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) logits -> (N,) bool: the row's float32 softmax has all its mass on one class (Σ exp(z - max) == 1)."""
    z = logits.float()
    return torch.exp(z - z.amax(dim=1, keepdim=True)).sum(dim=1) == 1


class GrokkingMetrics(Callback):
    """Softmax collapse, zero-loss fraction, weight norm, gradient norm and cos(∇L, w); see the module doc."""

    def __init__(self, cadence: Cadence):
        self.cadence = cadence

    def __call__(self, experiment, progress: Progress) -> dict:
        model, split = experiment.model, experiment.task.train
        params = paramspace.trainable(model)
        n = split.num_samples
        chunk = split.batch_size  # a training batch fits in memory for forward+backward
        device = split.device
        collapsed = torch.zeros((), device=device, dtype=torch.long)
        zero_loss = torch.zeros((), device=device, dtype=torch.long)
        grads = [torch.zeros_like(p) for p in params]
        was_training = model.training
        model.eval()
        try:
            for start in range(0, n, chunk):
                index = torch.arange(start, min(start + chunk, n), device=device)
                x, y = split.plain_inputs(index)
                with torch.enable_grad(), experiment.autocast():
                    logits = model(x)
                    total = experiment.objective(logits, y, reduction="none").sum()  # Σ_i loss_i: the mean later
                found = torch.autograd.grad(total, params, allow_unused=True)   # p.grad untouched
                torch._foreach_add_(grads, [g if g is not None else torch.zeros_like(p) for g, p in zip(found, params)])
                with torch.no_grad():
                    logits = logits.detach()
                    collapsed += softmax_collapsed(logits).sum()
                    zero_loss += (measured_loss(logits, y, reduction="none") == 0).sum()
        finally:
            model.train(was_training)
        with torch.no_grad():
            torch._foreach_div_(grads, n)                                        # ∇L(w) of the mean objective
            w_norm, g_norm = paramspace.global_norm(params), paramspace.global_norm(grads)
            dot = sum((p.detach() * g).sum() for p, g in zip(params, grads))     # <∇L, w>
            cos = dot / (w_norm * g_norm).clamp_min(torch.finfo(w_norm.dtype).tiny)
            values = torch.stack([collapsed.double() / n, zero_loss.double() / n, w_norm.double(), g_norm.double(),
                                  cos.double()]).tolist()                       # the one host sync
        return dict(zip(("train/softmax_collapse", "train/zero_loss", "weights/norm", "grad/norm",
                         "grad/cos_weights"), values))
