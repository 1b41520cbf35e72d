"""CIFAR ResNets (He et al. 2016, option-B shortcuts), as in RepDistiller `models/resnet.py`.

resnet{8,14,20,32,44,56,110} have stage widths 16/32/64 and a 16-wide stem; resnet8x4 and
resnet32x4 are four times wider (stem 32, stages 64/128/256).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.cifar._common import CifarNet, pool_flat, reference_init_, run_stages
from kdcli.models.registry import register_model


def conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, in_chs: int, chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_chs, chs, stride)
        self.bn1 = nn.BatchNorm2d(chs)
        self.conv2 = conv3x3(chs, chs)
        self.bn2 = nn.BatchNorm2d(chs)
        self.downsample = None
        if stride != 1 or in_chs != chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, chs, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(chs)
            )

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        shortcut = x if self.downsample is None else self.downsample(x)
        pre = self.bn2(self.conv2(out)) + shortcut
        return F.relu(pre), pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class CifarResNet(CifarNet):
    """3x3 stem, three stages of `(depth - 2) / 6` basic blocks, global pool, `fc`.

    features: [stem, stage1, stage2, stage3], all post-ReLU; with `preact=True` the stages are
    the last block's sum before its ReLU (the stem stays post-ReLU).
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n + 2"
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], blocks, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        reference_init_(self)

    @staticmethod
    def _make_stage(in_chs: int, chs: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_chs, chs, stride), *(BasicBlock(chs, chs) for _ in range(blocks - 1))
        )

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
        feats, x = run_stages(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3), preact)
        return feats, pool_flat(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes)


@register_model("resnet14")
def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, _NARROW, num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, _NARROW, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)
