"""A small CNN: `blocks` x (conv3x3 -> BN -> ReLU), 2x2 max-pool between blocks, global average pool, linear.

Channels double per block (width, 2*width, ...). The adaptive average pool at the end makes it work for any
input size >= 2**(blocks-1): 8x8 digits, 28x28 MNIST-like and 32x32 CIFAR images.
Convs use Kaiming-normal initialization (fan_out, ReLU), as in torchvision's ResNets.
"""
from dataclasses import dataclass
from typing import List

from torch import nn

from runner.config import check
from runner.models import MODELS, image_shape


@dataclass
class CNNParams:
    width: int = 32  # channels of the first block; doubled in each following block
    blocks: int = 3  # number of conv-BN-ReLU blocks (1..4)
    dropout: float = 0.0  # dropout probability before the final linear layer

    def __post_init__(self):
        check(self.width > 0, "width", self.width, "width > 0")
        check(1 <= self.blocks <= 4, "blocks", self.blocks, "1 <= blocks <= 4")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "0 <= dropout < 1")


@MODELS.register("cnn", CNNParams, batchnorm=True, inputs=("image",))
def build_cnn(input, num_classes: int, width: int, blocks: int, dropout: float) -> nn.Module:
    """Small conv-BN-ReLU network with global average pooling."""
    in_channels, image_size = image_shape(input, "cnn")
    check(image_size >= 2 ** (blocks - 1), "image_size", image_size, f">= {2 ** (blocks - 1)} for {blocks} blocks")
    layers: List[nn.Module] = []
    c_in = in_channels
    for i in range(blocks):
        c_out = width * 2 ** i
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
