"""An exponential moving average of the student's weights (`--ema DECAY`), as timm's ModelEmaV3.

After every optimizer step each floating-point entry of the state dict (parameters and BatchNorm
running statistics) moves as ema = decay * ema + (1 - decay) * student; integer entries (BatchNorm's
num_batches_tracked) are copied. The copy is evaluated every epoch beside the raw student, saved
beside it, and checkpointed so that a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema, live = self.module.state_dict(), model.state_dict()
        floats = [(ema[k], live[k]) for k in ema if ema[k].is_floating_point()]
        if floats:
            torch._foreach_lerp_([m for m, _ in floats], [t.to(m.dtype) for m, t in floats], 1.0 - self.decay)
        for k, value in ema.items():
            if not value.is_floating_point():
                value.copy_(live[k])

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
