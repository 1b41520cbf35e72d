"""Accuracy of a network on a loader: top-1/top-5 in percent, mean NLL, calibration, agreement with a reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ECE_BINS = 15


@dataclass
class Evaluation:
    top1: float
    top5: float
    loss: float  # mean negative log-likelihood (cross-entropy) per sample
    samples: int
    predictions: Tensor  # top-1 class per sample, in loader order (for agreement)
    ece: float = float("nan")  # expected calibration error in percent (ECE_BINS equal-width bins)

    def agreement(self, other: Tensor) -> float:
        """Percent of samples on which both networks predict the same class."""
        return 100.0 * (self.predictions == other).double().mean().item()


def expected_calibration_error(confidences: Tensor, correct: Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent (Guo et al., ICML 2017; Naeini et al., AAAI 2015).

    `confidences`: the top-1 softmax probability of each sample [N]; `correct`: whether the top-1
    prediction was right [N]. Samples fall into `bins` equal-width confidence bins (lo, hi] over
    [0, 1]; ECE = sum over bins of |B| / N * |accuracy(B) - mean confidence(B)|, empty bins
    contributing 0. Same binning as the reference code of temperature scaling (gpleiss/temperature_scaling).
    """
    if confidences.numel() == 0:
        return float("nan")
    conf = confidences.detach().flatten()
    hits = correct.detach().flatten().to(conf.dtype)
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype, device=conf.device)
    index = torch.bucketize(conf, edges[1:-1], right=False)  # edges[i-1] < conf <= edges[i]
    count = torch.zeros(bins, dtype=torch.float64, device=conf.device).index_add_(0, index, torch.ones_like(conf, dtype=torch.float64))
    conf_sum = torch.zeros_like(count).index_add_(0, index, conf.double())
    hit_sum = torch.zeros_like(count).index_add_(0, index, hits.double())
    return 100.0 * ((hit_sum - conf_sum).abs().sum() / conf.numel()).item()


@torch.no_grad()
def evaluate(model: nn.Module, loader, ragged: nn.Module | None = None) -> Evaluation:
    """One pass over `loader` (Batch items) in eval mode; the model's train/eval mode is restored.

    `ragged`: the same network uncompiled, for a batch smaller than the loader's full batches, so
    that a compiled `model` only ever sees one shape (engine.capture).
    """
    full = getattr(loader, "batch_size", None)
    was_training = model.training
    model.eval()
    correct1 = correct5 = nll = None
    predictions, confidences, hits1 = [], [], []
    count = 0
    for batch in loader:
        net = model if ragged is None or batch.y.numel() == full else ragged
        logits = net(batch.x).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk == batch.y.unsqueeze(1)
        batch_nll = F.cross_entropy(logits, batch.y, reduction="sum")
        c1, c5 = hits[:, 0].sum(), hits.any(dim=1).sum()
        correct1 = c1 if correct1 is None else correct1 + c1
        correct5 = c5 if correct5 is None else correct5 + c5
        nll = batch_nll if nll is None else nll + batch_nll
        predictions.append(topk[:, 0])
        confidences.append(logits.softmax(dim=1).amax(dim=1))
        hits1.append(hits[:, 0])
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
        ece=expected_calibration_error(torch.cat(confidences), torch.cat(hits1)),
    )
