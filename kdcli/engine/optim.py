"""Optimizers by name, their parameter groups, and the gradient step (accumulation, clipping, lr).

One factory keyed by name (`@register_optimizer("sgd")`) builds the optimizer over the student AND
the method's trainable parameters, so a method's heads follow the same optimizer and schedule. A new
optimizer registers itself here and is at once a valid `--optimizer`.

Weight decay: SGD and DOT decay every parameter (the CIFAR protocol of RepDistiller, reproduced exactly);
AdamW, as timm's `param_groups_weight_decay`, decays only weights of 2 or more dimensions (no norm
scales, no biases) and skips what a timm model lists in `no_weight_decay()` (ViT's pos_embed, cls_token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdcli.engine.schedule import LrSchedule


@dataclass(frozen=True)
class OptimizerSettings:
    """What the optimizer factories read (a slice of RunConfig)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9  # SGD and DOT; AdamW uses `betas`, not this
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (timm's and PyTorch's default)
    eps: float = 1e-8
    dot_delta: float = 0.075  # DOT's momentum gap


Factory = Callable[[list[dict], OptimizerSettings, torch.device], torch.optim.Optimizer]
_OPTIMIZERS: dict[str, Factory] = {}


def register_optimizer(name: str):
    """Function decorator: make `factory(groups, settings, device)` available as `--optimizer NAME`."""

    def wrap(factory: Factory) -> Factory:
        _OPTIMIZERS[name] = factory
        return factory

    return wrap


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def build_optimizer(
    settings: OptimizerSettings, student: nn.Module, extra: Iterable[nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer `settings.name` over the student's and the `extra` (method) parameters."""
    params = [p for p in student.parameters() if p.requires_grad]
    skip = _no_decay_names(student)
    if settings.name == "adamw":  # decoupled weight decay: timm's grouping (see the module docstring)
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        params = [p for n, p in named if p.ndim > 1 and n not in skip]
        plain = [p for n, p in named if p.ndim <= 1 or n in skip]
        extra = list(extra)
        groups = [
            {"params": params + [p for p in extra if p.ndim > 1], "weight_decay": settings.weight_decay},
            {"params": plain + [p for p in extra if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params + list(extra), "weight_decay": settings.weight_decay}]
    groups = [g for g in groups if g["params"]]
    return _OPTIMIZERS[settings.name](groups, settings, device)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names a timm model asks to keep out of weight decay (its `no_weight_decay()`)."""
    listed = getattr(model, "no_weight_decay", None)
    return set(listed()) if callable(listed) else set()


def _fused(device: torch.device) -> dict[str, bool]:
    """One fused kernel for the whole update on CUDA; the multi-tensor path elsewhere."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


@register_optimizer("sgd")
def _sgd(groups: list[dict], s: OptimizerSettings, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, **_fused(device))


@register_optimizer("adamw")
def _adamw(groups: list[dict], s: OptimizerSettings, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, **_fused(device))


@register_optimizer("dot")
def _dot(groups: list[dict], s: OptimizerSettings, device: torch.device) -> torch.optim.Optimizer:
    from kdcli.engine.dot import DOT

    return DOT(groups, lr=s.lr, momentum=s.momentum, delta=s.dot_delta, weight_decay=s.weight_decay)


class GradientStep:
    """Turns each batch's loss into gradient updates: `--accumulate N` batches per optimizer step,
    the lr of that step from the schedule, `--clip-grad` on the total norm, then `after_step` (EMA).

    Each loss is divided by the number of batches of its group, so an optimizer step sees the mean
    gradient of its batches: with equal batches, N batches of B equal one batch of N*B (for losses
    that are batch means, and without BatchNorm statistics, which see B samples at a time). The last
    group of an epoch may be shorter; it is stepped at the epoch's end, never carried over.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: LrSchedule,
        accumulate: int = 1,
        clip_grad: float | None = None,
        after_step: Callable[[], None] | None = None,
    ):
        self.optimizer = optimizer
        self.schedule = schedule
        self.accumulate = accumulate
        self.clip_grad = clip_grad
        self.after_step = after_step

    @staticmethod
    def steps_per_epoch(batches: int, accumulate: int) -> int:
        return -(-batches // accumulate)

    def boundary(self, batch: int, batches: int) -> bool:
        """Whether 1-based `batch` of an epoch of `batches` ends an optimizer step (a safe stopping point)."""
        return batch % self.accumulate == 0 or batch == batches

    def __call__(self, terms: dict[str, Tensor], epoch: int, batch: int, batches: int) -> None:
        """Backward of the loss terms of 1-based `batch` of `batches` in (main-stage) `epoch`; step the
        optimizer at a group's end. DOT backpropagates its task and distillation terms itself."""
        backward_step = getattr(self.optimizer, "backward_step", None)
        if backward_step is not None:  # DOT: one batch per step (RunConfig.validate refuses --accumulate/--clip-grad)
            self._set_lr(epoch, batch - 1)
            backward_step(terms)
            if self.after_step is not None:
                self.after_step()
            return
        loss = sum(terms.values())
        first = (batch - 1) // self.accumulate * self.accumulate  # 0-based first batch of the group
        size = min(self.accumulate, batches - first)
        if batch - 1 == first:
            self.optimizer.zero_grad(set_to_none=True)
        (loss / size if size > 1 else loss).backward()
        if not self.boundary(batch, batches):
            return
        self._set_lr(epoch, first // self.accumulate)
        if self.clip_grad is not None:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.clip_grad)
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step()

    def _set_lr(self, epoch: int, step_in_epoch: int) -> None:
        lr = self.schedule.at(self.schedule.step_of(epoch, step_in_epoch))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
