"""Tasks: problem definitions as plugins, one file each, registered by the name of `conf/dataset/<name>.yaml`.

A task builds its data on the training device and declares what the rest of the runner needs to know:
- `input`: what a sample is (images: channels, size, mean/std; plain features; token sequences), so model
  builders size themselves from it without knowing the task;
- `num_classes`: the width of the model's output, also given to the loss;
- `metrics`: what is measured over a split (classification: plain cross-entropy and accuracy);
- `main_metric`: the number `best` tracks (e.g. `test/acc`, higher is better).
The `dataset` config group chooses the task and its data (`dataset=cifar10`); each entry declares the kind of
input it produces (`input="image"`), and each model entry the kinds it accepts, so `validate()` refuses a
mismatch before any work. Adding a task: one file here that registers its datasets in `TASKS`, one YAML per
dataset in `conf/dataset/`, one test (see tasks/image_classification.py and tests/test_datasets.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch

from runner.config import Registry
from runner.data import DeviceBatches
from runner.losses import measured_loss

TASKS = Registry("dataset")


@dataclass(frozen=True)
class ImageInput:
    """Images (C, H, W), normalized per channel by the task; `mean`/`std` in [0, 1] units of x / 255."""
    channels: int
    size: int
    mean: tuple = ()
    std: tuple = ()
    kind = "image"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.size, self.size)


@dataclass(frozen=True)
class FeatureInput:
    """A float feature vector (dim,)."""
    dim: int
    kind = "features"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,)


@dataclass(frozen=True)
class TokenInput:
    """A sequence of `length` integer tokens in [0, vocab) (int64), e.g. the pair (a, b) of modular arithmetic."""
    vocab: int
    length: int
    kind = "tokens"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.length,)


InputSpec = Union[ImageInput, FeatureInput, TokenInput]


class ClassificationMetrics:
    """Per split: mean plain cross-entropy (float32, whatever the training objective) and top-1 accuracy.

    Sums live in device tensors (`zeros`), are updated per batch without a host sync (`update`) and read once
    (`compute`), so an evaluation or an epoch of train metrics costs one sync, not one per batch.
    """

    names = ("loss", "acc")

    def zeros(self, device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)]

    @torch.no_grad()
    def update(self, sums: list[torch.Tensor], logits: torch.Tensor, y: torch.Tensor) -> None:
        sums[0] += measured_loss(logits, y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()

    def compute(self, sums: list[torch.Tensor], n: int) -> dict[str, float]:
        return {"loss": sums[0].item() / n, "acc": sums[1].item() / n}


@dataclass
class Task:
    """What a task builder returns: device-resident batches and the problem's declarations (see module doc)."""
    train: DeviceBatches
    evals: dict  # split name ("val", "test") -> DeviceBatches
    input: InputSpec
    num_classes: int
    metrics: ClassificationMetrics = field(default_factory=ClassificationMetrics)
    main_metric: str = "test/acc"
    higher_is_better: bool = True
    info: dict = field(default_factory=dict)  # extra summary.json entries, e.g. label_noise_fraction


from tasks import image_classification, modular_arithmetic, tabular_classification  # noqa: E402,F401
