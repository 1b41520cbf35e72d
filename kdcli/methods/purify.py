"""ITKD's "purification" (its code's `on_train_epoch_end`, CIFAR only): entropy-ranked mixup of the
training images for one epoch in every `every`.

Each step records the student's prediction entropy (T = 1) of every training sample. At the start
of 1-based epochs every, 2*every, ... (the code: after 0-based epochs 18, 38, ...), samples are
ranked by the entropy accumulated since the last plan, descending; the high band (ranks 10-20 %)
is paired in rank order with the low band (80-90 %), and for that epoch only the image of each
low-band sample becomes rho * x_high + (1 - rho) * x_low, rho falling linearly from 1.0 to 0.7
along the band, keeping the low sample's label (the engine applies and undoes the edit, see
`kdcli.engine.image_edits`). The plan is a buffer, so a run resumed inside that epoch edits the same
images. Under DDP the entropies are summed over the processes before ranking (each sample is seen
by one process per epoch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

HIGH_BAND = (0.1, 0.2)
LOW_BAND = (0.8, 0.9)
RHO = (1.0, 0.7)


class Purifier(nn.Module):
    def __init__(self, num_samples: int, every: int = 20):
        super().__init__()
        self.every = every
        lo_h, hi_h = int(HIGH_BAND[0] * num_samples), int(HIGH_BAND[1] * num_samples)
        lo_l, hi_l = int(LOW_BAND[0] * num_samples), int(LOW_BAND[1] * num_samples)
        self.bands = ((lo_h, hi_h), (lo_l, hi_l))
        size = min(hi_h - lo_h, hi_l - lo_l)
        self.register_buffer("entropy", torch.zeros(num_samples))
        self.register_buffer("targets", torch.zeros(size, dtype=torch.long))
        self.register_buffer("sources", torch.zeros(size, dtype=torch.long))
        self.register_buffer("plan_epoch", torch.tensor(0))
        self.register_buffer("rho", torch.linspace(RHO[0], RHO[1], size) if size > 1 else torch.full((size,), RHO[0]))

    @torch.no_grad()
    def record(self, logits: Tensor, index: Tensor) -> None:
        """Add each sample's prediction entropy (T = 1) to its running total."""
        log_p = F.log_softmax(logits.detach().float(), dim=1)
        self.entropy.index_add_(0, index.to(self.entropy.device), -(log_p.exp() * log_p).sum(dim=1))

    @torch.no_grad()
    def edits(self, epoch: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """(targets, sources, rho) for 1-based `epoch`, or None when its images stay as they are."""
        if epoch % self.every or len(self.targets) == 0:
            return None
        if int(self.plan_epoch) != epoch:  # plan once; a resumed epoch reuses the stored plan
            entropy = self.entropy.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(entropy)
            ranked = torch.argsort(entropy, descending=True, stable=True)
            (lo_h, _), (lo_l, _) = self.bands
            size = len(self.targets)
            self.sources.copy_(ranked[lo_h : lo_h + size])
            self.targets.copy_(ranked[lo_l : lo_l + size])
            self.plan_epoch.fill_(epoch)
            self.entropy.zero_()
        return self.targets, self.sources, self.rho
