"""The user's own data: torch Datasets (or DataLoaders) yielding `(image, label)` as a DataBundle.

Images may be tensors [C, H, W] (uint8 0..255, or float on any scale), numpy arrays or PIL images.
The Dataset does its own augmentation; kd serves it in a seeded order (and seeds torch's RNG per
sample) so that a resumed run sees the batches the interrupted one would have. The normalisation is
measured on the training split, in one pass that also reads the labels (unless the Dataset has
`targets`), and is recorded in the weights like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from kdcli import plugins
from kdcli.data.registry import DataBundle
from kdcli.errors import KdError

STATS_SAMPLES = 10_000  # mean/std are measured on at most this many training samples
_HINT = "a Dataset's __getitem__ must return (image, label): an image tensor [C, H, W] and an integer class"


@dataclass
class DatasetSplit:
    """A split served from a user's map-style Dataset; `labels` int64 [N] in index order."""

    dataset: Dataset
    labels: Tensor

    def __len__(self) -> int:
        return len(self.dataset)


def image_tensor(image) -> Tensor:
    """A sample's image as a [C, H, W] tensor (the loader's transform for user Datasets)."""
    if isinstance(image, Tensor):
        tensor = image
    elif isinstance(image, np.ndarray):
        tensor = torch.from_numpy(image)
    else:
        from torchvision.transforms.functional import pil_to_tensor

        try:
            tensor = pil_to_tensor(image)
        except TypeError:
            raise KdError(f"a sample's image is a {type(image).__name__}", _HINT) from None
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        raise KdError(f"a sample's image has shape {tuple(tensor.shape)}, not [C, H, W]", _HINT)
    return tensor


def bundle_from_datasets(train, val, num_classes: int | None = None, name: str = "custom") -> DataBundle:
    """A DataBundle over the user's `train` and `val` (Datasets, or DataLoaders whose datasets are used)."""
    train, val = _dataset_of(train, "train"), _dataset_of(val, "val")
    train_labels, mean, std, shape = _scan(train, "train", measure=True)
    val_labels, _, _, val_shape = _scan(val, "val", measure=False)
    if val_shape[0] != shape[0]:
        raise KdError(f"train images have {shape[0]} channels but val images {val_shape[0]}", "give both splits the same kind of image")
    found = int(max(train_labels.max(), val_labels.max())) + 1
    classes = found if num_classes is None else int(num_classes)
    if min(train_labels.min(), val_labels.min()) < 0 or found > classes:
        raise KdError(
            f"labels run from {int(min(train_labels.min(), val_labels.min()))} to {found - 1}, outside 0..{classes - 1}",
            "labels must be class indices 0..num_classes-1",
        )
    if classes < 2:
        raise KdError(f"the data has {classes} class", "a classifier needs at least 2 classes")
    return DataBundle(
        name=name, num_classes=classes, input_size=(int(shape[1]), int(shape[2])), mean=mean, std=std,
        train=DatasetSplit(train, train_labels), val=DatasetSplit(val, val_labels),
    )


def _dataset_of(data, split: str) -> Dataset:
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise KdError(f"the {split} data is a {type(data).__name__}, not a map-style torch Dataset", "pass Datasets with __len__ and __getitem__, or DataLoaders over them")
    if len(data) == 0:
        raise KdError(f"the {split} Dataset is empty", "give it at least one sample")
    return data


def _scan(dataset: Dataset, split: str, measure: bool):
    """(labels, mean, std, image shape): labels from `targets` when the Dataset has them, else read."""
    n = len(dataset)
    targets = getattr(dataset, "targets", None)
    need = range(n) if targets is None else range(min(n, STATS_SAMPLES) if measure else 1)
    labels, total, squares, count, shape = [], None, None, 0, None
    for i in need:
        try:
            item = dataset[i]
        except Exception as exc:  # noqa: BLE001 - the user's code: its error, in one line
            raise plugins.user_error(type(dataset).__name__, f"reading {split} sample {i}", exc) from exc
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise KdError(f"{split} sample {i} is a {type(item).__name__}, not (image, label)", _HINT)
        image = image_tensor(item[0])
        shape = shape or tuple(image.shape)
        if tuple(image.shape) != shape:
            raise KdError(f"{split} sample {i} has shape {tuple(image.shape)}, sample 0 {shape}", "give every image the same size (resize in the Dataset)")
        labels.append(_label(item[1], split, i))
        if measure and i < STATS_SAMPLES:
            x = image.double().flatten(1) / (255.0 if image.dtype == torch.uint8 else 1.0)
            total = x.sum(1) if total is None else total + x.sum(1)
            squares = (x * x).sum(1) if squares is None else squares + (x * x).sum(1)
            count += x.shape[1]
    label_tensor = torch.as_tensor(list(targets) if targets is not None else labels, dtype=torch.int64)
    if not measure:
        return label_tensor, None, None, shape
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return label_tensor, tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist()), shape


def _label(label, split: str, i: int) -> int:
    if isinstance(label, Tensor) and label.numel() == 1 and not label.is_floating_point():
        return int(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    raise KdError(f"{split} sample {i} has label {label!r}, not an integer class", _HINT)
