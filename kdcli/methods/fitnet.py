"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015), one-stage as in the benchmarks."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import hint_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.methods.heads import ConvReg
from kdcli.models.features import Outputs


def feature_position(index: int, shapes: Shapes, network: str, option: str) -> int:
    """Position in `Outputs.features` of `index`: 0 the stem, k the k-th stage, negatives from the end."""
    count = len(shapes.features)
    if count < 2:
        raise KdError(
            f"the {network} exposes no stage feature maps, which this method needs",
            "pick a CIFAR-zoo architecture (kd list models)",
        )
    if not -count <= index < count:
        raise KdError(
            f"{option}={index} is out of range: the {network} has a stem (0) and {count - 1} stages",
            f"use 0..{count - 1} or -{count}..-1 (-1 = last stage), e.g. --set {option}=2",
        )
    return index % count


@register("fitnet")
class FitNet(Method):
    """Regress a student feature map ("guided layer") onto the teacher's ("hint") through a ConvReg.

    `hint` indexes `Outputs.features` in both networks (RepDistiller's `feat[hint]`: 0 the stem,
    k the k-th stage output, post-ReLU; default 2, the second stage). The ConvReg regressor
    (conv -> BN -> ReLU) maps the student map to the teacher's shape and is trained with the
    student; loss = beta * mean squared error over all elements. By default trained jointly in one
    stage from epoch 1 (CE + 100 * MSE), as RepDistiller and mdistiller whose numbers are the
    benchmark. The paper's two-stage form: `init_epochs=N` pre-trains the student's layers up to
    the guided one and the regressor on the hint loss alone for N epochs (own SGD, `init_lr`, 0 =
    the main lr), then the main stage drops the hint term and trains on `ce`/`kd` (the paper's
    KD stage: e.g. --set init_epochs=30,ce=0.1,kd=0.9).
    """

    title = "FitNets: Hints for Thin Deep Nets"
    paper = "Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015 (arXiv 1412.6550)"
    year = 2015
    needs = Needs(features=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 100.0, "hint": 2, "init_epochs": 0, "init_lr": 0.0}
    ranges: ClassVar[dict[str, str]] = {"beta": "nonnegative", "init_epochs": "nonnegative", "init_lr": "nonnegative"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams: Any):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        self.student_position = feature_position(self.hp["hint"], student, "student", "hint")
        self.teacher_position = feature_position(self.hp["hint"], teacher, "teacher", "hint")
        self.regressor = ConvReg(student.features[self.student_position], teacher.features[self.teacher_position])

    def _hint(self, s: Outputs, t: Outputs) -> Tensor:
        guided = self.regressor(s.features[self.student_position])
        return hint_loss(guided, t.features[self.teacher_position])

    def init_terms(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        return {"fitnet": self._hint(s, t)}

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        if self.init_epochs():
            return {}  # two-stage: the hints were learnt in the init stage
        return {"fitnet": self.hp["beta"] * self._hint(s, t)}
