"""The unit of data the trainer and methods exchange."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Batch(NamedTuple):
    """A training or evaluation batch.

    x: images [B, 3, H, W], normalised, on the compute device.
    y: integer labels [B].
    index: position of each sample in its dataset [B] (memory banks, per-sample state).
    views: method-specific extra views stacked along dim 0 (e.g. mlkd's rotations), or None.
    """

    x: Tensor
    y: Tensor
    index: Tensor
    views: Tensor | None = None
