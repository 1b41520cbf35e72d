"""Relational knowledge distillation (Park et al., CVPR 2019)."""

from __future__ import annotations

from torch import Tensor

from kdcli.batch import Batch
from kdcli.losses import rkd_loss
from kdcli.methods.base import Method, Needs, register
from kdcli.models.features import Outputs


@register("rkd")
class RelationalKD(Method):
    """Match the batch's distance and angle structure in the pooled embedding space.

    loss = beta * (w_dist * distance term + w_angle * angle term), smooth-L1 on mean-normalised
    pairwise distances and on the B^3 triplet angle cosines of the penultimate pooled vectors
    (RepDistiller `feat[-1]`); embedding widths may differ. CIFAR-100: beta 1, w_dist 25, w_angle 50.
    """

    title = "Relational Knowledge Distillation"
    paper = "Park, Kim, Lu & Cho, CVPR 2019 (arXiv 1904.05068)"
    year = 2019
    needs = Needs(embedding=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 1.0, "w_dist": 25.0, "w_angle": 50.0}
    ranges = {"beta": "nonnegative", "w_dist": "nonnegative", "w_angle": "nonnegative"}

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        loss = rkd_loss(s.embedding, t.embedding, self.hp["w_dist"], self.hp["w_angle"])
        return {"rkd": self.hp["beta"] * loss}
