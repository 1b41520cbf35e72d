"""ShuffleNet V2 (1x) for CIFAR, as in RepDistiller `models/ShuffleNetv2.py` (`net_size=1`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.cifar._common import CifarNet, channel_shuffle, pool_flat, run_stages
from kdcli.models.registry import register_model


class SplitUnit(nn.Module):
    """Split channels in half; 1x1, depthwise 3x3, 1x1 on the second half; concat; shuffle."""

    def __init__(self, chs: int):
        super().__init__()
        half = chs // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        half = x.shape[1] // 2
        keep, x2 = x[:, :half], x[:, half:]
        branch = F.relu(self.bn1(self.conv1(x2)))
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        pre = torch.cat([keep, branch], 1)
        out = channel_shuffle(torch.cat([keep, F.relu(branch)], 1), 2)
        return out, pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class DownUnit(nn.Module):
    """Stride-2 unit: both branches see the whole input and each gives half the output channels."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        mid = out_chs // 2
        self.conv1 = nn.Conv2d(in_chs, in_chs, kernel_size=3, stride=2, padding=1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv2 = nn.Conv2d(in_chs, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_chs, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(CifarNet):
    """1x1 stem (24), three stages (116/232/464; a down unit then 3/7/3 split units), 1x1
    `conv2` to 1024 with BN-ReLU, global pool, `linear`.

    features: [stem, stage1, stage2, stage3] post-ReLU. With `preact=True` a stage is
    `cat(kept half, branch before ReLU)` of its last unit taken BEFORE the channel shuffle, so
    its channel order differs from the post-ReLU feature (as in RepDistiller and mdistiller).
    The embedding (1024-d) comes from `conv2`, not directly from stage 3.
    """

    def __init__(self, widths=(116, 232, 464, 1024), blocks=(3, 7, 3), num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_chs = 24
        for i, (out_chs, n) in enumerate(zip(widths[:3], blocks)):
            stage = [DownUnit(in_chs, out_chs), *(SplitUnit(out_chs) for _ in range(n))]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_chs = out_chs
        self.conv2 = nn.Conv2d(in_chs, widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
        feats, x = run_stages(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3), preact)
        embedding = pool_flat(F.relu(self.bn2(self.conv2(x))))
        return feats, embedding

    def get_classifier(self) -> nn.Linear:
        return self.linear


@register_model("ShuffleV2")
def shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
