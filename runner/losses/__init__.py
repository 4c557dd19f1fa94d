"""Training objectives, one file per loss, registered by the name of `conf/loss/<name>.yaml`.

A loss is an `nn.Module` called as `loss(logits, targets)` -> the batch mean; `loss(logits, targets,
reduction="none")` gives the per-sample values (methods that select or reweight samples need them). Its builder
gets what it needs to know about the task: `build(num_classes=..., **params)`.

The objective shapes training only. Reported losses (train/loss, test/loss), landscapes and Hessians use
`measured_loss`, plain mean cross-entropy, so numbers stay comparable across objectives.
"""
import torch.nn.functional as F

from runner.config import Registry

LOSSES = Registry("loss")


def measured_loss(logits, targets, reduction: str = "mean"):
    """The loss we report everywhere: plain cross-entropy, computed in float32."""
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


from runner.losses import cross_entropy, stablemax  # noqa: E402,F401  (import registers the losses)
