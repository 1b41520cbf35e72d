"""Batched image augmentation on tensors, run wherever the images live (CPU or GPU).

Equivalent in distribution to torchvision's per-image
`RandomCrop(H, padding=4) + RandomHorizontalFlip() + ToTensor() + Normalize(mean, std)`,
but done for a whole batch at once with no per-sample Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
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
    """uint8 [B, C, H, W] in 0..255 -> float32 (x/255 - mean) / std, per channel.

    Float images (a user's Dataset of tensors) are taken as they are, on the scale mean/std were measured on.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    scaled = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (scaled - mean) / std


def rotation_views(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Three more copies of each image, each independently cropped and flipped, then rotated by
    90, 180 and 270 degrees: [3B, C, H, W], view-major (all k=1 first). Square images only."""
    return torch.cat(
        [torch.rot90(random_crop_flip(images, padding, generator), k, dims=(2, 3)) for k in (1, 2, 3)]
    )


# Extra views a method can ask for (Needs.views): name -> fn(raw uint8 images, padding, generator).
VIEWS: dict[str, Callable[[Tensor, int, torch.Generator | None], Tensor]] = {"rotations": rotation_views}


# --- The strong view of MLLD (Jin et al., CVPR 2023) --------------------------------------------
# Crop + flip, then the FixMatch-style RandAugment (2 ops, random magnitudes) and Cutout of the
# reference's dataset/cifar100.py, whose PIL ops act on one image at a time; here they act on uint8
# batches with one magnitude per sample, and nothing copies from the host (which would make it wait
# for the GPU). Each op treats the samples independently, so applying it to a sub-batch or to the
# whole batch gives the same pixels for the samples that drew it.

CUTOUT_FILL = (125, 123, 114)  # the reference's Cutout colour (RGB)


class AugmentOp(NamedTuple):
    """One RandAugment op: fn(uint8 [B, C, H, W], magnitude float [B]) and its magnitude range."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    low: float
    high: float


def _per_sample(values: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1]: one value per image."""
    return values.view(-1, 1, 1, 1)


def _blend(images: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """factor * images + (1 - factor) * degenerate per sample, clamped, truncated to uint8 (PIL's blend)."""
    f = _per_sample(factor.float())
    return (images.float() * f + degenerate.float() * (1 - f)).clamp_(0, 255).to(torch.uint8)


def _grey(images: Tensor) -> Tensor:
    """Luma, [B, 1, H, W] uint8 (the image itself when it has one channel)."""
    return TF.rgb_to_grayscale(images) if images.shape[1] == 3 else images


def _smooth(images: Tensor) -> Tensor:
    """PIL's SMOOTH filter (3x3, weights 1 around a centre 5, over 13), rounded; the border row and
    column kept as they are, as PIL and torchvision's adjust_sharpness do. float32 [B, C, H, W]."""
    channels = images.shape[1]
    kernel = torch.full((channels, 1, 3, 3), 1 / 13, device=images.device)
    kernel[:, :, 1, 1] = 5 / 13
    out = images.to(torch.float32, copy=True)
    if min(out.shape[-2:]) > 2:
        out[..., 1:-1, 1:-1] = F.conv2d(out, kernel, groups=channels).round_()
    return out


def _autocontrast(images: Tensor, _: Tensor) -> Tensor:
    return TF.autocontrast(images)


def _brightness(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(images, torch.zeros_like(images), factor)


def _color(images: Tensor, factor: Tensor) -> Tensor:
    """Saturation: a blend with the image's grey version."""
    return _blend(images, _grey(images).expand_as(images), factor)


def _contrast(images: Tensor, factor: Tensor) -> Tensor:
    """A blend with the image's mean grey level."""
    return _blend(images, _grey(images).float().mean(dim=(1, 2, 3), keepdim=True), factor)


def _equalize(images: Tensor, _: Tensor) -> Tensor:
    return TF.equalize(images)


def _identity(images: Tensor, _: Tensor) -> Tensor:
    return images


def _posterize(images: Tensor, bits: Tensor) -> Tensor:
    """Keep the int(bits) high bits of each value (bits drawn in [4, 8), so 4 to 7 bits)."""
    drop = 8 - bits.long().clamp(1, 8)
    return images & _per_sample(((255 >> drop) << drop).to(torch.uint8))


def _sharpness(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(images, _smooth(images), factor)


def _solarize(images: Tensor, threshold: Tensor) -> Tensor:
    """Invert the values at or above the threshold."""
    return torch.where(images >= _per_sample(threshold), 255 - images, images)


def _warp(images: Tensor, like: Tensor, a, b, c, d, e, f) -> Tensor:
    """PIL's Image.transform(AFFINE, (a, b, c, d, e, f)) with nearest sampling and black fill.

    The output pixel centred at (x, y) takes the input at (a x + b y + c, d x + e y + f), in pixels
    from the top-left corner. Coefficients are floats or per-sample [B] tensors (`like`: any float
    [B] tensor on the images' device).
    """
    h, w = images.shape[-2:]
    # The same map in grid_sample's units (-1 and 1 at the outer pixel edges).
    theta = [a, b * h / w, a + b * h / w + 2 * c / w - 1, d * w / h, e, d * w / h + e + 2 * f / h - 1]
    theta = [v.float() if isinstance(v, Tensor) else torch.full_like(like, v) for v in theta]
    theta = torch.stack(theta, dim=-1).view(-1, 2, 3)
    grid = F.affine_grid(theta, [images.shape[0], 1, h, w], align_corners=False)
    # uint8 values are exact in float32 and nearest sampling only copies them.
    return F.grid_sample(images.float(), grid, mode="nearest", align_corners=False).to(torch.uint8)


def _rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Counter-clockwise by `degrees` about the image centre (PIL's Image.rotate)."""
    h, w = images.shape[-2:]
    cos, sin = torch.cos(torch.deg2rad(degrees)), torch.sin(torch.deg2rad(degrees))
    cx, cy = w / 2, h / 2
    return _warp(images, degrees, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def _shear_x(images: Tensor, shear: Tensor) -> Tensor:
    return _warp(images, shear, 1.0, shear, 0.0, 0.0, 1.0, 0.0)


def _shear_y(images: Tensor, shear: Tensor) -> Tensor:
    return _warp(images, shear, 1.0, 0.0, 0.0, shear, 1.0, 0.0)


def _translate_x(images: Tensor, fraction: Tensor) -> Tensor:
    """Content moves left by fraction * W (right when negative)."""
    return _warp(images, fraction, 1.0, 0.0, fraction * images.shape[-1], 0.0, 1.0, 0.0)


def _translate_y(images: Tensor, fraction: Tensor) -> Tensor:
    """Content moves up by fraction * H (down when negative)."""
    return _warp(images, fraction, 1.0, 0.0, 0.0, 0.0, 1.0, fraction * images.shape[-2])


RAND_AUGMENT_OPS: tuple[AugmentOp, ...] = (
    AugmentOp("AutoContrast", _autocontrast, 0.0, 1.0),
    AugmentOp("Brightness", _brightness, 0.05, 0.95),
    AugmentOp("Color", _color, 0.05, 0.95),
    AugmentOp("Contrast", _contrast, 0.05, 0.95),
    AugmentOp("Equalize", _equalize, 0.0, 1.0),
    AugmentOp("Identity", _identity, 0.0, 1.0),
    AugmentOp("Posterize", _posterize, 4.0, 8.0),
    AugmentOp("Rotate", _rotate, -30.0, 30.0),
    AugmentOp("Sharpness", _sharpness, 0.05, 0.95),
    AugmentOp("ShearX", _shear_x, -0.3, 0.3),
    AugmentOp("ShearY", _shear_y, -0.3, 0.3),
    AugmentOp("Solarize", _solarize, 0.0, 256.0),
    AugmentOp("TranslateX", _translate_x, -0.3, 0.3),
    AugmentOp("TranslateY", _translate_y, -0.3, 0.3),
)
"""The reference's op list and ranges (FixMatch's RandAugment; the magnitude argument m is unused)."""


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def rand_augment(
    images: Tensor, generator: torch.Generator | None = None, num_ops: int = 2, gather: bool | None = None
) -> Tensor:
    """Per sample, `num_ops` ops drawn uniformly with replacement from RAND_AUGMENT_OPS, applied in turn,
    each with a magnitude uniform in its range. uint8 [B, C, H, W] -> uint8 [B, C, H, W].

    `gather`: run each op on the samples that drew it only (default on CPU); else (default on other
    devices) run every op on the whole batch and keep it where drawn (torch.where), about 14x the
    arithmetic, small on a GPU, but without the host sync that selecting samples by a mask costs.
    Both give the same result.
    """
    b, device = images.shape[0], _draw_device(generator)
    chosen = torch.randint(0, len(RAND_AUGMENT_OPS), (num_ops, b), generator=generator, device=device)
    levels = torch.rand((num_ops, b), generator=generator, device=device)
    chosen, levels = chosen.to(images.device), levels.to(images.device)
    if gather is None:
        gather = images.device.type == "cpu"
    for op_ids, level in zip(chosen, levels):
        out = images.clone() if gather else images
        for k, op in enumerate(RAND_AUGMENT_OPS):
            magnitude = op.low + (op.high - op.low) * level
            if gather:
                rows = (op_ids == k).nonzero().squeeze(1)
                if rows.numel():
                    out[rows] = op.fn(images[rows], magnitude[rows])
            else:
                out = torch.where(_per_sample(op_ids == k), op.fn(images, magnitude), out)
        images = out
    return images


def cutout(images: Tensor, generator: torch.Generator | None = None, max_fraction: float = 0.5) -> Tensor:
    """Paint one grey square per sample, side uniform in [0, max_fraction) * W, as the reference's Cutout.

    As there: the box starts at int(max(0, centre - side / 2)) and PIL's rectangle includes both end
    pixels; the centre comes from np.random.uniform(W), i.e. uniform in (1, W] (low=W, high=1).
    """
    b, _, h, w = images.shape
    fraction, u, v = torch.rand((3, b), generator=generator, device=_draw_device(generator)).to(images.device)
    side = fraction * max_fraction * w
    left = (w - (w - 1) * u - side / 2).clamp(min=0).floor()
    top = (h - (h - 1) * v - side / 2).clamp(min=0).floor()
    cols = torch.arange(w, device=images.device)
    rows = torch.arange(h, device=images.device)
    in_cols = (cols >= left[:, None]) & (cols <= (left + side)[:, None])  # [B, W]
    in_rows = (rows >= top[:, None]) & (rows <= (top + side)[:, None])  # [B, H]
    box = in_rows[:, :, None] & in_cols[:, None, :] & (side > 0)[:, None, None]
    out = images.clone()
    for channel, value in zip(out.unbind(1), CUTOUT_FILL):
        channel.masked_fill_(box, value)
    return out


def strong_views(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """One strongly augmented copy of each image (MLLD): crop + flip, RandAugment(2), Cutout; uint8."""
    return cutout(rand_augment(random_crop_flip(images, padding, generator), generator), generator)


VIEWS["strong"] = strong_views
