"""Similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019)."""

from __future__ import annotations

from torch import Tensor

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import sp_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.models.features import Outputs


def stage_positions(stages: list[int], shapes: Shapes, network: str) -> list[int]:
    """Positions in `Outputs.features` of the 1-based stage numbers in `stages` (-1 = last stage).

    Stage k is `features[k]` (RepDistiller's `feat[k]`; `features[0]` is the stem, not a stage);
    negative numbers count from the end, so -1 is the last-stage map `features[-1]`.
    """
    count = len(shapes.features) - 1
    if count < 1:
        raise KdError(
            f"the {network} exposes no stage feature maps, which sp needs",
            "pick a CIFAR-zoo architecture (kd list models) for this method",
        )
    positions = []
    for stage in stages:
        if not (1 <= stage <= count or -count <= stage <= -1):
            raise KdError(
                f"sp stage {stage} is out of range: the {network} has {count} stages",
                f"use 1..{count} or -{count}..-1 (-1 = last stage), e.g. --set stages=-1",
            )
        positions.append(stage if stage > 0 else count + 1 + stage)
    return positions


@register("sp")
class SimilarityPreserving(Method):
    """Match the student's B x B activation-similarity matrices to the teacher's.

    For each chosen stage pair, `sp_loss` compares the row-normalised Gram matrices of the
    flattened (post-ReLU, pre-pool) maps; several stages add up. `stages` are 1-based stage
    numbers into the stage outputs `features[1:]` (stage k = `features[k]`), negative numbers
    counting from the end; each number is resolved in the student and in the teacher separately,
    so the default `[-1]` pairs the two last-stage maps whatever their depths (the benchmark
    setting, RepDistiller `feat[-2]`), and `stages=1,2,3` pairs stages 1, 2 and 3 of each network.
    Channel and spatial sizes may differ. The loss is computed on each process's local batch
    (as RepDistiller/mdistiller do under DDP); it depends on the batch size (benchmark B = 64).
    SP+KD as in CTKD/ITKD: --set ce=0.1 kd=0.9.
    """

    title = "Similarity-Preserving Knowledge Distillation"
    paper = "Tung & Mori, ICCV 2019 (arXiv 1907.09682)"
    year = 2019
    needs = Needs(features=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 3000.0, "stages": [-1]}
    ranges = {"beta": "nonnegative"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        stages = self.hp["stages"]
        stages = [stages] if isinstance(stages, int) else list(stages)  # a config file may give one int
        if not stages:
            raise KdError("sp needs at least one stage", "e.g. --set stages=-1 (last stage) or stages=1,2,3")
        self.student_positions = stage_positions(stages, student, "student")
        self.teacher_positions = stage_positions(stages, teacher, "teacher")
        if len(set(self.student_positions)) < len(stages) or len(set(self.teacher_positions)) < len(stages):
            raise KdError(
                f"sp stages {stages} name the same stage twice",
                "list each stage once, e.g. --set stages=1,2,3",
            )

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        loss = sum(
            sp_loss(s.features[i], t.features[j].detach())
            for i, j in zip(self.student_positions, self.teacher_positions)
        )
        return {"sp": self.hp["beta"] * loss}
