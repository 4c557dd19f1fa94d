"""Models from timm (Ross Wightman's pytorch-image-models): any architecture of its zoo by name.

`model=timm model.arch=vit_small_patch16_224` builds `timm.create_model(arch, pretrained=model.pretrained,
num_classes=<the task's>, in_chans=<the task's channels>, **model.kwargs)`; for architectures that take an
`img_size` (ViTs, MLP-Mixers, Swin), the task's image size is handed on unless `model.kwargs` sets it (a ViT for
32x32 CIFAR: `+model.kwargs.patch_size=4` on the command line; conf/model/vit_cifar.yaml). timm's own initialization (its
`init_weights` per architecture, e.g. ViT's truncated normal 0.02) is kept: it is what the papers that use timm ran.

`model.name` chooses the runner's model entry (here `timm`) in every group, so timm's architecture is `model.arch`.
`pretrained: false` by default: weights are downloaded from the Hugging Face hub, which needs the network (or its
cache). Keep the hand-written CIFAR ResNet and WRN (runner/models/resnet.py, wrn.py) for CIFAR: timm's ResNets
have the ImageNet stem (7x7 stride-2 conv and max-pool), which discards most of a 32x32 image.

Checked before any work: the name (`timm.is_model`), and that the architecture takes the task's images: the model
is built on the meta device (no memory, no time) and run on a meta batch; an architecture that cannot (a ViT whose
patch does not divide the image, a network that pools a small image to nothing) is one line naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch
from torch import nn

from runner.config import ConfigError, check
from runner.models import MODELS, image_shape


@dataclass
class TimmParams:
    arch: str = "resnet18"           # a timm model name: python -c "import timm; print(timm.list_models('vit*'))"
    pretrained: bool = False         # timm's pretrained weights (downloads them: needs the network or its cache)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # handed to timm.create_model (drop_path_rate, patch_size..)

    def __post_init__(self):
        import timm

        check(isinstance(self.arch, str) and timm.is_model(self.arch), "arch", self.arch,
              "a timm model name (timm.list_models() lists them)")
        check(isinstance(self.kwargs, dict), "kwargs", self.kwargs, "a mapping of timm.create_model arguments")


def _create(arch: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(arch, **kwargs)


def timm_arguments(arch: str, channels: int, size: int, num_classes: int, kwargs: dict) -> dict:
    """create_model's arguments for the task: classes, channels, and the image size where the architecture takes
    one; checked on the meta device (a forward of a meta batch must give (N, num_classes)), else ConfigError."""
    arguments = {"num_classes": num_classes, "in_chans": channels, **kwargs}
    where = f"model.arch={arch}"
    with torch.device("meta"):
        try:
            probe = _create(arch, img_size=size, **arguments) if "img_size" not in kwargs else None
            arguments = {"img_size": size, **arguments} if probe is not None else arguments
        except TypeError:  # an architecture without img_size (CNNs): it takes any size its pooling allows
            probe = None
        try:
            probe = probe or _create(arch, **arguments)
            out = probe(torch.zeros(2, channels, size, size))
        except TypeError as e:
            raise ConfigError("model.kwargs", message=f"{where}: timm.create_model refuses model.kwargs={kwargs}: "
                                                      f"{str(e).splitlines()[0]}") from None
        except Exception as e:  # the shapes do not fit: one line, before any work
            raise ConfigError("model.arch", message=(
                f"{where} cannot take this dataset's {channels}x{size}x{size} images: "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")) from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError("model.arch", message=f"{where} gives outputs of shape {tuple(out.shape[1:])} for "
                                                f"{channels}x{size}x{size} images, not ({num_classes},) logits")
    return arguments


@MODELS.register("timm", TimmParams, batchnorm=True, inputs=("image",))
def build_timm(input, num_classes: int, arch: str, pretrained: bool, kwargs: dict) -> nn.Module:
    channels, size = image_shape(input, f"timm (model.arch={arch})")
    arguments = timm_arguments(arch, channels, size, num_classes, dict(kwargs))
    return _create(arch, pretrained=pretrained, **arguments)
