"""ShuffleNet V1 for CIFAR (groups 3, widths 240/480/960, blocks 4/8/4), as in RepDistiller
`models/ShuffleNetv1.py`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.cifar._common import CifarNet, channel_shuffle, pool_flat, run_stages
from kdcli.models.registry import register_model


class ShuffleUnit(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1.

    A stride-2 unit concatenates an average-pooled shortcut (so its branch outputs
    `out_chs - in_chs` channels); a stride-1 unit adds the input. The first grouped conv of the
    network (on the 24-channel stem) is not grouped.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int):
        super().__init__()
        mid = out_chs // 4
        self.stride = stride
        self.first_groups = 1 if in_chs == 24 else groups
        self.conv1 = nn.Conv2d(in_chs, mid, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_chs, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            pre = torch.cat([out, F.avg_pool2d(x, kernel_size=3, stride=2, padding=1)], 1)
        else:
            pre = out + x
        return F.relu(pre), pre

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ShuffleNetV1(CifarNet):
    """1x1 stem (24), three stages opening with a stride-2 unit, global pool, `linear`.

    features: [stem, stage1, stage2, stage3] post-ReLU; with `preact=True` the stages are the
    last unit's sum before its ReLU.
    """

    def __init__(self, widths=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_chs = 24
        for i, (out_chs, n) in enumerate(zip(widths, blocks)):
            stage = [ShuffleUnit(in_chs, out_chs - in_chs, 2, groups)]
            stage += [ShuffleUnit(out_chs, out_chs, 1, groups) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_chs = out_chs
        self.linear = nn.Linear(in_chs, num_classes)

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
        feats, x = run_stages(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3), preact)
        return feats, pool_flat(x)

    def get_classifier(self) -> nn.Linear:
        return self.linear


@register_model("ShuffleV1")
def shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes)
