"""Tasks: problem definitions as plugins, one file each, registered by the name of `conf/dataset/<name>.yaml`.

A task builds its data on the training device and declares what the rest of the runner needs to know:
- `input`: what a sample is (images: channels, size, mean/std; plain features; token sequences), so model
  builders size themselves from it without knowing the task;
- `num_classes`: the width of the model's output, also given to the loss;
- `metrics`: what is measured over a split (classification: plain cross-entropy, accuracy, balanced accuracy,
  per-class accuracies for long-tailed data: `ClassificationMetrics(num_classes, per_class)`; the image and
  tabular tasks give it their number of classes, so `balanced_acc` is in every evaluation of theirs);
- `main_metric`: the number `best` tracks (e.g. `test/acc`, higher is better).
The `dataset` config group chooses the task and its data (`dataset=cifar10`); each entry declares the kind of
input it produces (`input="image"`), and each model entry the kinds it accepts, so `validate()` refuses a
mismatch before any work. Adding a task: one file here that registers its datasets in `TASKS`, one YAML per
dataset in `conf/dataset/`, one test (see tasks/image_classification.py and tests/test_datasets.py).
Long-tailed training data (`dataset.imbalance_ratio`, Cao et al. 2019's exponential profile) comes from
`long_tailed_indices`, shared by the classification tasks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from runner.config import ConfigError, Registry
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


PER_CLASS_MAX = 20  # per-class accuracies are logged for at most this many classes (metrics.jsonl stays small)


class ClassificationMetrics:
    """Per split: mean plain cross-entropy (float32, whatever the training objective) and top-1 accuracy; with
    `num_classes`, also the balanced accuracy, and with `per_class`, each class's accuracy.

    - `balanced_acc`: the mean over the classes present in the samples measured of each class's accuracy (its
      recall), as sklearn's `balanced_accuracy_score`; a class absent from them does not count.
    - `acc_class_<c>` (only with `per_class`, allowed for K <= PER_CLASS_MAX = 20): class c's accuracy, for each
      class present. The image and tabular tasks turn it on for long-tailed training data
      (`dataset.imbalance_ratio`), where the tail classes are the point; CIFAR-100 (K = 100) logs only
      `balanced_acc`, so a record stays a few keys per split.
    Without `num_classes` (the default, for a task that does not give it): loss and acc only.
    Sums live in device tensors (`zeros`), are updated per batch without a host sync (`update`: the per-class
    counts by `index_add_`, no bincount, no boolean indexing) and read once (`compute`), so an evaluation or the
    train metrics between two records cost one sync, not one per batch.
    """

    def __init__(self, num_classes: Optional[int] = None, per_class: bool = False):
        if per_class and (num_classes is None or num_classes > PER_CLASS_MAX):
            raise ValueError(f"per-class accuracies need num_classes <= {PER_CLASS_MAX}, got {num_classes}")
        self.num_classes, self.per_class = num_classes, per_class

    @property
    def names(self) -> tuple[str, ...]:
        per_class = tuple(f"acc_class_{c}" for c in range(self.num_classes)) if self.per_class else ()
        return ("loss", "acc") + (("balanced_acc",) + per_class if self.num_classes is not None else ())

    def zeros(self, device: torch.device) -> list[torch.Tensor]:
        sums = [torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)]
        if self.num_classes is not None:  # (2, K): correct and seen, per class
            sums.append(torch.zeros((2, self.num_classes), device=device, dtype=torch.long))
        return sums

    @torch.no_grad()
    def update(self, sums: list[torch.Tensor], logits: torch.Tensor, y: torch.Tensor) -> None:
        hit = logits.argmax(1) == y
        sums[0] += measured_loss(logits, y, reduction="sum")
        sums[1] += hit.sum()
        if len(sums) > 2:
            sums[2].index_add_(1, y, torch.stack((hit.long(), torch.ones_like(y))))

    def compute(self, sums: list[torch.Tensor], n: int) -> dict[str, float]:
        out = {"loss": sums[0].item() / n, "acc": sums[1].item() / n}
        if len(sums) > 2:
            correct, seen = sums[2].tolist()
            recall = {c: correct[c] / seen[c] for c in range(len(seen)) if seen[c]}
            if recall:
                out["balanced_acc"] = sum(recall.values()) / len(recall)
            if self.per_class:
                out.update((f"acc_class_{c}", value) for c, value in recall.items())
        return out


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
    callbacks: tuple = ()  # the task's own diagnostics: factories (cadence) -> runner.train.Callback, run with
                           # every evaluation (e.g. the grokking metrics of tasks/modular_arithmetic.py)


# ------------------------------------------------------------------------------------------ long-tailed data

def long_tailed_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """The exponential long-tailed profile of Cao et al. 2019 ("Learning Imbalanced Datasets with Label-Distribution-
    Aware Margin Loss", NeurIPS; their CIFAR-10/100-LT): class c keeps floor(n_max * (1/ratio)^(c / (K - 1)))
    samples, so class 0 keeps n_max and class K-1 n_max / ratio (ratio = n_max / n_min, the imbalance ratio).
    CIFAR-10, n_max 5000, ratio 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 (12406 in all)."""
    if num_classes == 1:
        return [n_max]
    return [int(n_max * (1 / ratio) ** (c / (num_classes - 1))) for c in range(num_classes)]


def long_tailed_indices(y: torch.Tensor, num_classes: int, ratio: float, seed: int,
                        key: str = "dataset.imbalance_ratio") -> torch.Tensor:
    """Indices (sorted) of the samples a long-tailed copy of a split keeps: `long_tailed_counts(n_max, K, ratio)`
    per class, n_max the smallest class count of the split (CIFAR: 5000 = N / K, as Cao et al.), each class's
    samples chosen by one permutation seeded by `seed` (the first n_c of class c in its order). Class 0 is the
    head, class K-1 the tail. ratio = 1 cuts every class to the smallest one's count (exactly balanced)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ConfigError(key, ratio, "null or a number >= 1 (n_max / n_min)")
    y = torch.as_tensor(y, dtype=torch.int64).cpu()
    available = torch.bincount(y, minlength=num_classes)
    n_max = int(available.min())
    quotas = long_tailed_counts(n_max, num_classes, ratio)
    if quotas[-1] < 1:
        raise ConfigError(key, ratio, f"at most {n_max}: the smallest class of the split has {n_max} samples and "
                                      "the tail class must keep one")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    ordered = y[order]
    kept = [order[ordered == c][:quotas[c]] for c in range(num_classes)]
    return torch.cat(kept).sort().values



def stratified_split(labels, test_fraction: float, seed: int):
    """(train, test) index arrays of a stratified split: the same indices as scikit-learn's
    `train_test_split(range(n), test_size=test_fraction, random_state=seed, stratify=labels)` (tests compare
    them), so the split the runner has always used stays the same without importing scikit-learn, which costs
    about a second on every run of the default (digits) experiment.

    The test split has ceil(test_fraction * n) samples. Each class gets a share of the training split, then of
    the test split, in proportion to its count: floors first, then one more to the largest remainders (ties in
    random order). Each class's samples are taken in a random order, and both lists come shuffled; one
    `numpy.random.RandomState(seed)` draws everything, in that order.
    """
    import numpy as np

    rng = np.random.RandomState(seed)
    n_test = math.ceil(test_fraction * len(labels))
    _, class_of, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    members = np.split(np.argsort(class_of, kind="stable"), np.cumsum(counts)[:-1])
    train_shares = _proportional_shares(counts, len(labels) - n_test, rng)
    test_shares = _proportional_shares(counts - train_shares, n_test, rng)
    train, test = [], []
    for indices, n_train_c, n_test_c in zip(members, train_shares, test_shares):
        shuffled = indices[rng.permutation(len(indices))]
        train.extend(shuffled[:n_train_c])
        test.extend(shuffled[n_train_c:n_train_c + n_test_c])
    return rng.permutation(train), rng.permutation(test)


def _proportional_shares(counts, total: int, rng):
    """`total` split over classes in proportion to `counts`: floors, then +1 by largest remainder, ties random."""
    import numpy as np

    exact = counts / counts.sum() * total
    shares = np.floor(exact)
    missing = int(total - shares.sum())
    remainders = exact - shares
    for value in np.unique(remainders)[::-1]:
        if missing == 0:
            break
        (tied,) = np.where(remainders == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        shares[chosen] += 1
        missing -= len(chosen)
    return shares.astype(int)


from tasks import image_classification, image_folder, modular_arithmetic, tabular_classification  # noqa: E402,F401
