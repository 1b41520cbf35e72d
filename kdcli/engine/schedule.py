"""Learning-rate schedules as pure functions of the optimizer step, so resume needs no scheduler state.

Steps are optimizer steps (with `--accumulate N`, one per N batches), counted from 0 over the whole
run. The linear warm-up is per step: step k < W runs at lr0 * (k + 1) / W, so the first step is not
at zero and step W - 1 reaches lr0. After it:

- multistep: RepDistiller's rule per epoch, lr0 * decay^(number of milestones < epoch);
- step:      lr0 * decay^((epoch - 1) // step_size), per epoch (torchvision's StepLR);
- cosine:    per step, min_lr + (lr0 - min_lr) * (1 + cos(pi * (k - W) / (K - W))) / 2 for K steps in all;
- constant:  lr0.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field


def multistep_lr(base_lr: float, epoch: int, milestones: list[int], decay: float) -> float:
    """RepDistiller's rule: lr0 * decay^(number of milestones < epoch), for a 1-based epoch.

    With milestones 150/180/210: epochs 1-150 at lr0, 151-180 at lr0/10, and so on.
    """
    return base_lr * decay ** bisect_left(sorted(milestones), epoch)


@dataclass(frozen=True)
class LrSchedule:
    """The lr of every optimizer step of a run (a slice of RunConfig plus the steps per epoch)."""

    name: str
    lr: float
    epochs: int
    steps_per_epoch: int
    milestones: list[int] = field(default_factory=list)
    decay: float = 0.1
    step_size: int = 30
    warmup_epochs: float = 0.0
    min_lr: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return min(round(self.warmup_epochs * self.steps_per_epoch), self.total_steps)

    def step_of(self, epoch: int, step_in_epoch: int) -> int:
        """The run-wide 0-based optimizer step of the 0-based `step_in_epoch` of 1-based `epoch`."""
        return (epoch - 1) * self.steps_per_epoch + step_in_epoch

    def at(self, step: int) -> float:
        """The lr of 0-based optimizer step `step`."""
        warm = self.warmup_steps
        if step < warm:
            return self.lr * (step + 1) / warm
        epoch = step // self.steps_per_epoch + 1
        if self.name == "multistep":
            return multistep_lr(self.lr, epoch, self.milestones, self.decay)
        if self.name == "step":
            return self.lr * self.decay ** ((epoch - 1) // self.step_size)
        if self.name == "cosine":
            progress = (step - warm) / max(self.total_steps - warm, 1)
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.name == "constant":
            return self.lr
        raise ValueError(f"unknown schedule {self.name!r}")  # RunConfig.validate rejects it first

    def epoch_lr(self, epoch: int) -> float:
        """The lr of the first step of `epoch` (what an epoch's metrics line reports)."""
        return self.at(self.step_of(epoch, 0))
