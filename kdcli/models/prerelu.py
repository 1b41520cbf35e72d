"""The BatchNorm feeding the final ReLU of each stage (OFD's margins), for the CIFAR zoo.

One BN per entry of `Outputs.features[1:]`, found by family: CIFAR ResNets the last BN of each
stage's last block (bn2, bn3 for bottlenecks), WRN the BN that the next stage (or the head) applies
to the stage output, VGG the last BN of each block. Other networks have no such rule here.
"""

from __future__ import annotations

from torch import nn

from kdcli.errors import KdError
from kdcli.models.cifar.resnet import CifarResNet
from kdcli.models.cifar.resnetv2 import ResNetV2
from kdcli.models.cifar.vgg import VGG
from kdcli.models.cifar.wrn import WideResNet
from kdcli.models.features import _unwrap


def _last_block_bn(stage: nn.Sequential) -> nn.BatchNorm2d:
    block = stage[-1]
    return getattr(block, "bn3", None) or block.bn2


def stage_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN before the ReLU of every stage output, shallow to deep."""
    inner = _unwrap(model)
    if isinstance(inner, (CifarResNet, ResNetV2)):
        stages = [getattr(inner, f"layer{i}") for i in range(1, 5) if hasattr(inner, f"layer{i}")]
        return [_last_block_bn(stage) for stage in stages]
    if isinstance(inner, WideResNet):
        return [inner.block2.layer[0].bn1, inner.block3.layer[0].bn1, inner.bn1]
    if isinstance(inner, VGG):
        blocks = [getattr(inner, f"block{i}") for i in range(1, 5)]
        return [[m for m in block if isinstance(m, nn.BatchNorm2d)][-1] for block in blocks]
    raise KdError(
        f"the teacher {type(inner).__name__} has no known BatchNorm before each stage's ReLU, which ofd needs",
        "use a CIFAR ResNet, ResNet50, WRN or VGG teacher",
    )
