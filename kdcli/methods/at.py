"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017)."""

from __future__ import annotations

from torch import Tensor

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import at_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.models.features import Outputs


@register("at")
class AttentionTransfer(Method):
    """Match the spatial attention maps (channel mean of F^p, L2-normalised) of every stage.

    Stage outputs `features[1:]` of student and teacher are paired in order (RepDistiller
    `zip(feat_s[1:-1], feat_t[1:-1])`: when the depths differ, the extra trailing stages of the
    deeper network are left out); the larger map of a pair is average-pooled to the smaller size.
    loss = beta * sum over stages of the mean squared difference of the maps, p = 2, beta = 1000.
    """

    title = "Paying More Attention to Attention"
    paper = "Zagoruyko & Komodakis, ICLR 2017 (arXiv 1612.03928)"
    year = 2017
    needs = Needs(features=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 1000.0, "p": 2.0}
    ranges = {"beta": "nonnegative", "p": "positive"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        self.stages = min(len(student.features), len(teacher.features)) - 1
        if self.stages < 1:
            raise KdError(
                "at needs stage feature maps, which the student or teacher does not expose",
                "pick CIFAR-zoo architectures (kd list models)",
            )

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        pairs = zip(s.features[1 : self.stages + 1], t.features[1 : self.stages + 1])
        return {"at": self.hp["beta"] * sum(at_loss(f_s, f_t, self.hp["p"]) for f_s, f_t in pairs)}
