"""Training objectives, one file per loss, registered by the name of `conf/loss/<name>.yaml`.

A loss is an `nn.Module` called as `loss(logits, targets)` -> the batch mean; `loss(logits, targets,
reduction="none")` gives the per-sample values (methods that select or reweight samples need them). Its builder
gets what it needs to know about the task: `build(num_classes=..., **params)`.

The objective shapes training only. Reported losses (train/loss, test/loss), landscapes and Hessians use
`measured_loss`, plain mean cross-entropy, so numbers stay comparable across objectives. The loop logs the
objective's own value too (`train/objective`) unless the loss says it is `measured_loss` itself (an attribute
`is_measured_loss = True`: plain cross-entropy without smoothing, at the default precision).
"""
import torch
import torch.nn.functional as F

from runner.config import Registry

LOSSES = Registry("loss")


def reduce(losses, reduction: str):
    """Per-sample losses -> the batch's, as `reduction` asks ("mean", "sum" or "none"); every loss uses it."""
    if reduction == "none":
        return losses
    if reduction in ("mean", "sum"):
        return getattr(losses, reduction)()
    raise ValueError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none'")


def at_least_float32(logits):
    """Logits for a loss: bf16/fp16 up to float32, float64 kept (trainer.dtype=float64 runs)."""
    return logits if logits.dtype == torch.float64 else logits.float()


LOSS_DTYPES = (None, "float16", "float32", "float64")


def in_loss_dtype(logits, dtype: str | None):
    """Logits cast to the precision a loss is computed in: `dtype=None` is `at_least_float32`; "float64" is the
    paper's `--cross_entropy_dtype float64` (Prieto et al. 2025: the model stays float32, only the loss and its
    gradient into the logits are float64, which keeps softmax collapse away), "float16" shows collapse early."""
    return at_least_float32(logits) if dtype is None else logits.to(getattr(torch, dtype))


def measured_loss(logits, targets, reduction: str = "mean"):
    """The loss we report everywhere: plain cross-entropy, in float32 (float64 for float64 runs)."""
    return F.cross_entropy(at_least_float32(logits), targets, reduction=reduction)


from runner.losses import cross_entropy, stablemax  # noqa: E402,F401  (import registers the losses)
from runner.losses import focal, poly1, smooth_cross_entropy, sparsemax, spherical_zloss  # noqa: E402,F401
from runner.losses import ldr  # noqa: E402,F401  (LDR-KL, ALDR-KL)
