"""Trainable heads that methods put between a network's outputs and their losses.

Built from `Shapes` (one sample's (C, H, W) or an embedding width), owned by the method, and thereby
optimised by the student's SGD together with the student.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.errors import KdError


def _regressor_conv(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module:
    """The convolution taking a [C_s, H_s, W_s] map to [C_t, H_t, W_t], chosen by the spatial sizes."""
    (c_s, h_s, w_s), (c_t, h_t, w_t) = student, teacher
    if (h_s, w_s) == (2 * h_t, 2 * w_t):
        return nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    if (2 * h_s, 2 * w_s) == (h_t, w_t):
        return nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    if h_s >= h_t and w_s >= w_t:
        # a "valid" convolution whose kernel eats the size difference (1x1 when the sizes agree)
        return nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    raise KdError(
        f"cannot regress a {h_s}x{w_s} student map onto a {h_t}x{w_t} teacher map",
        "the regressor handles a student map twice, half, or at least the teacher's size; "
        "pick another stage (e.g. --set hint=N) or another student/teacher pair",
    )


class ConvReg(nn.Module):
    """FitNet's convolutional regressor (RepDistiller's `ConvReg`): conv -> BatchNorm -> ReLU.

    Maps a student feature map of one sample shape (C_s, H_s, W_s) to the teacher's (C_t, H_t, W_t):
    a 3x3 stride-2 conv when the student map is twice the teacher's size, a 4x4 stride-2 transposed
    conv when it is half, otherwise a valid conv with kernel (1 + H_s - H_t, 1 + W_s - W_t). The
    ReLU matches the post-ReLU teacher maps; `relu=False` leaves it out (connector variants).
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], relu: bool = True):
        super().__init__()
        if len(student_shape) != 3 or len(teacher_shape) != 3:
            raise KdError(
                f"a convolutional regressor needs (C, H, W) feature maps, got student {tuple(student_shape)} "
                f"and teacher {tuple(teacher_shape)}",
                "pick a stage that is a feature map, not a vector",
            )
        self.conv = _regressor_conv(tuple(student_shape), tuple(teacher_shape))
        self.bn = nn.BatchNorm2d(teacher_shape[0])
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Embed(nn.Module):
    """A linear projection to `dim_out` followed by L2 normalisation (RepDistiller's `Embed`, CRD's heads).

    Inputs of any shape [B, ...] are flattened per sample first.
    """

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), p=2, dim=1)
