"""A comprehensive overhaul of feature distillation (Heo et al., ICCV 2019), as mdistiller."""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor, nn

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import ofd_loss, ofd_margin
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.models.features import Outputs
from kdcli.models.pooling import adaptive_avg_pool2d


def _connector(c_in: int, c_out: int) -> nn.Sequential:
    """1x1 conv (He-normal, no bias) -> BN, mapping a student stage to the teacher's channels."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_out))
    bn = nn.BatchNorm2d(c_out)
    return nn.Sequential(conv, bn)


@register("ofd")
class OFD(Method):
    """Pre-ReLU student stages through 1x1 conv + BN connectors, compared with the teacher's pre-ReLU
    stages (pooled to the student's size) by the partial L2 with per-channel margins from the
    teacher BN's affine parameters; the last min(n_s, n_t) stages, deepest weight 1, then 1/2, 1/4.
    As both references, the teacher's BN normalises with batch statistics (its stored weights and
    running statistics are left untouched); `teacher_bn_eval=true` keeps it in eval mode instead.
    loss = beta * sum, beta 1e-3 (CIFAR), 1e-4 (ImageNet)."""

    title = "A Comprehensive Overhaul of Feature Distillation"
    paper = "Heo, Kim, Yun, Park, Kwak & Choi, ICCV 2019 (arXiv 1904.01866)"
    year = 2019
    needs = Needs(features=True, preact=True, teacher_bn=True, teacher_batch_stats=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 1e-3, "teacher_bn_eval": False}
    ranges: ClassVar[dict[str, str]] = {"beta": "nonnegative"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None,
                 teacher_bn: list[nn.BatchNorm2d] | None = None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        s_stages, t_stages = student.features[1:], teacher.features[1:]
        self.stages = min(len(s_stages), len(t_stages))
        if self.stages < 1:
            raise KdError("ofd needs stage feature maps, which the student or teacher does not expose",
                          "pick CIFAR-zoo architectures (kd list models)")
        if teacher_bn is None or len(teacher_bn) != len(t_stages):
            raise KdError("ofd needs the teacher's BatchNorm before each stage's ReLU",
                          "use a CIFAR ResNet, ResNet50, WRN or VGG teacher")
        s_stages, t_stages, bns = s_stages[-self.stages :], t_stages[-self.stages :], teacher_bn[-self.stages :]
        self.connectors = nn.ModuleList(_connector(s[0], t[0]) for s, t in zip(s_stages, t_stages))
        for i, bn in enumerate(bns):
            self.register_buffer(f"margin{i}", ofd_margin(bn).detach().clone().float().reshape(1, -1, 1, 1))
        if self.hp["teacher_bn_eval"]:
            self.needs = Needs(features=True, preact=True, teacher_bn=True, teacher_batch_stats=False)

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        total = s.logits.new_zeros(())
        s_maps, t_maps = s.features[-self.stages :], t.features[-self.stages :]
        for i, (f_s, f_t) in enumerate(zip(s_maps, t_maps)):
            f_s = self.connectors[i](f_s)
            if f_t.shape[2:] != f_s.shape[2:]:
                f_t = adaptive_avg_pool2d(f_t, tuple(f_s.shape[2:]))
            total = total + ofd_loss(f_s, f_t, getattr(self, f"margin{i}")) / 2 ** (self.stages - 1 - i)
        return {"ofd": self.hp["beta"] * total}
