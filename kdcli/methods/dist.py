"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdcli.batch import Batch
from kdcli.losses import dist_loss
from kdcli.methods.base import Method, Needs, register
from kdcli.models.features import Outputs


@register("dist")
class DIST(Method):
    """Inter- and intra-class Pearson relations of the softened predictions at temperature `tau`:
    loss = beta * tau^2 * (inter_weight * inter + intra_weight * intra); CIFAR defaults of
    `dist_cifar.yaml` (CE 1, DIST 2, tau 4; ImageNet uses tau 1). The intra-class term uses each
    process's local batch under DDP, as the reference."""

    title = "Knowledge Distillation from A Stronger Teacher"
    paper = "Huang, You, Wang, Qian & Xu, NeurIPS 2022 (arXiv 2205.10536)"
    year = 2022
    needs = Needs()
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 2.0, "tau": 4.0, "inter_weight": 1.0, "intra_weight": 1.0}
    ranges: ClassVar[dict[str, str]] = {
        "beta": "nonnegative", "tau": "positive", "inter_weight": "nonnegative", "intra_weight": "nonnegative",
    }

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        loss = dist_loss(s.logits, t.logits, self.hp["inter_weight"], self.hp["intra_weight"], self.hp["tau"])
        return {"dist": self.hp["beta"] * loss}
