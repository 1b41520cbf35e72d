"""VGG with BatchNorm for CIFAR (no FC stack: one Linear on the pooled 512-d map), as in
RepDistiller `models/vgg.py`; the zoo names vgg8..vgg19 are its `*_bn` variants."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.cifar._common import CifarNet, pool_flat, reference_init_
from kdcli.models.registry import register_model

# Conv widths of the five blocks; a 2x2 max-pool separates consecutive blocks.
_CFGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _make_block(in_chs: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv3x3-BN-ReLU per width, without the last ReLU so the block ends at its pre-activation."""
    layers: list[nn.Module] = []
    for chs in widths:
        layers += [nn.Conv2d(in_chs, chs, kernel_size=3, padding=1), nn.BatchNorm2d(chs), nn.ReLU(inplace=True)]
        in_chs = chs
    return nn.Sequential(*layers[:-1])


class VGG(CifarNet):
    """Five conv blocks (`block0`..`block4`), global pool, `classifier`.

    features: [block0, ..., block4] post-ReLU; with `preact=True` blocks 1-4 before their ReLU
    (block0 stays post-ReLU). As in the reference, the pool between block3 and block4 is used
    only for 64-pixel-high inputs (32x32 inputs keep a 4x4 last map).
    """

    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int = 100):
        super().__init__()
        in_chs = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _make_block(in_chs, widths))
            in_chs = widths[-1]
        self.classifier = nn.Linear(512, num_classes)
        reference_init_(self, linear_std=0.01)

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
        pool_before_last = x.shape[2] == 64
        x = F.relu(self.block0(x))
        feats, pres = [x], [x]
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4), start=1):
            if i < 4 or pool_before_last:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            pre = block(x)
            x = F.relu(pre)
            feats.append(x)
            pres.append(pre)
        return (pres if preact else feats), pool_flat(x)

    def get_classifier(self) -> nn.Linear:
        return self.classifier


@register_model("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg8"], num_classes)


@register_model("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg11"], num_classes)


@register_model("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg13"], num_classes)


@register_model("vgg16")
def vgg16(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg16"], num_classes)


@register_model("vgg19")
def vgg19(num_classes: int = 100) -> VGG:
    return VGG(_CFGS["vgg19"], num_classes)
