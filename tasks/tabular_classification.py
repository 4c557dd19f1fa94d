"""Tabular classification: a task whose samples are plain feature vectors (`FeatureInput`), registered for
scikit-learn's bundled datasets (no download): `wine` (178 samples, 13 features, 3 classes) and
`breast_cancer` (569 samples, 30 features, 2 classes).

Split: stratified 80/20 with `random_state=0` (fixed, like digits, so every seed sees the same test set).
Features are standardized with the TRAIN split's mean and std (population std; a constant feature keeps std 1),
once, on the CPU; batches are then plain slices of device tensors. `batch_size: null` is full batch: one step
per epoch, the setting where the step clock (`trainer.eval_every_steps`) matters. `imbalance_ratio` makes the
training split long-tailed as for the image datasets (Cao et al. 2019's exponential profile over the class
indices, seeded; the test split untouched; `tasks.long_tailed_indices`), after the standardization (whose
statistics stay those of the whole training split).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from runner.config import check
from runner.data import DeviceBatches
from tasks import PER_CLASS_MAX, TASKS, ClassificationMetrics, FeatureInput, Task, long_tailed_indices, stratified_split

LOADERS = {"wine": "load_wine", "breast_cancer": "load_breast_cancer"}


@dataclass
class TabularParams:
    """Schema of `conf/dataset/<name>.yaml` for the tabular datasets."""
    batch_size: Optional[int] = None   # null = the whole training split (full batch)
    eval_batch_size: int = 1024
    imbalance_ratio: Optional[float] = None  # long-tailed train split: n_max / n_min (>= 1); null = as loaded

    def __post_init__(self):
        check(self.batch_size is None or self.batch_size >= 1, "batch_size", self.batch_size, "null or >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")
        check(self.imbalance_ratio is None or (math.isfinite(self.imbalance_ratio) and self.imbalance_ratio >= 1),
              "imbalance_ratio", self.imbalance_ratio, "null or a number >= 1 (n_max / n_min)")


def load_tabular(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), float32 features standardized with the train split's statistics."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, LOADERS[name])()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    train, test = (torch.as_tensor(i) for i in stratified_split(y.numpy(), 0.2, seed=0))
    mean, std = x[train].mean(0), x[train].std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = ((x - mean) / std).float()
    return x[train], y[train], x[test], y[test]


def build_tabular_task(name: str, *, seed: int, device: torch.device, channels_last: bool = False,
                       with_indices: bool = False, cluster=None, batch_size: Optional[int], eval_batch_size: int,
                       imbalance_ratio: Optional[float] = None) -> Task:
    x_train, y_train, x_test, y_test = load_tabular(name)
    num_classes, info = int(y_train.max()) + 1, {}
    if imbalance_ratio is not None:
        keep = long_tailed_indices(y_train, num_classes, imbalance_ratio, seed)
        x_train, y_train = x_train[keep], y_train[keep]
        info["train_class_counts"] = torch.bincount(y_train, minlength=num_classes).tolist()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    train = DeviceBatches(x_train.to(device), y_train.to(device), batch_size or len(y_train), shuffle=True,
                          generator=generator, with_indices=with_indices)
    test = DeviceBatches(x_test.to(device), y_test.to(device), eval_batch_size, shuffle=False)
    return Task(train=train, evals={"test": test}, input=FeatureInput(x_train.shape[1]), num_classes=num_classes,
                info=info, metrics=ClassificationMetrics(num_classes, per_class=imbalance_ratio is not None
                                                         and num_classes <= PER_CLASS_MAX))


for _name in LOADERS:
    TASKS.register(_name, TabularParams, f"tabular classification on scikit-learn's {_name}",
                   input="features")(functools.partial(build_tabular_task, _name))
