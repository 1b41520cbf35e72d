"""Wide ResNets (Zagoruyko & Komodakis 2016), pre-activation blocks, as in RepDistiller
`models/wrn.py` (dropout rate 0, the only setting its factories use)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.cifar._common import CifarNet, pool_flat, reference_init_
from kdcli.models.registry import register_model


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a 1x1 `convShortcut` on the activated input when the width changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        # Name kept from the reference so that its checkpoints load.
        self.convShortcut = None
        if in_chs != out_chs:
            self.convShortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return shortcut + out


class WideStage(nn.Module):
    """A stage of wide blocks, held under `.layer` like the reference's `NetworkBlock`."""

    def __init__(self, blocks: int, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            WideBlock(in_chs, out_chs, stride), *(WideBlock(out_chs, out_chs, 1) for _ in range(blocks - 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def _bn_no_stats_update(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """`bn(x)` without touching the running statistics (batch statistics in train mode)."""
    batch_stats = bn.training or bn.running_mean is None
    return F.batch_norm(
        x,
        None if batch_stats else bn.running_mean,
        None if batch_stats else bn.running_var,
        bn.weight,
        bn.bias,
        training=batch_stats,
        eps=bn.eps,
    )


class WideResNet(CifarNet):
    """WRN-depth-widen: 3x3 stem (16), three stages (16w/32w/64w), final BN-ReLU, pool, `fc`.

    Pre-activation network, so its features are NOT post-ReLU: [stem conv output, stage1,
    stage2, stage3] are raw residual sums. With `preact=True` stage k is passed through the BN
    that opens the next stage (block2's / block3's first `bn1`, then the final `bn1`), as
    RepDistiller does; unlike RepDistiller that extra BN call leaves the running statistics
    alone (same values; RepDistiller updates them a second time in train mode).
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n + 4"
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(blocks, widths[0], widths[1], 1)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        reference_init_(self, linear_zero_bias=True)

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        f3_pre = self.bn1(f3)
        embedding = pool_flat(F.relu(f3_pre))
        if not preact:
            return [f0, f1, f2, f3], embedding
        f1_pre = _bn_no_stats_update(self.block2.layer[0].bn1, f1)
        f2_pre = _bn_no_stats_update(self.block3.layer[0].bn1, f2)
        return [f0, f1_pre, f2_pre, f3_pre], embedding

    def get_classifier(self) -> nn.Linear:
        return self.fc


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
