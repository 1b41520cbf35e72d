"""Distilling knowledge via knowledge review (Chen et al., CVPR 2021), as mdistiller on CIFAR."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import hcl_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.models.features import Outputs


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv+BN to C_mid, fused with the deeper level's residual through
    a 2-channel sigmoid attention, nearest-resized to the teacher level's size, 3x3 conv+BN to C_out.
    Returns (output for the loss, residual for the next shallower level)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_mid, kernel_size=1, bias=False), nn.BatchNorm2d(c_mid))
        self.conv2 = nn.Sequential(nn.Conv2d(c_mid, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att = nn.Sequential(nn.Conv2d(2 * c_mid, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            weights = self.att(torch.cat([x, residual], dim=1))
            x = x * weights[:, 0:1] + residual * weights[:, 1:2]
        if tuple(x.shape[2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


def _levels(shapes: Shapes) -> list[tuple[int, ...]]:
    """Stage maps then the pooled embedding as a 1x1 map, shallow to deep."""
    return [*shapes.features[1:], (shapes.embedding, 1, 1)]


@register("reviewkd")
class ReviewKD(Method):
    """Student stages + pooled embedding, fused top-down by one ABF per level, each matched to the
    teacher's pre-ReLU stage (or pooled embedding) by the HCL loss; loss = beta * min(epoch/warmup, 1)
    * HCL. The per-pair channel/shape lists of the official code follow from the dry-run shapes
    (C_mid = min(`max_mid`, student embedding width)); beta per pair: 5 default, res56->res20 0.6,
    res110->res32 1.0, res32x4->ShuffleV2 8 (presets)."""

    title = "Distilling Knowledge via Knowledge Review"
    paper = "Chen, Liu, Zhao & Jia, CVPR 2021 (arXiv 2104.09044)"
    year = 2021
    needs = Needs(features=True, embedding=True, teacher_preact=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 5.0, "warmup": 20, "max_mid": 512}
    ranges: ClassVar[dict[str, str]] = {"beta": "nonnegative", "warmup": "nonnegative", "max_mid": "count"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        s_levels, t_levels = _levels(student), _levels(teacher)
        self.levels = min(len(s_levels), len(t_levels))
        if len(student.features) < 2 or len(teacher.features) < 2:
            raise KdError("reviewkd needs stage feature maps, which the student or teacher does not expose",
                          "pick CIFAR-zoo architectures (kd list models)")
        s_levels, t_levels = s_levels[-self.levels :], t_levels[-self.levels :]
        c_mid = min(self.hp["max_mid"], student.embedding)
        self.out_sizes = [tuple(t[1:]) for t in t_levels]
        self.abfs = nn.ModuleList(
            ABF(s[0], c_mid, t[0], fuse=i < self.levels - 1) for i, (s, t) in enumerate(zip(s_levels, t_levels))
        )

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        s_maps = [*s.features[1:], s.embedding[:, :, None, None]][-self.levels :]
        t_maps = [*t.features[1:], t.embedding[:, :, None, None]][-self.levels :]
        outputs: list[Tensor] = []
        residual = None
        for i in reversed(range(self.levels)):  # deepest first
            out, residual = self.abfs[i](s_maps[i], residual, self.out_sizes[i])
            outputs.insert(0, out)
        ramp = min(self.epoch / self.hp["warmup"], 1.0) if self.hp["warmup"] else 1.0
        return {"reviewkd": self.hp["beta"] * ramp * hcl_loss(outputs, t_maps)}
