"""The epochs of a run: an optional initialisation stage, then the main (distillation) epochs.

RepDistiller's `--init_epochs` (AB, FT, FSP; FitNet's hint pre-training): before the main epochs,
`method.init_epochs()` epochs minimise the method's `init_terms` with their own SGD over
`method.init_parameters(student)` at a constant lr. The whole run counts its epochs globally
(1 .. init + main): checkpoints, resume and metrics.jsonl use that count; every metrics line of
a staged run carries `stage` ("init" / "main") and `stage_epoch`. The lr schedule, the method's
`on_epoch_start` and the best-epoch tracking see the main epochs only (1-based within the stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdcli.engine.schedule import multistep_lr
from kdcli.methods.base import Method


class AveragedSGD(torch.optim.SGD):
    """SGD whose step first averages the gradients over the processes of a DDP run.

    The init stage trains a subset of the parameters (no classifier, or no student at all), which
    DDP's gradient hooks cannot handle without `find_unused_parameters`; so its backward runs
    outside DDP's sync (`require_backward_grad_sync` off) and the gradients are averaged here.
    """

    @torch.no_grad()
    def step(self, closure=None):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            size = dist.get_world_size()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(size)
        return super().step(closure)


@dataclass(frozen=True)
class Stage:
    name: str  # "init" or "main"
    epoch: int  # 1-based within the stage


class Stages:
    def __init__(self, method: Method, student: nn.Module, schedule, main_optimizer: torch.optim.Optimizer,
                 wrapped: tuple[nn.Module, ...] = ()):
        """`wrapped`: the DDP wrappers of the student and the method (when running under torchrun)."""
        self.method = method
        self.ddp = [m for m in wrapped if isinstance(m, nn.parallel.DistributedDataParallel)]
        self.schedule = schedule
        self.main_optimizer = main_optimizer
        self.init_epochs = method.init_epochs()
        self.init_optimizer: torch.optim.Optimizer | None = None
        self.current = Stage("main", 1)
        if self.init_epochs:
            self.init_lr = method.init_lr(schedule.lr)
            self.init_optimizer = AveragedSGD(
                method.init_parameters(student), lr=self.init_lr,
                momentum=schedule.momentum, weight_decay=schedule.weight_decay,
            )

    @property
    def total(self) -> int:
        return self.init_epochs + self.schedule.epochs

    def at(self, epoch: int) -> Stage:
        if epoch <= self.init_epochs:
            return Stage("init", epoch)
        return Stage("main", epoch - self.init_epochs)

    def begin(self, epoch: int) -> tuple[Stage, float, torch.optim.Optimizer]:
        """Enter global `epoch`: (its stage, its lr, the optimizer that steps in it)."""
        stage = self.current = self.at(epoch)
        self.method.stage = stage.name
        if stage.name == "init":
            lr, optimizer = self.init_lr, self.init_optimizer
        else:
            s = self.schedule
            lr, optimizer = multistep_lr(s.lr, stage.epoch, s.milestones, s.lr_decay), self.main_optimizer
            self.method.on_epoch_start(stage.epoch, s.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for module in self.ddp:
            module.require_backward_grad_sync = stage.name == "main"
        return stage, lr, optimizer

    def image_edits(self, stage: Stage):
        """The method's temporary training-image edits for this epoch (main stage only), or None."""
        return self.method.image_edits(stage.epoch) if stage.name == "main" else None

    @property
    def student_trains(self) -> bool:
        """Train mode for the student this epoch (off in an init stage that leaves it untouched, FT)."""
        return self.current.name == "main" or self.method.init_trains_student()

    def marks(self, stage: Stage) -> dict[str, Any]:
        """The metrics.jsonl fields naming the stage (none for runs without an init stage)."""
        return {"stage": stage.name, "stage_epoch": stage.epoch} if self.init_epochs else {}

    def state(self) -> dict[str, Any]:
        return {"init_optimizer": self.init_optimizer.state_dict()} if self.init_optimizer is not None else {}

    def load(self, state: dict[str, Any]) -> None:
        if self.init_optimizer is not None and "init_optimizer" in state:
            self.init_optimizer.load_state_dict(state["init_optimizer"])
