"""Plain training, Hinton's knowledge distillation, and the logit-standardisation option of the KD family."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdcli.losses import standardize_logits
from kdcli.methods.base import Method, Needs, Shapes, coerce, register

# Logit standardisation (Sun et al., CVPR 2024): the released defaults `--base-temp 2 --kd-weight 9`.
LOGIT_STD_TEMPERATURE = 2.0
LOGIT_STD_WEIGHT = 9.0


def logit_std_options(options: dict[str, Any], weight: str = "kd", temperature: str | None = "T") -> dict[str, Any]:
    """`options` (the user's --set values) with the logit-standardisation defaults filled in.

    When `options["logit_std"]` is on, the option named `weight` defaults to 9 (the KD weight) and
    the one named `temperature` to 2 (the base temperature; None for a learned temperature), unless
    the user set them; values the user gave always win. Off (or absent): `options` unchanged, so
    the classic defaults apply. For methods that take `logit_std` (kd, dkd, ctkd; mlld may reuse it).
    """
    if not coerce("logit_std", options.get("logit_std", False), False):
        return dict(options)
    filled: dict[str, Any] = {weight: LOGIT_STD_WEIGHT}
    if temperature is not None:
        filled[temperature] = LOGIT_STD_TEMPERATURE
    return {**filled, **options}


def logits_for_kd(student_logits: Tensor, teacher_logits: Tensor, logit_std: bool) -> tuple[Tensor, Tensor]:
    """The logit pair a KD-family loss compares: each Z-scored per sample (over classes) when
    `logit_std` is on, unchanged otherwise. Cross-entropy always keeps the raw student logits."""
    if not logit_std:
        return student_logits, teacher_logits
    return standardize_logits(student_logits), standardize_logits(teacher_logits)


class LogitStdKD:
    """Mixin for a Method with a `logit_std` hyperparameter: its `kd` term uses `logits_for_kd`."""

    hp: dict[str, Any]

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        pair = logits_for_kd(student_logits, teacher_logits, self.hp["logit_std"])
        return super().kd_term(*pair)  # type: ignore[misc]


@register("none")
class NoDistillation(Method):
    """Cross-entropy only: the student trained alone, the baseline every method is compared to."""

    title = "Plain cross-entropy (no distillation)"
    paper = "baseline"
    needs = Needs(teacher=False)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0}


@register("kd")
class KnowledgeDistillation(LogitStdKD, Method):
    """Hinton et al.: match the teacher's temperature-softened class distribution.

    `--set logit_std=true` (Sun et al., CVPR 2024) Z-scores the student and teacher logits per
    sample before the softmax at base temperature T; with it, T defaults to 2 and kd to 9 (the
    paper's CIFAR-100 setting; ce stays 0.1) unless set explicitly. The classic T=4, ce 0.1,
    kd 0.9 baseline stays the default.
    """

    title = "Distilling the Knowledge in a Neural Network"
    paper = "Hinton, Vinyals & Dean, NIPS-W 2014 (arXiv 1503.02531)"
    year = 2014
    defaults = {"ce": 0.1, "kd": 0.9, "T": 4.0, "logit_std": False}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams: Any):
        hparams = logit_std_options(hparams)
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
