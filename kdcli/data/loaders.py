"""Loaders yielding `Batch(x, y, index)`: normalised float32 images on the compute device.

Reproducibility: a loader's order and augmentation for an epoch are a pure function of
(seed, epoch), set by `set_epoch(epoch)` before iterating. A checkpoint therefore only needs the
run seed and the epoch, not a loader state_dict: resuming calls `set_epoch(epoch)` and gets exactly
the batches the interrupted run would have seen, also from the middle of an epoch with
`set_epoch(epoch, start=k)` (k = batches already done). Iterating without calling set_epoch
repeats epoch 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from kdcli.batch import Batch
from kdcli.data.augment import VIEWS, normalize, random_crop_flip
from kdcli.data.custom import DatasetSplit, image_tensor
from kdcli.data.registry import DataBundle, FolderSplit, InMemorySplit, Split
from kdcli.errors import KdError

CROP_PADDING = 4  # RandomCrop(32, padding=4), the CIFAR protocol
EVAL_RESIZE_RATIO = 0.875  # Resize(size / 0.875) + CenterCrop(size), the ImageNet protocol


_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit generator seed hashed from (seed, epoch, stream): a pure function, well spread."""
    h = 0
    for v in (seed, epoch, stream):
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


def epoch_order(n: int, train: bool, seed: int, epoch: int) -> Tensor:
    """Sample indices in serving order (CPU): a permutation seeded by (seed, epoch) on train, else 0..n-1."""
    if not train:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def shard_order(order: Tensor, per_rank: int, rank: int, world: int) -> Tensor:
    """This rank's part of each global batch of `per_rank * world` samples (a partial last one dropped).

    Every rank computes the same global order, so the ranks' batches together are exactly the
    batches one process would see with the global batch size.
    """
    if world == 1:
        return order
    whole = order.numel() // (per_rank * world) * per_rank * world
    return order[:whole].view(-1, world, per_rank)[:, rank].reshape(-1)


class TensorLoader:
    """Batches of an in-memory split, held on `device` once as uint8 and augmented there.

    Train: shuffled with a generator seeded from (seed, epoch); each batch random-cropped (padding 4)
    and flipped, with draws on the device seeded from (seed, epoch, batch number), so batches repeat
    exactly on the same kind of device; `views` (a key of augment.VIEWS) adds a method's extra views
    of the same images as `Batch.views`. Eval: in order, no augmentation, no views.
    """

    def __init__(
        self,
        split: InMemorySplit,
        batch_size: int,
        train: bool,
        mean,
        std,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        views: str | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        """`shard` = (rank, world size) for data-parallel training: `batch_size` is then per rank."""
        self.device = torch.device(device)
        self.views = VIEWS[views] if views and train else None
        self.rank, self.world = shard if train else (0, 1)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next iteration epoch `epoch`'s batches, beginning at batch number `start` (resume)."""
        self.epoch = epoch
        self.start = start

    @property
    def num_batches(self) -> int:
        """Batches in a whole epoch."""
        n = len(self.labels)
        if self.world > 1:
            return n // (self.batch_size * self.world)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        """Batches the next iteration yields (a whole epoch unless set_epoch was given a start)."""
        return max(self.num_batches - self.start, 0)

    def __iter__(self) -> Iterator[Batch]:
        # Under DDP every rank draws the augmentation of the whole global batch and keeps its own rows, so a
        # global batch is the same images, cropped alike, whatever the number of processes (a run resumes on fewer).
        order = epoch_order(len(self.labels), self.train, self.seed, self.epoch).to(self.device)
        size = self.batch_size * self.world
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for b in range(self.start, self.num_batches):
            index = order[b * size : (b + 1) * size]
            raw = self.images[index]
            images, views = raw, None
            if self.train:
                # Drawn on the device: CPU draws would need a host-to-device copy that syncs each batch.
                g = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, self.epoch, 1 + b))
                images = random_crop_flip(raw, CROP_PADDING, g)[mine]
                if self.views is not None:
                    views = normalize(_rows_of_views(self.views(raw, CROP_PADDING, g), raw.shape[0], mine), self.mean, self.std)
            index = index[mine]
            yield Batch(normalize(images, self.mean, self.std), self.labels[index], index, views)


def _rows_of_views(views: Tensor, rows: int, mine: slice) -> Tensor:
    """The `mine` rows of each view in a view-major stack of copies of `rows` images."""
    stacked = views.view(-1, rows, *views.shape[1:])
    return stacked[:, mine].reshape(-1, *views.shape[1:])


class _EpochSampler(Sampler):
    """Yields (index, augmentation seed) pairs, both functions of (seed, epoch).

    Living in the main process, it carries the epoch to the workers with every index, so the
    augmentation does not depend on the number of workers nor on whether they persist.
    """

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, shard: tuple[int, int] = (0, 1)):
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world = shard if train else (0, 1)
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        served = self.n if self.world == 1 else self.n // (self.batch_size * self.world) * self.batch_size
        return max(served - self.start * self.batch_size, 0)

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        order = shard_order(epoch_order(self.n, self.train, self.seed, self.epoch), self.batch_size, self.rank, self.world)
        for i in order[self.start * self.batch_size :].tolist():
            yield i, epoch_seed(self.seed, self.epoch, 1 + i) if self.train else None


class _Indexed(Dataset):
    """An image dataset read at (index, augmentation seed) keys, returning (image, label, index)."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int | None]):
        index, seed = key
        if seed is None:
            image, label = self.dataset[index]
            return self.transform(image), label, index
        # torchvision's transforms (and a user's Dataset augmenting in __getitem__) draw from the
        # global RNG: seed a private copy of it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, label = self.dataset[index]
            return self.transform(image), label, index


def folder_transform(size: int, train: bool):
    """PIL -> uint8 tensor [3, size, size]; normalisation happens on the device after transfer."""
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])
    return T.Compose([T.Resize(round(size / EVAL_RESIZE_RATIO)), T.CenterCrop(size), T.PILToTensor()])


class FolderLoader:
    """A torch DataLoader over an image folder, yielding normalised Batches on `device`.

    Train: RandomResizedCrop(size) + horizontal flip; eval: Resize(size / 0.875) + CenterCrop(size).
    Workers decode and crop to uint8; batches travel as uint8 (a quarter of the bytes of float32)
    and are normalised on the device. Order and augmentation are functions of (seed, epoch) whatever
    the number of workers.
    """

    def __init__(
        self,
        split: FolderSplit,
        batch_size: int,
        train: bool,
        mean,
        std,
        size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        num_workers: int = 4,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        transform=None,
    ):
        """`transform`: sample -> image tensor, replacing the folder crops (a user's Dataset augments itself)."""
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.sampler = _EpochSampler(len(split), batch_size, train, seed, shard)
        self.loader = DataLoader(
            _Indexed(split.dataset, transform or folder_transform(size, train)),
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    @property
    def batch_size(self) -> int:
        """Samples in a full batch (the last one may hold fewer)."""
        return self.loader.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next iteration epoch `epoch`'s batches, beginning at batch number `start` (resume)."""
        self.sampler.epoch = epoch
        self.sampler.start = start

    def __len__(self) -> int:
        """Batches the next iteration yields (a whole epoch unless set_epoch was given a start)."""
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for images, labels, index in self.loader:
            yield Batch(
                normalize(images.to(self.device, non_blocking=True), self.mean, self.std),
                labels.to(self.device, non_blocking=True),
                index.to(self.device, non_blocking=True),
            )


def default_num_workers() -> int:
    """Decoding workers for image folders: one per core, at most 8."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def make_loader(
    split: Split,
    bundle: DataBundle,
    batch_size: int,
    train: bool,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_workers: int | None = None,
    drop_last: bool = False,
    views: str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> TensorLoader | FolderLoader:
    """The loader for `split` (bundle.train or bundle.val): TensorLoader in memory, FolderLoader on disk.

    num_workers applies to image folders only (default: one per core, at most 8). `views` names the
    extra views a method needs on training batches (see augment.VIEWS).
    """
    if batch_size < 1:
        raise KdError(f"batch size must be at least 1, got {batch_size}", "pass a positive batch size")
    if isinstance(split, InMemorySplit):
        return TensorLoader(split, batch_size, train, bundle.mean, bundle.std, device, seed, drop_last, views, shard)
    if views and train:
        raise KdError(
            f"methods that need {views!r} views run on in-memory datasets only for now",
            "use cifar10/cifar100/digits/synthetic data, or another method for image folders",
        )
    workers = default_num_workers() if num_workers is None else num_workers
    size = bundle.input_size[0]
    mean, std = bundle.mean, bundle.std
    transform = image_tensor if isinstance(split, DatasetSplit) else None
    return FolderLoader(split, batch_size, train, mean, std, size, device, seed, workers, drop_last, shard, transform)
