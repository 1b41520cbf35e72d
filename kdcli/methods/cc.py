"""Correlation congruence (Peng et al., ICCV 2019), the authors' compact form used by RepDistiller."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from kdcli.batch import Batch
from kdcli.losses import cc_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.models.features import Outputs


@register("cc")
class CorrelationCongruence(Method):
    """Both pooled embeddings go through a linear head to `dim` (RepDistiller's LinearEmbed: no L2
    normalisation; the teacher-side head is trained too); loss = beta * cc_loss of the head outputs,
    which correlates the T-S discrepancies of neighbouring samples in the batch."""

    title = "Correlation Congruence for Knowledge Distillation"
    paper = "Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, ICCV 2019 (arXiv 1904.01802)"
    year = 2019
    needs = Needs(embedding=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 0.02, "dim": 128}
    ranges: ClassVar[dict[str, str]] = {"beta": "nonnegative", "dim": "count"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        self.embed_s = nn.Linear(student.embedding, self.hp["dim"])
        self.embed_t = nn.Linear(teacher.embedding, self.hp["dim"])

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        return {"cc": self.hp["beta"] * cc_loss(self.embed_s(s.embedding), self.embed_t(t.embedding))}
