"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018)."""

from __future__ import annotations

from torch import Tensor

from kdcli.batch import Batch
from kdcli.losses import pkt_loss
from kdcli.methods.base import Method, Needs, register
from kdcli.models.features import Outputs


@register("pkt")
class ProbabilisticKT(Method):
    """Match the cosine-kernel neighbour distributions of the batch in the pooled embedding space.

    loss = beta * KL between the row-normalised (cos + 1) / 2 kernels of teacher and student
    penultimate vectors, averaged over all B^2 entries (hence beta = 30000); widths may differ.
    """

    title = "Learning Deep Representations with Probabilistic Knowledge Transfer"
    paper = "Passalis & Tefas, ECCV 2018 (arXiv 1803.10837)"
    year = 2018
    needs = Needs(embedding=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 30000.0}
    ranges = {"beta": "nonnegative"}

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        return {"pkt": self.hp["beta"] * pkt_loss(s.embedding, t.embedding)}
