"""Curriculum temperature for knowledge distillation (Li et al., AAAI 2023), global-temperature version."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdcli.errors import KdError
from kdcli.losses import kd_loss
from kdcli.methods.base import Method, Shapes, register
from kdcli.methods.kd import logit_std_options, logits_for_kd

# The reference initialises the raw parameter to 1: tau_0 = 1 + 20 * sigmoid(1), about 15.62.
_T_START, _T_RANGE, _THETA_INIT = 1.0, 20.0, 1.0


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by -strength."""

    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """Gradient reversal (Ganin & Lempitsky): `x` forward, gradient times -strength backward."""
    return _ReverseGradient.apply(x, strength)


def curriculum_lambda(epoch: int, epochs: int, low: float = 0.0, high: float = 1.0) -> float:
    """CTKD's cosine curriculum: low -> high over the first `epochs` (1-based) epochs, then high.

    lambda(e) = low + (high - low) * (1 - cos(pi * min(e, epochs) / epochs)) / 2, which is the
    reference's CosineDecay(max=0, min=-1, loops=10).get_value(e) negated for low=0, high=1.
    """
    if epochs <= 0:
        return high
    progress = min(max(epoch, 0), epochs) / epochs
    return low + (high - low) * (1.0 - math.cos(math.pi * progress)) / 2.0


class GlobalTemperature(nn.Module):
    """One learnable temperature tau = start + span * sigmoid(GRL(theta)), tau in (start, start + span)."""

    def __init__(self, start: float, span: float, theta: float):
        super().__init__()
        self.start, self.span = start, span
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    def forward(self, strength: float) -> Tensor:
        return self.start + self.span * torch.sigmoid(reverse_gradient(self.theta, strength))


@register("ctkd")
class CurriculumTemperatureKD(Method):
    """KD whose temperature is learned adversarially: the student descends the KD loss while the
    temperature ascends it through a gradient-reversal layer of strength lambda.

    tau = t_start + t_range * sigmoid(theta) is one scalar, optimised by the student's SGD (same lr,
    momentum and weight decay, as the reference); lambda follows a cosine curriculum from
    lambda_min to lambda_max over the first `lambda_epochs` epochs (0 -> 1 over 10 epochs). `T` is
    the initial temperature (default 1 + 20 * sigmoid(1), the reference's theta = 1). The CE/KD
    weights are the KD baseline's (0.1 / 0.9). `logit_std=true` (CTKD+LS, Sun et al.) Z-scores
    both logit vectors and makes kd default to 9; the temperature stays learned. The temperature
    and lambda of the epoch are reported as `temperature` and `ctkd_lambda` in metrics.jsonl.
    """

    title = "Curriculum Temperature for Knowledge Distillation"
    paper = "Li et al., AAAI 2023 (arXiv 2211.16231)"
    year = 2023
    defaults = {
        "ce": 0.1, "kd": 0.9, "T": _T_START + _T_RANGE / (1.0 + math.exp(-_THETA_INIT)),
        "t_start": _T_START, "t_range": _T_RANGE,
        "lambda_min": 0.0, "lambda_max": 1.0, "lambda_epochs": 10, "logit_std": False,
    }
    ranges = {
        "t_start": "positive", "t_range": "nonnegative", "lambda_min": "nonnegative", "lambda_max": "nonnegative",
        "lambda_epochs": "count",
    }

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams: Any):
        hparams = logit_std_options(hparams, weight="kd", temperature=None)
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        start, span, initial = self.hp["t_start"], self.hp["t_range"], self.hp["T"]
        if span <= 0 or not start < initial < start + span:
            raise KdError(
                f"ctkd needs t_start < T < t_start + t_range, got T={initial}, t_start={start}, t_range={span}",
                "leave T unset (initial temperature ~15.6 in (1, 21)) or pick T inside the range",
            )
        fraction = (initial - start) / span
        self.temperature = GlobalTemperature(start, span, math.log(fraction / (1.0 - fraction)))
        self.strength = self.current_lambda()

    def current_lambda(self) -> float:
        return curriculum_lambda(self.epoch, self.hp["lambda_epochs"], self.hp["lambda_min"], self.hp["lambda_max"])

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self.strength = self.current_lambda()

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        student, teacher = logits_for_kd(student_logits, teacher_logits, self.hp["logit_std"])
        return kd_loss(student, teacher, self.temperature(self.strength))

    def epoch_metrics(self) -> dict[str, float]:
        with torch.no_grad():
            tau = self.temperature(0.0).item()
        return {"temperature": tau, "ctkd_lambda": self.strength}
