"""Adaptive average pooling that `--deterministic` can differentiate on a GPU.

PyTorch has no deterministic CUDA kernel for the backward of adaptive average pooling: under
torch.use_deterministic_algorithms it raises. The same bins (PyTorch's: output cell i averages
inputs floor(i*n/m) .. ceil((i+1)*n/m) - 1) are here a product with two averaging matrices, whose
backward is a matmul, deterministic everywhere. Outside deterministic mode PyTorch's own kernel runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _averaging_matrix(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """[size_out, size_in]: row i holds 1/len over adaptive pooling's i-th bin."""
    i = torch.arange(size_out, device=like.device)
    start = (i * size_in) // size_out
    end = ((i + 1) * size_in + size_out - 1) // size_out  # ceil
    j = torch.arange(size_in, device=like.device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def adaptive_avg_pool2d(x: Tensor, output_size) -> Tensor:
    """`F.adaptive_avg_pool2d(x, output_size)`, with a deterministic backward under --deterministic."""
    if not torch.are_deterministic_algorithms_enabled():
        return F.adaptive_avg_pool2d(x, output_size)
    h, w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    h, w = h or x.shape[-2], w or x.shape[-1]  # None keeps that side
    if (h, w) == (1, 1):
        return x.mean(dim=(-2, -1), keepdim=True)
    rows, cols = _averaging_matrix(x.shape[-2], h, x), _averaging_matrix(x.shape[-1], w, x)
    return torch.matmul(torch.matmul(rows, x), cols.t())


class DeterministicAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d computed by `adaptive_avg_pool2d` (no state: weights files are unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        return adaptive_avg_pool2d(x, self.output_size)


def make_pooling_deterministic(model: nn.Module) -> int:
    """Swap the model's nn.AdaptiveAvgPool2d modules (e.g. torchvision's and timm's global pools) for
    DeterministicAdaptiveAvgPool2d, in place; the number swapped. Pools called as functions inside a
    network's forward (torchvision's MobileNetV2, DenseNet) cannot be reached this way."""
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.AdaptiveAvgPool2d:
                setattr(module, name, DeterministicAdaptiveAvgPool2d(child.output_size))
                swapped += 1
    return swapped
