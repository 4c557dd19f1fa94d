"""Device-resident datasets and batching.

A whole split lives on the training device as uint8 (CIFAR-10: 150 MB). Each epoch draws one seeded
permutation there; a batch is an index into it, and random crop + flip are a few batched tensor ops on the
batch (airbench style). No DataLoader, no workers, no host->device copy per step.
Normalization happens per batch after augmentation, so crop padding is black (0) as in torchvision's
`RandomCrop(32, padding=4)` followed by `Normalize`.
"""
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from runner.config import check
from tasks.image_classification import (DATASETS, ImageData, Split, load_image_data, split_train_val,
                                        subset as take_subset, symmetric_label_noise)


@dataclass
class DatasetConfig:
    """Schema of `conf/dataset/*.yaml`."""
    name: str = "digits"
    root: str = "data"
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 1024
    val_size: float = 0.0             # 0 = none; in (0, 1) a fraction of train; >= 1 a count
    subset: Optional[int] = None
    label_noise: float = 0.0
    augment: bool = False
    synthetic_size: int = 50000

    def __post_init__(self):
        check(self.name in DATASETS, "name", self.name, ", ".join(DATASETS))
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")
        check(self.val_size >= 0 and (self.val_size < 1 or self.val_size == int(self.val_size)), "val_size",
              self.val_size, "0, a fraction in (0, 1) or a whole count")
        check(self.subset is None or self.subset >= 1, "subset", self.subset, "null or >= 1")
        check(0.0 <= self.label_noise <= 1.0, "label_noise", self.label_noise, "[0, 1]")
        check(self.synthetic_size >= 1, "synthetic_size", self.synthetic_size, ">= 1")


def crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding `pad` and random horizontal flip, per image, as one gather.

    x: (B, C, H, W) -> (B, C, H, W) (a channels_last view: the gather produces (B, H, W, C)).
    """
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))                                      # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    rows = dy + torch.arange(h, device=dev)                                      # (B, H)
    cols = dx + torch.arange(w, device=dev)                                      # (B, W)
    flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]                   # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


class DeviceBatches:
    """Mini-batches of one device-resident split: (normalized float images, int64 labels).

    Shuffling and augmentation draw from `generator` (on the same device), whose state is checkpointed,
    so the data order of a resumed run is the uninterrupted run's.
    """

    def __init__(self, split: Split, batch_size: int, mean, std, *, shuffle: bool, augment: bool,
                 generator: Optional[torch.Generator] = None, channels_last: bool = False):
        self.x, self.y = split.x, split.y
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = generator
        dev = self.x.device
        self.mean = torch.tensor(mean, device=dev).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=dev).view(1, -1, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, dev = len(self.y), self.y.device
        order = torch.randperm(n, device=dev, generator=self.generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                x, y = self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                x, y = self.x[idx], self.y[idx]
            if self.augment:
                x = crop_flip(x, 4, self.generator)
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            yield x, y


@dataclass
class Data:
    """What the loop needs: training batches, evaluation batches by split name, and the problem's shape."""
    train: DeviceBatches
    evals: dict  # "test" (and "val") -> DeviceBatches
    num_classes: int
    in_channels: int
    image_size: int
    noisy_fraction: float


def _on(split: Split, device: torch.device) -> Split:
    return Split(split.x.to(device), split.y.to(device))


def build_data(cfg: DatasetConfig, seed: int, device: torch.device, channels_last: bool = False) -> Data:
    """Load the dataset, take a subset / validation split / label noise (all seeded), move it to `device`."""
    raw: ImageData = load_image_data(cfg.name, cfg.root, cfg.download, synthetic_size=cfg.synthetic_size,
                                     seed=seed)
    train, evals = raw.train, {}
    if cfg.subset is not None:
        train = take_subset(train, cfg.subset, seed)
    if cfg.val_size > 0:
        val_size = cfg.val_size if cfg.val_size < 1 else int(cfg.val_size)
        train, evals["val"] = split_train_val(train, val_size, seed)
    noisy_fraction = 0.0
    if cfg.label_noise > 0:
        noisy, flipped = symmetric_label_noise(train.y, cfg.label_noise, raw.num_classes, seed)
        train, noisy_fraction = Split(train.x, noisy), flipped.float().mean().item()
    evals["test"] = raw.test
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    make = lambda split, bs, **kw: DeviceBatches(_on(split, device), bs, raw.mean, raw.std,
                                                 channels_last=channels_last, **kw)
    return Data(
        train=make(train, cfg.batch_size, shuffle=True, augment=cfg.augment, generator=generator),
        evals={name: make(split, cfg.eval_batch_size, shuffle=False, augment=False)
               for name, split in evals.items()},
        num_classes=raw.num_classes, in_channels=raw.in_channels, image_size=raw.image_size,
        noisy_fraction=noisy_fraction)
