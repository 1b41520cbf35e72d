"""Activation boundaries (Heo et al., AAAI 2019), RepDistiller's two-stage form."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from kdcli.batch import Batch
from kdcli.losses import ab_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.methods.heads import ConvReg
from kdcli.methods.pairs import stage_count
from kdcli.models.features import Outputs


def _connector(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module:
    """Identity for equal (C, H) shapes, else RepDistiller's ConvReg without the ReLU."""
    if student[:2] == teacher[:2]:
        return nn.Identity()
    return ConvReg(student, teacher, relu=False)


@register("ab")
class ActivationBoundaries(Method):
    """Init stage (`init_epochs`, 30): the student's feature layers and per-stage connectors learn
    the teacher's activation boundaries (sign pattern of the pre-ReLU stage outputs, margin 1) with
    layer weights 2^(l - n); then the main stage trains the student with CE alone (the AB term is
    zero there, as in RepDistiller, so beta has no effect). The connectors exist for the init stage
    only: they are not in the main optimizer."""

    title = "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"
    paper = "Heo, Lee, Yun & Choi, AAAI 2019 (arXiv 1811.03233)"
    year = 2019
    needs = Needs(features=True, preact=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 1.0, "margin": 1.0, "init_epochs": 30, "init_lr": 0.0}
    ranges: ClassVar[dict[str, str]] = {
        "beta": "nonnegative", "margin": "positive", "init_epochs": "nonnegative", "init_lr": "nonnegative",
    }

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        self.stages = stage_count(student, teacher, "ab")
        pairs = zip(student.features[1 : self.stages + 1], teacher.features[1 : self.stages + 1])
        self.connectors = nn.ModuleList(_connector(s, t) for s, t in pairs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []  # the connectors train in the init stage only

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return super().init_parameters(student) + list(self.connectors.parameters())

    def init_terms(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        n = self.stages
        total = s.logits.new_zeros(())
        for i in range(n):
            weight = 2.0 ** (i + 1 - n)
            total = total + weight * ab_loss(self.connectors[i](s.features[i + 1]), t.features[i + 1], self.hp["margin"])
        return {"ab": total}
