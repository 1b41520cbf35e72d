"""Factor transfer (Kim, Park & Kwak, NeurIPS 2018), RepDistiller's two-stage form."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import ft_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.models.features import Outputs


def _conv_stack(widths: list[int], transpose: bool = False, bn: bool = False) -> nn.Sequential:
    """3x3 stride-1 (transposed) convs with bias, each followed by [BN and] LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    for c_in, c_out in zip(widths, widths[1:]):
        layers.append(conv(c_in, c_out, kernel_size=3, stride=1, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The teacher-side auto-encoder of the last-stage map (no BN): encoder output = teacher factor."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor, factor])
        self.decoder = _conv_stack([factor, factor, channels, channels], transpose=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


@register("ft")
class FactorTransfer(Method):
    """Init stage (`init_epochs`, 30): the paraphraser learns to reconstruct the teacher's last-stage
    map (MSE; its own SGD at `init_lr`, 0.01 as RepDistiller for ResNet/WRN students — use 0.05
    for vgg8); the student is left untouched. Main stage: the frozen paraphraser's encoder gives the
    teacher factor, a translator (3 conv-BN-LeakyReLU, trained with the student) the student factor;
    loss = beta * ft_loss(p1 2, p2 1), beta 200, factor width int(rate * C_t)."""

    title = "Paraphrasing Complex Network: Network Compression via Factor Transfer"
    paper = "Kim, Park & Kwak, NeurIPS 2018 (arXiv 1802.04977)"
    year = 2018
    needs = Needs(features=True)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 200.0, "rate": 0.5, "p1": 2.0, "p2": 1.0,
                "init_epochs": 30, "init_lr": 0.01}
    ranges: ClassVar[dict[str, str]] = {
        "beta": "nonnegative", "rate": "fraction", "p1": "positive", "p2": "positive",
        "init_epochs": "nonnegative", "init_lr": "nonnegative",
    }

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        if len(student.features) < 2 or len(teacher.features) < 2:
            raise KdError("ft needs the last-stage feature map, which the student or teacher does not expose",
                          "pick CIFAR-zoo architectures (kd list models)")
        c_s, c_t = student.features[-1][0], teacher.features[-1][0]
        factor = int(c_t * self.hp["rate"])
        if factor < 1:
            raise KdError(f"ft rate={self.hp['rate']} leaves no factor channels of the teacher's {c_t}",
                          "use a larger rate, e.g. --set rate=0.5")
        self.paraphraser = Paraphraser(c_t, factor)
        self.translator = _conv_stack([c_s, c_s, factor, factor], bn=True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.translator.parameters())  # the paraphraser is frozen after its init stage

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.paraphraser.parameters())

    def init_trains_student(self) -> bool:
        return False

    def init_terms(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        target = t.features[-1]
        return {"paraphraser": F.mse_loss(self.paraphraser(target), target)}

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(t.features[-1])
        factor_s = self.translator(s.features[-1])
        return {"ft": self.hp["beta"] * ft_loss(factor_s, factor_t, self.hp["p1"], self.hp["p2"])}
