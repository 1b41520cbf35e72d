"""What every CIFAR zoo model shares: the `CifarNet` interface and the reference init scheme."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdcli.models.pooling import adaptive_avg_pool2d


class CifarNet(nn.Module):
    """Base of the CIFAR zoo.

    A family implements `forward_features(x, preact)` -> `(features, embedding)` and
    `get_classifier()`; the logits are always `get_classifier()(embedding)`.
    """

    def forward_features(self, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:
        raise NotImplementedError

    def forward(self, x: Tensor, features: bool = False, preact: bool = False):
        """Logits, or `(logits, features, embedding)` when `features=True`.

        The tuple form lets adapters go through DDP / torch.compile wrappers, which only
        intercept `__call__`.
        """
        feats, embedding = self.forward_features(x, preact=preact)
        logits = self.get_classifier()(embedding)
        return (logits, feats, embedding) if features else logits


def pool_flat(x: Tensor) -> Tensor:
    """Global average pool to a flat vector; adaptive, so any input resolution works."""
    return torch.flatten(adaptive_avg_pool2d(x, 1), 1)


def run_stage(stage: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a stage; return its output and the pre-activation of its last block."""
    *body, last = stage
    for block in body:
        x = block(x)
    return last.forward_with_preact(x)


def run_stages(x: Tensor, stages, preact: bool) -> tuple[list[Tensor], Tensor]:
    """`([x, stage outputs...], last output)`; pre-activation stage outputs when `preact`."""
    feats, pres = [x], [x]
    for stage in stages:
        x, pre = run_stage(stage, x)
        feats.append(x)
        pres.append(pre)
    return (pres if preact else feats), x


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: interleave the channels of `groups` groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def reference_init_(model: nn.Module, linear_std: float | None = None, linear_zero_bias: bool = False):
    """The He-normal (fan-out) init RepDistiller uses for its conv nets.

    Convs: N(0, 2 / (k*k*out_channels)), zero bias; BatchNorm: weight 1, bias 0. The final
    Linear keeps PyTorch's default unless `linear_std` (normal weights, zero bias) or
    `linear_zero_bias` is given. Modules are visited in registration order, so with the same
    seed the weights equal the reference's draw for draw.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or linear_zero_bias:
                nn.init.zeros_(m.bias)
