"""Learning-rate schedules as pure functions of the epoch, so resume needs no scheduler state."""

from __future__ import annotations

from bisect import bisect_left


def multistep_lr(base_lr: float, epoch: int, milestones: list[int], decay: float) -> float:
    """RepDistiller's rule: lr0 * decay^(number of milestones < epoch), for a 1-based epoch.

    With milestones 150/180/210: epochs 1-150 at lr0, 151-180 at lr0/10, and so on.
    """
    return base_lr * decay ** bisect_left(sorted(milestones), epoch)
