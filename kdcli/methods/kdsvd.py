"""SVD-based self-supervised KD (Lee, Kim & Song, ECCV 2018)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdcli.batch import Batch
from kdcli.losses import kdsvd_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.methods.pairs import require_equal_channels, stage_count
from kdcli.models.features import Outputs


@register("kdsvd")
class KDSVD(Method):
    """RBF correlations of the top singular vectors of consecutive stage maps (features[1:]);
    the authors'/RepDistiller channel layout, so channel counts must agree per stage (mdistiller's
    width layout is not offered). loss = beta * kdsvd_loss, k = 1."""

    title = "Self-supervised Knowledge Distillation Using Singular Value Decomposition"
    paper = "Lee, Kim & Song, ECCV 2018 (arXiv 1807.06819)"
    year = 2018
    needs = Needs(features=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 1.0, "k": 1}
    ranges: ClassVar[dict[str, str]] = {"beta": "nonnegative", "k": "count"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        self.stages = stage_count(student, teacher, "kdsvd")
        require_equal_channels(student, teacher, range(1, self.stages + 1), "kdsvd")

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        last = self.stages + 1
        return {"kdsvd": self.hp["beta"] * kdsvd_loss(s.features[1:last], t.features[1:last], self.hp["k"])}
