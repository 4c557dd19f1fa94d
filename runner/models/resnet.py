"""ResNet-18 (He et al., 2016, "Deep Residual Learning for Image Recognition") with the CIFAR stem.

Convention of kuangliu/pytorch-cifar and the SAM papers: 3x3 stride-1 stem conv, no max-pool, BasicBlocks
[2, 2, 2, 2] with widths width * (1, 2, 4, 8), 1x1-conv + BN projection shortcuts, global average pool, linear.
11,173,962 parameters for 10 classes, 3 input channels and width 64. Convs use Kaiming-normal initialization
(fan_out, ReLU) as in torchvision; BN weight 1, bias 0.
"""
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from runner.config import check
from runner.models import MODELS, image_shape


@dataclass
class ResNetParams:
    width: int = 64  # channels of the stem and first stage; stages use width * (1, 2, 4, 8)

    def __post_init__(self):
        check(self.width > 0, "width", self.width, "width > 0")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i in range(4):
            c_out = width * 2 ** i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@MODELS.register("resnet18", ResNetParams, batchnorm=True, inputs=("image",))
def build_resnet18(input, num_classes: int, width: int) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    in_channels, _ = image_shape(input, "resnet18")
    return ResNet18(num_classes, in_channels, width)
