"""The contrastive memory shared by CRD and CRCD: per-sample memory banks and class-aware negatives.

`ContrastMemory` keeps one bank of student and one of teacher embeddings, one row per training
sample, refreshed by a momentum update at the batch's dataset indices; it also holds the NCE
normalisation constants Z. `NegativeSampler` draws, for each sample, K negatives from the other
classes (the data loader's job in RepDistiller; here it runs on the device, vectorised).
`nce_loss` is the NCE objective (Eq. 18 of the CRD paper) both methods put on top.

Everything that must survive a checkpoint is a buffer, so `method.state_dict()` carries it.

DDP: every bank row must be identical on all ranks, so the banks are written in exactly one
place, `ContrastMemory.update(index, student_emb, teacher_emb)`, and the sampler's label table
in `NegativeSampler.observe(index, labels)`. Under DDP both are meant to be wrapped by an
all-gather of their arguments (every rank then applies the same global update). Z is estimated
from each rank's own first batch (the reference is single-GPU); an all-reduce of that mean
would make it identical across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.engine.distributed import all_gather_rows, all_reduce_sum, world_size

NCE_EPS = 1e-7  # the reference's eps inside the NCE log-ratios

# Bounds on the transient [rows, N] tensors the sampler builds per call (elements).
SAMPLER_BLOCK = 1 << 24


def gather_rows(bank: Tensor, index: Tensor) -> Tensor:
    """`bank[index]` as a copy [*index.shape, d]; index_select is several times faster than advanced indexing."""
    return bank.index_select(0, index.reshape(-1)).view(*index.shape, bank.shape[1])


class ContrastMemory(nn.Module):
    """Two banks `student`, `teacher` [N, dim], and the NCE constants `z` = (Z_s, Z_t).

    Rows start uniform in [-1/sqrt(dim/3), +1/sqrt(dim/3)] like RepDistiller's `ContrastMemory`
    (CRD keeps them so; CRCD's re-implementation L2-normalises them: `normalized_init=True`).
    Drawn from the global RNG in the order student, teacher, as the reference does.
    """

    def __init__(self, num_samples: int, dim: int, momentum: float, normalized_init: bool = False):
        super().__init__()
        self.num_samples = num_samples
        self.momentum = momentum
        bound = 1.0 / math.sqrt(dim / 3)
        banks = [torch.rand(num_samples, dim).mul_(2 * bound).sub_(bound) for _ in range(2)]
        if normalized_init:
            banks = [F.normalize(bank, dim=1) for bank in banks]
        self.register_buffer("student", banks[0])
        self.register_buffer("teacher", banks[1])
        self.register_buffer("z", torch.full((2,), -1.0))  # negative: not estimated yet
        self._estimated: list[bool] | None = None  # host copy of `z >= 0`, so steps need not read z

    @torch.no_grad()
    def update(self, index: Tensor, student_emb: Tensor, teacher_emb: Tensor) -> None:
        """Momentum update of the rows at `index`, then re-normalisation to unit length.

        The only writer of the banks. Under DDP every rank applies every rank's rows, so the banks
        stay identical without being broadcast; every rank passes the same number of rows.
        """
        # Two collectives (the indices, both embeddings side by side), no host sync.
        index = all_gather_rows(index)
        both = all_gather_rows(torch.stack((student_emb.detach(), teacher_emb.detach().to(student_emb.dtype)), dim=1))
        student_emb, teacher_emb = both.unbind(dim=1)
        for bank, emb in ((self.student, student_emb), (self.teacher, teacher_emb)):
            rows = bank[index].mul_(self.momentum).add_(emb.detach().to(bank.dtype), alpha=1 - self.momentum)
            bank.index_copy_(0, index, F.normalize(rows, dim=1))

    def constant(self, side: int, first_mean: Callable[[], Tensor]) -> Tensor:
        """Z of one side (0: student anchors, 1: teacher anchors), as CRD sets it.

        On the first call `Z = mean(out) * N` of that batch's scores (`first_mean()` is only
        evaluated then), after which it stays frozen, checkpointed with the banks.
        """
        if self._estimated is None:  # once after construction or loading: a single device read
            self._estimated = (self.z >= 0).tolist()
        if not self._estimated[side]:
            with torch.no_grad():
                mean = all_reduce_sum(first_mean().detach().reshape(1)) / world_size()
                self.z[side] = mean[0] * self.num_samples
            self._estimated[side] = True
        return self.z[side].clone()  # not a view: writing the other side's Z must not touch saved tensors

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._estimated = None  # z may have changed: read it again on the next call


class NegativeSampler(nn.Module):
    """Contrast indices [B, K+1]: column 0 the sample itself, then K negatives.

    `class_aware=True` (CRD's 'exact' mode): negatives uniform over the samples of the other
    classes, without replacement when there are at least K of them, with replacement otherwise.
    `class_aware=False`: uniform over all other samples.

    The engine hands every method the training labels, recorded once with `observe`; when a
    method is built without them (unit tests), labels are learned from the batches instead. A
    sample whose label is not known yet has not been in any batch, so its memory rows are still
    their random initial values: drawing it as a negative never contrasts against a same-class
    embedding.

    Randomness comes from the global RNG of the device (checkpointed by the engine), so a run
    resumed from a checkpoint draws the same negatives.
    """

    def __init__(self, num_samples: int, class_aware: bool = True):
        super().__init__()
        self.class_aware = class_aware
        self.register_buffer("labels", torch.full((num_samples,), -1, dtype=torch.long))

    @torch.no_grad()
    def observe(self, index: Tensor, labels: Tensor) -> None:
        """Record the labels of a batch (under DDP, all-gather the arguments first)."""
        self.labels[index] = labels.to(self.labels.dtype)

    @torch.no_grad()
    def draw(self, index: Tensor, labels: Tensor, k: int) -> Tensor:
        """[B, k+1] dataset indices; processed in row blocks so no tensor exceeds SAMPLER_BLOCK."""
        rows = max(1, SAMPLER_BLOCK // self.labels.numel())
        negatives = [self._negatives(index[a : a + rows], labels[a : a + rows], k) for a in range(0, index.numel(), rows)]
        return torch.cat([index[:, None], torch.cat(negatives)], dim=1)

    def _negatives(self, index: Tensor, labels: Tensor, k: int) -> Tensor:
        n = self.labels.numel()
        rows = torch.arange(index.numel(), device=index.device)
        if self.class_aware:
            allowed = self.labels[None, :] != labels[:, None]
        else:
            allowed = torch.ones(index.numel(), n, dtype=torch.bool, device=index.device)
        allowed[rows, index] = False
        # Random keys, disallowed ones pushed past every allowed one: the k smallest keys are a
        # uniform draw without replacement, and the allowed samples come first in sorted order.
        keys = torch.rand(index.numel(), n, device=index.device).masked_fill_(~allowed, 2.0)
        k_top = min(k, n)
        order = keys.topk(k_top, dim=1, largest=False, sorted=True).indices
        # With replacement, for rows with fewer than k allowed samples: uniform over the first `count`.
        count = allowed.sum(1, keepdim=True)
        pick = (torch.rand(index.numel(), k, device=index.device) * count).long()
        pick = torch.minimum(pick, (count - 1).clamp(0, k_top - 1))
        drawn = order.gather(1, pick)
        if k_top == k:
            drawn = torch.where(count >= k, order, drawn)
        return drawn


def nce_loss(out: Tensor, z: Tensor | float, num_samples: int) -> Tensor:
    """CRD's NCE loss (paper Eq. 18) of scores `out` [R, K+1] (column 0 positive), mean over rows.

    With P = out / Z, m = K and Pn = 1/N:
    `-(1/R) sum_i [log(P_i0 / (P_i0 + m Pn + eps)) + sum_k log(m Pn / (P_ik + m Pn + eps))]`.
    """
    noise = (out.shape[1] - 1) / num_samples
    p = out / z
    positive = torch.log(p[:, 0] / (p[:, 0] + noise + NCE_EPS))
    negative = torch.log(noise / (p[:, 1:] + noise + NCE_EPS))
    return -(positive.sum() + negative.sum()) / out.shape[0]
