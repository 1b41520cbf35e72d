"""`--compile` with one static shape per compiled function, so graphs are captured once.

Three roles are compiled, each through a frame of its own: torch.compile keeps its graph cache
(and its recompile limit) per Python code object, and a teacher and student of one family (resnet110
and resnet20) share `forward`, so compiling both modules directly would pile teacher, student,
train, eval and every batch size onto one cache until it hits the limit and silently falls back
to eager. Here:
- the teacher step runs `TeacherStep.forward`, the student's evaluation `StudentEval.forward` (both
  inline the network's forward, leaving no entry on it);
- the student's training step compiles the network itself, wrapped in DDP first under torchrun
  (`torch.compile(DDP(model))`, so that dynamo's DDP optimizer splits the graph at the gradient
  buckets and overlaps the all-reduce, which a DDP around a compiled module cannot).
Shapes are static (`dynamic=False`): the trainer sends the one ragged batch at the end of an epoch
(and of the validation set) to the uncompiled module, which computes exactly the same thing, so
every sample and every metric is kept and no compiled graph sees a second shape.
On CUDA the mode is "reduce-overhead" (CUDA graphs: one launch per graph instead of one per kernel,
what small CIFAR nets at batch 64 are bound by), except for a DDP student. Graph outputs live in
memory the next replay overwrites: the trainer copies the teacher's (it must anyway, they are
inference tensors) and reads the student's within the step.
"""

from __future__ import annotations

import torch
from torch import nn


class _Role(nn.Module):
    """A network called through the subclass's own `forward` (a code object of its own).

    `role_of` is what `models.features._unwrap` looks through to find the network."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.role_of = network


class TeacherStep(_Role):
    def forward(self, x, *args, **kwargs):  # the frozen teacher's forward inside the training step
        return self.role_of(x, *args, **kwargs)


class StudentEval(_Role):
    def forward(self, x, *args, **kwargs):  # the student's forward in evaluation (no_grad, eval mode)
        return self.role_of(x, *args, **kwargs)


def compile_mode(device: torch.device, graphs: bool = True) -> str:
    """CUDA graphs on CUDA, except for a DDP module (its all-reduce hooks run outside the graphs)."""
    return "reduce-overhead" if device.type == "cuda" and graphs else "default"


def compiled(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` compiled for one static shape."""
    graphs = not isinstance(module, nn.parallel.DistributedDataParallel)
    return torch.compile(module, dynamic=False, mode=compile_mode(device, graphs))


def step_begins(device: torch.device, compiled_step: bool) -> None:
    """Tell CUDA graph trees that a new training step starts (the previous step's graph outputs are
    no longer read), so they replay instead of re-recording."""
    if compiled_step and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def rows_of(loader) -> int | None:
    """The full batch size a loader serves (its last batch may be smaller)."""
    return getattr(loader, "batch_size", None)
