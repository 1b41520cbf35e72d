"""Batched image augmentation on tensors, run wherever the images live (CPU or GPU).

Equivalent in distribution to torchvision's per-image
`RandomCrop(H, padding=4) + RandomHorizontalFlip() + ToTensor() + Normalize(mean, std)`,
but done for a whole batch at once with no per-sample Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def crop_flip_params(
    batch: int, padding: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (top, left, flip) as torchvision draws them: offsets in [0, 2*padding], p(flip)=0.5."""
    device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return offsets[0], offsets[1], flip


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Crop each zero-padded image at its own (top, left) to the original size, mirroring where `flip`.

    images [B, C, H, W] of any dtype; top, left [B] int in [0, 2*padding]; flip [B] bool.
    """
    b, _, h, w = images.shape
    device = images.device
    top, left, flip = top.to(device), left.to(device), flip.to(device)
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=device)  # [B, H]
    cols = torch.arange(w, device=device).expand(b, w)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # [B, W]
    # Gather in channels-last order, then view back as [B, C, H, W] (memory stays channels-last,
    # which convolutions under autocast prefer).
    sample = torch.arange(b, device=device)[:, None, None]
    hwc = padded.permute(0, 2, 3, 1)[sample, rows[:, :, None], cols[:, None, :]]
    return hwc.permute(0, 3, 1, 2)


def random_crop_flip(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad by `padding`, randomly crop back to H x W and flip horizontally with p=0.5, per sample.

    The draws come from `generator`, on its device (CPU when None, from the global RNG). A generator on
    the images' device avoids a host-to-device copy, which would synchronise with the GPU.
    """
    top, left, flip = crop_flip_params(images.shape[0], padding, generator)
    return crop_flip(images, top, left, flip, padding)


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 [B, C, H, W] in 0..255 -> float32 (x/255 - mean) / std, per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


def rotation_views(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Three more copies of each image, each independently cropped and flipped, then rotated by
    90, 180 and 270 degrees: [3B, C, H, W], view-major (all k=1 first). Square images only."""
    return torch.cat(
        [torch.rot90(random_crop_flip(images, padding, generator), k, dims=(2, 3)) for k in (1, 2, 3)]
    )


# Extra views a method can ask for (Needs.views): name -> fn(raw uint8 images, padding, generator).
VIEWS: dict[str, Callable[[Tensor, int, torch.Generator | None], Tensor]] = {"rotations": rotation_views}
