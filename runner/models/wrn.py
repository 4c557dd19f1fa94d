"""Wide ResNet WRN-depth-k (Zagoruyko & Komodakis, 2016, "Wide Residual Networks").

Convention of the SAM papers (davda54/sam example `wide_res_net.py`): pre-activation basic blocks
BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, (depth - 4) / 6 blocks per group, group widths 16k, 32k, 64k with
strides 1, 2, 2, 1x1-conv shortcuts where the shape changes (sharing the first BN-ReLU), final BN-ReLU, global
average pool, linear. WRN-16-8: 10,961,370 and WRN-28-10: 36,479,194 parameters for 10 classes, the
published counts (11.0M, 36.5M). Unlike davda54/sam, which adds an extra unit per group, each group has exactly n
blocks as in the paper; the final pool is adaptive, so 28x28 and 8x8 inputs also work.
Initialization as in davda54/sam: convs Kaiming-normal (fan_in, ReLU), BN weight 1 / bias 0, linear zeros.
"""
from dataclasses import dataclass

from torch import Tensor, nn

from runner.config import check
from runner.models import MODELS, image_shape


@dataclass
class WRNParams:
    depth: int = 16  # total depth 6n + 4 (n blocks per group): 16, 22, 28, 40, ...
    width_factor: int = 8  # k: group widths are 16k, 32k, 64k
    dropout: float = 0.0  # dropout probability between the two convs of a block

    def __post_init__(self):
        check(self.depth >= 10 and (self.depth - 4) % 6 == 0, "depth", self.depth, "6n + 4 with n >= 1: 10, 16, 22, 28, ...")
        check(self.width_factor >= 1, "width_factor", self.width_factor, "width_factor >= 1")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "0 <= dropout < 1")


def _bn_relu(c: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))


class Block(nn.Module):
    """Pre-activation block; with a shape change the first BN-ReLU feeds both branches (davda54 DownsampleUnit)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.norm_act = _bn_relu(c_in)
        self.block = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), _bn_relu(c_out),
            nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False))
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is None:
            return x + self.block(self.norm_act(x))
        x = self.norm_act(x)
        return self.downsample(x) + self.block(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, width_factor: int, dropout: float, in_channels: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width_factor, 32 * width_factor, 64 * width_factor]
        layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        for g, stride in enumerate([1, 2, 2]):
            layers += [Block(widths[g] if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1, dropout)
                       for i in range(n)]
        layers += [_bn_relu(widths[3]), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[3], num_classes)]
        self.f = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)


@MODELS.register("wrn", WRNParams, batchnorm=True, inputs=("image",))
def build_wrn(input, num_classes: int, depth: int, width_factor: int, dropout: float) -> nn.Module:
    """Wide ResNet WRN-depth-width_factor with pre-activation blocks."""
    in_channels, _ = image_shape(input, "wrn")
    return WideResNet(depth, width_factor, dropout, in_channels, num_classes)
