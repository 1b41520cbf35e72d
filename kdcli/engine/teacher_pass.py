"""How the frozen teacher runs for a method: which features, and in which BatchNorm mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

from torch import nn

from kdcli.methods.base import Needs


def teacher_needs(needs: Needs) -> Needs:
    """The method's needs for the teacher pass: pre-activation features when it asks (ReviewKD)."""
    return replace(needs, preact=True) if needs.teacher_preact and not needs.preact else needs


@contextlib.contextmanager
def teacher_mode(teacher: nn.Module | None, needs: Needs) -> Iterator[None]:
    """With `needs.teacher_batch_stats` (OFD), the teacher's BatchNorms normalise with batch
    statistics, as the references' train-mode teacher does, without moving its running statistics
    (momentum 0 during the pass); every module's mode and momentum are restored afterwards."""
    if teacher is None or not needs.teacher_batch_stats:
        yield
        return
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.training, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, training, momentum, tracked in saved:
            m.train(training)
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
