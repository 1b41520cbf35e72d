"""ResNet50 for CIFAR: ImageNet bottleneck ResNet [3, 4, 6, 3] with a 3x3 stride-1 stem and no
max-pool, as in RepDistiller `models/resnetv2.py`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.cifar._common import CifarNet, pool_flat, reference_init_, run_stages
from kdcli.models.registry import register_model


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4, plus a projection shortcut when
    the shape changes."""

    expansion = 4

    def __init__(self, in_chs: int, chs: int, stride: int = 1):
        super().__init__()
        out_chs = chs * self.expansion
        self.conv1 = nn.Conv2d(in_chs, chs, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chs)
        self.conv2 = nn.Conv2d(chs, chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(chs)
        self.conv3 = nn.Conv2d(chs, out_chs, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        pre = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(pre), pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ResNetV2(CifarNet):
    """Stem (64) and four bottleneck stages (64/128/256/512 x 4), global pool, `linear`.

    features: [stem, stage1, ..., stage4], post-ReLU; with `preact=True` the stages are the last
    block's sum before its ReLU. (RepDistiller wraps its preact list in an extra list by
    mistake; mdistiller's `preact_feats` is the flat list returned here.)
    """

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_chs = 64
        for i, (chs, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            stage = [Bottleneck(in_chs, chs, stride)]
            in_chs = chs * Bottleneck.expansion
            stage += [Bottleneck(in_chs, chs) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.linear = nn.Linear(in_chs, num_classes)
        reference_init_(self)

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
        feats, x = run_stages(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3, self.layer4), preact)
        return feats, pool_flat(x)

    def get_classifier(self) -> nn.Linear:
        return self.linear


@register_model("ResNet50")
def resnet50(num_classes: int = 100) -> ResNetV2:
    return ResNetV2((3, 4, 6, 3), num_classes)
