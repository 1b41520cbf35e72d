"""Flow of solution procedure (Yim et al., CVPR 2017), RepDistiller's two-stage form."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdcli.batch import Batch
from kdcli.losses import fsp_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.methods.pairs import require_equal_channels
from kdcli.errors import KdError
from kdcli.models.features import Outputs


@register("fsp")
class FSP(Method):
    """Init stage (`init_epochs`, 30): the student's feature layers learn the teacher's FSP matrices
    of consecutive maps (stem included); then the main stage trains with CE alone (RepDistiller: the
    FSP term is zero there, so beta has no effect). Student and teacher need the same number of
    maps with the same channel counts at every position."""

    title = "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer Learning"
    paper = "Yim, Joo, Bae & Kim, CVPR 2017"
    year = 2017
    needs = Needs(features=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 50.0, "init_epochs": 30, "init_lr": 0.0}
    ranges: ClassVar[dict[str, str]] = {"beta": "nonnegative", "init_epochs": "nonnegative", "init_lr": "nonnegative"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        if len(student.features) != len(teacher.features) or len(student.features) < 2:
            raise KdError(
                f"fsp needs the same number of feature maps in student and teacher "
                f"({len(student.features)} vs {len(teacher.features)})",
                "pick a student/teacher pair of the same family (e.g. resnet56 -> resnet20)",
            )
        require_equal_channels(student, teacher, range(len(student.features)), "fsp")

    def init_terms(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        return {"fsp": fsp_loss(s.features, t.features)}
