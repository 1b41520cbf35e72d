"""Variational information distillation (Ahn et al., CVPR 2019), RepDistiller's author code."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from kdcli.batch import Batch
from kdcli.losses import _pool_to_smaller, vid_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.methods.pairs import stage_count
from kdcli.models.features import Outputs


def _regressor(c_in: int, c_out: int) -> nn.Sequential:
    """Three bias-free 1x1 convs of width C_t with ReLUs between (RepDistiller VIDLoss)."""
    conv = lambda a, b: nn.Conv2d(a, b, kernel_size=1, bias=False)  # noqa: E731
    return nn.Sequential(conv(c_in, c_out), nn.ReLU(), conv(c_out, c_out), nn.ReLU(), conv(c_out, c_out))


@register("vid")
class VID(Method):
    """Per stage, the student map predicts the mean of a Gaussian over the teacher map (one learned
    variance per teacher channel, initialised to `init_var`); loss = beta * the summed negative
    log-likelihoods. `learn_variance=false` freezes the variance as mdistiller does."""

    title = "Variational Information Distillation for Knowledge Transfer"
    paper = "Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019 (arXiv 1904.05835)"
    year = 2019
    needs = Needs(features=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 1.0, "init_var": 5.0, "eps": 1e-5, "learn_variance": True}
    ranges: ClassVar[dict[str, str]] = {"beta": "nonnegative", "init_var": "positive", "eps": "positive"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        self.stages = stage_count(student, teacher, "vid")
        pairs = list(zip(student.features[1 : self.stages + 1], teacher.features[1 : self.stages + 1]))
        self.regressors = nn.ModuleList(_regressor(s[0], t[0]) for s, t in pairs)
        init = math.log(math.exp(self.hp["init_var"] - self.hp["eps"]) - 1.0)  # softplus^-1(var - eps)
        self.log_scales = nn.ParameterList(
            nn.Parameter(torch.full((t[0],), init), requires_grad=bool(self.hp["learn_variance"])) for _, t in pairs
        )

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        total = s.logits.new_zeros(())
        for i in range(self.stages):
            f_s, f_t = _pool_to_smaller(s.features[i + 1], t.features[i + 1])
            total = total + vid_loss(self.regressors[i](f_s), f_t, self.log_scales[i], self.hp["eps"])
        return {"vid": self.hp["beta"] * total}
