"""Neuron selectivity transfer (Huang & Wang, 2017), as RepDistiller and mdistiller."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdcli.batch import Batch
from kdcli.losses import nst_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.methods.pairs import stage_count
from kdcli.models.features import Outputs


@register("nst")
class NST(Method):
    """MMD^2 with the degree-2 polynomial kernel between the channel-map sets of every stage pair
    (features[1:], zipped from the shallow end); loss = beta * the sum over stages."""

    title = "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
    paper = "Huang & Wang, arXiv 1707.01219 (2017)"
    year = 2017
    needs = Needs(features=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 50.0}
    ranges: ClassVar[dict[str, str]] = {"beta": "nonnegative"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        self.stages = stage_count(student, teacher, "nst")

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        pairs = zip(s.features[1 : self.stages + 1], t.features[1 : self.stages + 1])
        return {"nst": self.hp["beta"] * sum(nst_loss(f_s, f_t) for f_s, f_t in pairs)}
