"""Pairing of stage feature maps shared by the feature methods (vid, nst, kdsvd, ofd, ab)."""

from __future__ import annotations

from kdcli.errors import KdError
from kdcli.methods.base import Shapes


def stage_count(student: Shapes, teacher: Shapes, method: str) -> int:
    """How many stage outputs (`features[1:]`) the two networks share, zipped from the shallow end."""
    count = min(len(student.features), len(teacher.features)) - 1
    if count < 1:
        raise KdError(
            f"{method} needs stage feature maps, which the student or teacher does not expose",
            "pick CIFAR-zoo architectures (kd list models)",
        )
    return count


def require_equal_channels(student: Shapes, teacher: Shapes, positions: range, method: str) -> None:
    """Refuse pairs whose channel counts differ at a position the method compares directly."""
    for i in positions:
        c_s, c_t = student.features[i][0], teacher.features[i][0]
        if c_s != c_t:
            raise KdError(
                f"{method} needs equal channel counts in student and teacher, but feature {i} has {c_s} vs {c_t}",
                "pick a student/teacher pair of the same family and width (e.g. resnet56 -> resnet20)",
            )
