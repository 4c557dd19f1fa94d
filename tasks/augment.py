"""Image augmentations of device-resident batches, as a list: `dataset.augment=[crop_flip, autoaugment, cutout]`.

Applied to each training batch on the device, in the listed order, drawing from the task's data generator (its state
is checkpointed, so a resumed run augments as the uninterrupted one did; every rank of a many-device run draws the
same, runner/cluster.py):
- `crop_flip`: random crop with zero padding 4 + horizontal flip, per image (the SAM papers' CIFAR baseline);
- `autoaugment`: AutoAugment's CIFAR-10 policy (Cubuk et al., CVPR 2019), torchvision.transforms.v2.AutoAugment;
- `randaugment`: RandAugment, 2 operations at magnitude 9 (Cubuk et al., NeurIPS 2020; torchvision's defaults),
  torchvision.transforms.v2.RandAugment;
- `cutout`: one square hole per image (DeVries & Taylor 2017), side `dataset.cutout_size` (null: half the image
  side, 16 on 32x32 as the paper's CIFAR-10 setting; use 8 for CIFAR-100 as the paper does), its centre uniform over
  the image and the square clipped at the border, as the paper's code. It zeroes the *normalized* image (the mean
  pixel), as that code applies it after normalization, so it must come last in the list.
The two policies act on uint8 images one image at a time (torchvision's v2 transforms, given a batch, apply one
draw of the policy to the whole batch; the papers draw per image): a Python loop over the batch, seeded per batch
from the data generator through `torch.random.fork_rng` (torchvision draws from torch's global generator). That
loop costs about a millisecond an image on the CPU: the price of using torchvision's reference implementation.
`dataset.augment: true` is `[crop_flip]` and `false` is `[]` (the values run folders were made with).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from runner.config import ConfigError

AUGMENTATIONS = ("crop_flip", "autoaugment", "randaugment", "cutout")


def resolve(augment: Any) -> tuple[str, ...]:
    """`dataset.augment` as the list of augmentations it means (true: the customary crop + flip)."""
    if augment is True:
        return ("crop_flip",)
    if augment is False or augment is None:
        return ()
    return tuple(augment)


def check_augment(augment: Any, cutout_size: Optional[int]) -> None:
    """ConfigError (one line) unless `augment` is true, false or a list of known augmentations, cutout last."""
    if isinstance(augment, bool) or augment is None:
        names: tuple = ()
    elif isinstance(augment, (list, tuple)) and all(isinstance(a, str) for a in augment):
        names = tuple(augment)
    else:
        raise ConfigError("augment", augment, f"true, false or a list of: {', '.join(AUGMENTATIONS)}")
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise ConfigError("augment", unknown[0], f"one of {', '.join(AUGMENTATIONS)}")
    if len(set(names)) != len(names):
        raise ConfigError("augment", list(names), "each augmentation once")
    if "cutout" in names and names[-1] != "cutout":
        raise ConfigError("augment", list(names), "cutout last (it zeroes a square of the normalized image)")
    if cutout_size is not None and (isinstance(cutout_size, bool) or cutout_size < 1):
        raise ConfigError("cutout_size", cutout_size, "null (half the image side) or a side >= 1")


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


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image, centred uniformly over the image and clipped at its border (DeVries &
    Taylor's code: y1 = clip(cy - size // 2), y2 = clip(cy + size // 2)); batched, no loop."""
    b, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (b, 1), device=dev, generator=generator)
    cx = torch.randint(0, w, (b, 1), device=dev, generator=generator)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows >= (cy - size // 2).clamp(0, h)) & (rows < (cy + size // 2).clamp(0, h))   # (B, H)
    in_cols = (cols >= (cx - size // 2).clamp(0, w)) & (cols < (cx + size // 2).clamp(0, w))   # (B, W)
    hole = in_rows[:, :, None] & in_cols[:, None, :]                                            # (B, H, W)
    return x.masked_fill(hole[:, None], 0)


def _policies() -> dict:
    from torchvision.transforms import v2

    return {"autoaugment": v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), "randaugment": v2.RandAugment()}


def per_image(transform, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`transform` applied to each uint8 image of x on its own draw; the draws seeded from `generator`."""
    seed = int(torch.randint(0, 2**62, (1,), device=generator.device, generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for image in x])


class Augment:
    """The listed augmentations of uint8 (B, C, H, W) batches; `after_normalize` does the ones that act on the
    normalized image (cutout)."""

    def __init__(self, names: tuple[str, ...], cutout_size: Optional[int] = None, pad: int = 4):
        self.names, self.cutout_size, self.pad = tuple(names), cutout_size, pad
        policies = _policies() if {"autoaugment", "randaugment"} & set(self.names) else {}
        self.policies = {name: policies[name] for name in self.names if name in policies}

    def __bool__(self) -> bool:
        return bool(self.names)

    def before_normalize(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for name in self.names:
            if name == "crop_flip":
                x = crop_flip(x, self.pad, generator)
            elif name in self.policies:
                x = per_image(self.policies[name], x.contiguous(), generator)
        return x

    def after_normalize(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if "cutout" in self.names:
            x = cutout(x, self.cutout_size or max(1, x.shape[-1] // 2), generator)
        return x
