"""Image classification: the first task plugin. Datasets digits (bundled), CIFAR-10/100, MNIST, Fashion-MNIST and
synthetic, each registered in `TASKS` under the name of its `conf/dataset/<name>.yaml`.

The raw data is loaded as uint8 tensors on the CPU, a long-tailed copy of the training split / subset /
validation split / label noise are taken, in this order (all seeded), then every split moves to the training
device, where batches are augmented (`dataset.augment`: true for random crop + flip, or a list of crop_flip,
autoaugment, randaugment, cutout: tasks/augment.py) and normalized per batch (`ImageTransform`). Normalization
comes after augmentation (but before cutout), so crop padding is black (0) as in torchvision's
`RandomCrop(32, padding=4)` followed by `Normalize`.

Conventions:
- Every dataset is stored the same way: `x` is uint8 (N, C, H, W) with values 0..255, `y` is int64 (N,).
  Normalization and augmentation happen later (on the device); `ImageData.mean/std` are per-channel, in [0, 1]
  units (i.e. of `x / 255`), and `ImageData.augment` says whether random crop + flip is customary.
- The files come from the real torchvision dataset classes (the on-disk formats torchvision downloads);
  missing files are a one-line `ConfigError` naming the folder that was expected.
- All randomness goes through a `torch.Generator` seeded by the caller, so results are reproducible.
- Long-tailed data (`imbalance_ratio` rho = n_max / n_min): the training split keeps floor(n_max rho^(-c/(K-1)))
  samples of class c (Cao et al. 2019's CIFAR-10/100-LT; n_max = its smallest class count, 5000 for CIFAR),
  chosen by a permutation seeded by the run's seed (`tasks.long_tailed_indices`). It comes first, so a `subset`
  is drawn from the long-tailed split, the validation split (held out of it) is long-tailed too, and label noise
  falls on it; the test split stays as loaded (balanced for CIFAR, MNIST, Fashion-MNIST). The training split's
  class counts go to summary.json (`train_class_counts`), and every evaluation logs each class's accuracy
  (`test/acc_class_<c>`, K <= 20) besides `balanced_acc` (tasks/__init__.py, `ClassificationMetrics`).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Optional
from urllib.error import URLError

import torch

from runner.config import ConfigError, check
from runner.data import DeviceBatches
from tasks.augment import Augment, check_augment, resolve
from tasks import PER_CLASS_MAX, TASKS, ClassificationMetrics, ImageInput, Task, long_tailed_indices, stratified_split

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "synthetic")


@dataclass
class ImageDatasetParams:
    """Schema of `conf/dataset/<name>.yaml` for the image datasets."""
    root: str = "data"
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 1024
    val_size: float = 0.0             # 0 = none; in (0, 1) a fraction of train; >= 1 a count
    subset: Optional[int] = None
    label_noise: float = 0.0
    augment: Any = False              # true (crop + flip), false, or a list (tasks/augment.py)
    imbalance_ratio: Optional[float] = None  # long-tailed train split: n_max / n_min (>= 1); null = as loaded
    cutout_size: Optional[int] = None  # side of cutout's square; null = half the image side

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")
        check(math.isfinite(self.val_size) and self.val_size >= 0
              and (self.val_size < 1 or self.val_size == int(self.val_size)), "val_size",
              self.val_size, "0, a fraction in (0, 1) or a whole count")
        check(self.subset is None or self.subset >= 1, "subset", self.subset, "null or >= 1")
        check(0.0 <= self.label_noise <= 1.0, "label_noise", self.label_noise, "[0, 1]")
        check_augment(self.augment, self.cutout_size)
        check(self.imbalance_ratio is None or (math.isfinite(self.imbalance_ratio) and self.imbalance_ratio >= 1),
              "imbalance_ratio", self.imbalance_ratio, "null or a number >= 1 (n_max / n_min)")


@dataclass
class SyntheticParams(ImageDatasetParams):
    synthetic_size: int = 50000

    def __post_init__(self):
        super().__post_init__()
        check(5 <= self.synthetic_size <= 10_000_000, "synthetic_size", self.synthetic_size, "5..10000000")


@dataclass
class Split:
    """One split as CPU tensors: `x` uint8 (N, C, H, W) with values 0..255, `y` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class ImageData:
    """Train and test splits plus what a model and the input pipeline need to know about them."""

    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, of x / 255
    std: tuple[float, ...]
    augment: bool  # random crop (padding 4 for 32x32) + horizontal flip is customary


# name -> (torchvision class name, folder under root that holds the files, where to get them, classes, mean, std,
# augment)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar.html", 10,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ("CIFAR100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar.html", 100,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "mnist": ("MNIST", os.path.join("MNIST", "raw"), "https://ossci-datasets.s3.amazonaws.com/mnist/", 10,
              (0.1307,), (0.3081,), False),
    "fashion_mnist": ("FashionMNIST", os.path.join("FashionMNIST", "raw"),
                      "https://github.com/zalandoresearch/fashion-mnist", 10, (0.2860,), (0.3530,), False),
}


def load_image_data(name: str, root: str, download: bool, synthetic_size: int = 50000, seed: int = 0) -> ImageData:
    """Load dataset `name` (one of DATASETS) from `root`, downloading it first when `download` is true.

    `digits` (scikit-learn's bundled copy) and `synthetic` (random, for benchmarks; `synthetic_size` training
    images, seeded by `seed`) need no files. The others are read by torchvision from `root`.
    """
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic(synthetic_size, seed)
    if name in _TORCHVISION:
        return _torchvision(name, root, download)
    raise ConfigError("dataset.name", name, ", ".join(DATASETS))


def _torchvision(name: str, root: str, download: bool) -> ImageData:
    import torchvision.datasets

    cls_name, folder, source, num_classes, mean, std, augment = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    root = os.path.abspath(os.path.expanduser(root))
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except (RuntimeError, URLError, OSError, AssertionError, ValueError, IndexError) as e:
        # "Dataset not found or corrupted", no network, or files that exist but are not what torchvision reads
        # (torchvision asserts on the header of an idx file, numpy raises on a truncated one)
        failed = f" and the download failed ({type(e).__name__})" if download else ""
        raise _not_found(name, root, failed) from None
    splits = []
    for ds in (train, test):
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # MNIST (N,H,W); CIFAR (N,H,W,C)
        splits.append(Split(x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)))
    return ImageData(splits[0], splits[1], num_classes, splits[0].x.shape[1], splits[0].x.shape[-1],
                     mean, std, augment)


def _not_found(name: str, root: str, failed: str = "") -> ConfigError:
    _, folder, source, *_ = _TORCHVISION[name]
    return ConfigError("dataset.root", message=(
        f"dataset '{name}' not found or corrupted under {root}{failed} (expected {os.path.join(root, folder)}); "
        f"set dataset.download=true on a machine with internet, or put the files there ({source})"))


def check_available(name: str, *, root: str = "data", download: bool = False, **_) -> None:
    """Up front, before any job of a sweep runs: the folder torchvision reads is there and not empty (reading
    and checking the files themselves happens when the job loads them)."""
    if name not in _TORCHVISION or download:
        return
    root = os.path.abspath(os.path.expanduser(root))
    expected = os.path.join(root, _TORCHVISION[name][1])
    if not os.path.isdir(expected) or not os.listdir(expected):
        raise _not_found(name, root)


def _digits() -> ImageData:
    """scikit-learn's 1797 8x8 digits (levels 0..16 scaled to 0..255); stratified 80/20 split, random_state=0.

    Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`, what `load_digits` reads:
    64 pixel columns and the label), found without importing scikit-learn (a second per run)."""
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("dataset", "digits", "scikit-learn installed (its digits file is the dataset)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    x = torch.as_tensor(table[:, :-1].reshape(-1, 1, 8, 8) * 255.0 / 16.0).round().to(torch.uint8)  # (N, 1, 8, 8)
    y = torch.as_tensor(table[:, -1].astype(np.int64))
    idx_train, idx_test = (torch.as_tensor(i) for i in stratified_split(y.numpy(), 0.2, seed=0))
    train = Split(x[idx_train], y[idx_train])
    test = Split(x[idx_test], y[idx_test])
    pixels = train.x.double() / 255.0
    return ImageData(train, test, 10, 1, 8, (pixels.mean().item(),), (pixels.std(unbiased=False).item(),), False)


def _synthetic(size: int, seed: int) -> ImageData:
    """Uniformly random CIFAR-shaped images with random labels 0..9; the test split has min(10000, size // 5)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 5:
        raise ConfigError("dataset.synthetic_size", size, "an integer >= 5")
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        return Split(x, torch.randint(0, 10, (n,), generator=gen))

    train, test = split(size), split(min(10000, size // 5))
    std = math.sqrt((256**2 - 1) / 12) / 255  # of a uniform integer on 0..255, in [0, 1] units
    return ImageData(train, test, 10, 3, 32, (0.5,) * 3, (std,) * 3, True)


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split_train_val(split: Split, val_size: int | float, seed: int,
                    key: str = "dataset.val_size") -> tuple[Split, Split]:
    """Hold out a validation set: a float in (0, 1) is a fraction (rounded), an int a count; returns (train, val).

    The validation examples are the first ones of a permutation seeded by `seed` (not stratified).
    """
    n = len(split)
    if isinstance(val_size, float) and 0.0 < val_size < 1.0:
        n_val = round(val_size * n)
    elif isinstance(val_size, int) and not isinstance(val_size, bool):
        n_val = val_size
    else:
        raise ConfigError(key, val_size, "a fraction in (0, 1) or a count of examples")
    if not 0 < n_val < n:
        raise ConfigError(key, val_size, f"between 1 and {n - 1} examples (the split has {n})")
    perm = _permutation(n, seed)
    val, train = perm[:n_val], perm[n_val:]
    return Split(split.x[train], split.y[train]), Split(split.x[val], split.y[val])


def take_subset(split: Split, n: int, seed: int, key: str = "dataset.subset") -> Split:
    """The first `n` examples of a permutation seeded by `seed` (their order is that permutation's)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= len(split):
        raise ConfigError(key, n, f"an integer between 1 and {len(split)} (the size of the split)")
    idx = _permutation(len(split), seed)[:n]
    return Split(split.x[idx], split.y[idx])


def symmetric_label_noise(y: torch.Tensor, rate: float, num_classes: int, seed: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric label noise: returns (noisy labels, bool mask of the labels that were changed).

    Convention: each label is, independently with probability `rate`, replaced by a label drawn uniformly from
    the OTHER `num_classes - 1` classes, so `rate` is exactly the expected fraction of wrong labels. Some papers
    (e.g. Zhang et al. 2017, "Understanding deep learning requires rethinking generalization") draw the new label
    from all classes including the true one, which corrupts only `rate * (C - 1) / C` of the labels; to reproduce
    such a setting, pass `rate * C / (C - 1)` here. The input is not modified.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ConfigError("dataset.label_noise", rate, "a probability in [0, 1]")
    if rate > 0 and num_classes < 2:
        raise ConfigError("dataset.label_noise", rate, "0 when there is a single class")
    gen = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(y, dtype=torch.int64)
    flipped = torch.rand(y.shape, generator=gen) < rate
    shift = torch.randint(1, max(num_classes, 2), y.shape, generator=gen)  # 1..C-1: never the true class
    noisy = torch.where(flipped, (y + shift) % num_classes, y)
    return noisy, flipped


class ImageTransform:
    """uint8 (B, C, H, W) -> float: the augmentations (tasks/augment.py) on uint8, normalization per channel, then
    the ones on the normalized image (cutout)."""

    def __init__(self, mean, std, device: torch.device, *, augment: Augment, channels_last: bool):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.augment = augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.augment:
            x = self.augment.before_normalize(x, generator)
        x = (x.float() - self.mean) / self.std
        if self.augment:
            x = self.augment.after_normalize(x, generator)
        return x.contiguous(memory_format=self.memory_format)


def training_splits(train: Split, test: Split, num_classes: int, seed: int, *, imbalance_ratio: Optional[float],
                    subset: Optional[int], val_size: float, label_noise: float) -> tuple[Split, dict, dict]:
    """A long-tailed copy / subset / validation split / label noise of the training split, in this order (all
    seeded); returns (train, evaluation splits by name, summary entries). A streamed task passes splits whose `x`
    are sample ids (tasks/image_folder.py): every step picks samples and labels only."""
    evals, info = {}, {"label_noise_fraction": 0.0}
    if imbalance_ratio is not None:
        keep = long_tailed_indices(train.y, num_classes, imbalance_ratio, seed)
        train = Split(train.x[keep], train.y[keep])
    if subset is not None:
        train = take_subset(train, subset, seed)
    if val_size > 0:
        train, evals["val"] = split_train_val(train, val_size if val_size < 1 else int(val_size), seed)
    if imbalance_ratio is not None:
        info["train_class_counts"] = torch.bincount(train.y, minlength=num_classes).tolist()
    if label_noise > 0:
        noisy, flipped = symmetric_label_noise(train.y, label_noise, num_classes, seed)
        train, info["label_noise_fraction"] = Split(train.x, noisy), flipped.float().mean().item()
    evals["test"] = test
    return train, evals, info


def build_image_task(name: str, *, seed: int, device: torch.device, channels_last: bool = False,
                     with_indices: bool = False, cluster=None, root: str, download: bool, batch_size: int,
                     eval_batch_size: int,
                     val_size: float, subset: Optional[int], label_noise: float, augment: Any,
                     synthetic_size: int = 50000, imbalance_ratio: Optional[float] = None,
                     cutout_size: Optional[int] = None) -> Task:
    """Load dataset `name`, take a long-tailed copy / subset / validation split / label noise of the training
    split (all seeded), move it to `device`."""
    raw = load_image_data(name, root, download, synthetic_size=synthetic_size, seed=seed)
    train, evals, info = training_splits(raw.train, raw.test, raw.num_classes, seed, imbalance_ratio=imbalance_ratio,
                                         subset=subset, val_size=val_size, label_noise=label_noise)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    augmentations = Augment(resolve(augment), cutout_size)

    def batches(split: Split, size: int, *, train_split: bool) -> DeviceBatches:
        transform = ImageTransform(raw.mean, raw.std, device, augment=augmentations if train_split else Augment(()),
                                   channels_last=channels_last)
        plain = ImageTransform(raw.mean, raw.std, device, augment=Augment(()), channels_last=channels_last)
        return DeviceBatches(split.x.to(device), split.y.to(device), size, shuffle=train_split,
                             generator=generator if train_split else None, transform=transform,
                             with_indices=with_indices and train_split, plain_transform=plain)

    return Task(train=batches(train, batch_size, train_split=True),
                evals={split_name: batches(split, eval_batch_size, train_split=False)
                       for split_name, split in evals.items()},
                input=ImageInput(raw.in_channels, raw.image_size, tuple(raw.mean), tuple(raw.std)),
                num_classes=raw.num_classes, info=info,
                metrics=ClassificationMetrics(raw.num_classes, per_class=imbalance_ratio is not None
                                              and raw.num_classes <= PER_CLASS_MAX))


for _name in DATASETS:
    TASKS.register(_name, SyntheticParams if _name == "synthetic" else ImageDatasetParams,
                   f"image classification on {_name}", input="image",
                   check=functools.partial(check_available, _name))(functools.partial(build_image_task, _name))
