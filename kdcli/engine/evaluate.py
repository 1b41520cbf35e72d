"""Accuracy of a network on a loader: top-1/top-5 in percent, mean NLL, agreement with a reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Evaluation:
    top1: float
    top5: float
    loss: float
    samples: int
    predictions: Tensor  # top-1 class per sample, in loader order (for agreement)

    def agreement(self, other: Tensor) -> float:
        """Percent of samples on which both networks predict the same class."""
        return 100.0 * (self.predictions == other).double().mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> Evaluation:
    """One pass over `loader` (Batch items) in eval mode; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = nll = None
    predictions = []
    count = 0
    for batch in loader:
        logits = model(batch.x).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk == batch.y.unsqueeze(1)
        batch_nll = F.cross_entropy(logits, batch.y, reduction="sum")
        c1, c5 = hits[:, 0].sum(), hits.any(dim=1).sum()
        correct1 = c1 if correct1 is None else correct1 + c1
        correct5 = c5 if correct5 is None else correct5 + c5
        nll = batch_nll if nll is None else nll + batch_nll
        predictions.append(topk[:, 0])
        count += batch.y.numel()
    model.train(was_training)
    if count == 0:
        return Evaluation(0.0, 0.0, float("nan"), 0, torch.empty(0, dtype=torch.long))
    return Evaluation(
        top1=100.0 * correct1.item() / count,
        top5=100.0 * correct5.item() / count,
        loss=nll.item() / count,
        samples=count,
        predictions=torch.cat(predictions).cpu(),
    )
