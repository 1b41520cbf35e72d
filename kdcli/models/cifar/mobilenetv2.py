"""MobileNetV2 for CIFAR, RepDistiller's `mobile_half` (width 0.5, expansion 6), from its
`models/mobilenetv2.py`. The stem keeps stride 2, so a 32x32 input ends on a 2x2 map."""

from __future__ import annotations

from torch import Tensor, nn

from kdcli.models.cifar._common import CifarNet, pool_flat, reference_init_
from kdcli.models.registry import register_model

# (expansion, channels, blocks, first stride) per stage; expansion None means `expand`.
_STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
           (None, 160, 3, 2), (None, 320, 1, 1))
# Indices into `blocks` of the stages whose output is a feature (RepDistiller's f1..f4).
_FEATURE_STAGES = (1, 2, 4, 6)


def conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection (all in `.conv`); residual when shapes match.

    The expansion conv is present even at expansion 1, as in the reference.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: int):
        super().__init__()
        mid = in_chs * expand
        self.use_residual = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(CifarNet):
    """Stem `conv1`, seven stages in `blocks`, 1x1 `conv2` to 1280, pool, `classifier` (a
    Sequential holding the Linear, so its keys are `classifier.0.*`).

    features: [stem, after stage 2, stage 3, stage 5, stage 7] (RepDistiller's f0..f4). Only the
    stem is post-ReLU: stage outputs end with the linear bottleneck (BN, no ReLU) and can be
    negative. `preact` changes nothing (RepDistiller ignores it for this model).
    """

    def __init__(self, expand: int = 6, width: float = 0.5, num_classes: int = 100):
        super().__init__()
        in_chs = int(32 * width)
        self.conv1 = conv_bn_relu(3, in_chs, 3, stride=2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _STAGES:
            out_chs = int(c * width)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t or expand))
                in_chs = out_chs
            self.blocks.append(nn.Sequential(*stage))
        last_chs = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(in_chs, last_chs, 1)
        self.classifier = nn.Sequential(nn.Linear(last_chs, num_classes))
        reference_init_(self, linear_std=0.01)

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
        x = self.conv1(x)
        feats = [x]
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in _FEATURE_STAGES:
                feats.append(x)
        return feats, pool_flat(self.conv2(x))

    def get_classifier(self) -> nn.Linear:
        return self.classifier[0]


@register_model("MobileNetV2")
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(expand=6, width=0.5, num_classes=num_classes)
