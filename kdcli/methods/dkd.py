"""Decoupled knowledge distillation (Zhao et al., CVPR 2022)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import dkd_loss
from kdcli.methods.base import Method, Shapes, register
from kdcli.methods.kd import LogitStdKD, logit_std_options, logits_for_kd
from kdcli.models.features import Outputs


def warmup_factor(epoch: int, warmup: int) -> float:
    """mdistiller's linear ramp min(epoch / warmup, 1) for the 1-based epoch; 1 when warmup is 0."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)


@register("dkd")
class DecoupledKD(LogitStdKD, Method):
    """Split KD into target-vs-rest (TCKD, weight alpha) and among-non-target (NCKD, weight beta) parts.

    L = ce * CE + min(epoch / warmup, 1) * dkd * (alpha * TCKD + beta * NCKD) at temperature T,
    as mdistiller (no vanilla KD term; `kd` adds one if asked). The warm-up counts epochs, not
    steps: a run shorter than `warmup` epochs never reaches the full DKD weight (a 1-epoch run
    uses 1/20 of it) - pass --set warmup=N (0 = no ramp) for short runs. Per-pair beta of the paper:
    2 for resnet56/110 -> resnet20/32, 6 for wrn40_2 pairs and vgg13 -> vgg8/MobileNetV2,
    8 otherwise (presets cifar100-dkd-*). `logit_std=true` (Sun et al.) Z-scores both logit vectors;
    T then defaults to 2 and the overall DKD weight `dkd` to 9, so alpha and beta are both scaled
    by 9 as in the paper (the released script's `BETA = ALPHA * 9` slip, which also leaves T at 4,
    is not copied).
    """

    title = "Decoupled Knowledge Distillation"
    paper = "Zhao, Cui, Song, Qiu & Liang, CVPR 2022 (arXiv 2203.08679)"
    year = 2022
    defaults = {
        "ce": 1.0, "kd": 0.0, "T": 4.0,
        "dkd": 1.0, "alpha": 1.0, "beta": 8.0, "warmup": 20, "logit_std": False,
    }
    ranges = {"dkd": "nonnegative", "alpha": "nonnegative", "beta": "nonnegative", "warmup": "nonnegative"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams: Any):
        hparams = logit_std_options(hparams, weight="dkd")
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        if self.hp["warmup"] < 0:
            raise KdError(f"dkd warmup={self.hp['warmup']} is negative", "use a number of epochs >= 0 (0 = no warm-up)")

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        student, teacher = logits_for_kd(s.logits, t.logits, self.hp["logit_std"])
        loss = dkd_loss(student, teacher, batch.y, self.hp["alpha"], self.hp["beta"], self.hp["T"])
        return {"dkd": warmup_factor(self.epoch, self.hp["warmup"]) * self.hp["dkd"] * loss}
