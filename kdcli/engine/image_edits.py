"""Temporary edits of the training images for one epoch (ITKD's purification), undone afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from kdcli.errors import KdError


@contextlib.contextmanager
def edited_images(loader, edit: tuple[Tensor, Tensor, Tensor] | None) -> Iterator[None]:
    """While inside, image[targets] = rho * image[sources] + (1 - rho) * image[targets] (uint8,
    rounded) in the loader's in-memory storage; the originals are put back on the way out."""
    if edit is None:
        yield
        return
    images = getattr(loader, "images", None)
    if not isinstance(images, Tensor):
        raise KdError("this method edits training images in memory, which an image-folder dataset does not allow",
                      "use an in-memory dataset (cifar10, cifar100, digits, synthetic) or turn the option off")
    targets, sources, rho = (t.to(images.device) for t in edit)
    original = images[targets].clone()
    weight = rho.reshape(-1, *([1] * (images.ndim - 1))).float()
    mixed = weight * images[sources].float() + (1.0 - weight) * original.float()
    images[targets] = mixed.round().clamp(0, 255).to(images.dtype)
    try:
        yield
    finally:
        images[targets] = original
