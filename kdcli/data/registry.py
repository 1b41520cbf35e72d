"""Datasets by name: `build_data("cifar100")` -> a DataBundle with train and val splits.

Specs are `NAME` or `NAME:ARG`: cifar10, cifar100, digits, imagefolder:PATH,
synthetic[:classes=10,n=1000,size=32,seed=0]. Small sets are held in memory as uint8 tensors
(InMemorySplit) so the loader can keep them on the GPU and augment there; image folders stay on disk
(FolderSplit) and go through a torch DataLoader.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder

from kdcli.errors import KdError, unknown

DEFAULT_DATA_DIR = "~/.cache/kdcli/data"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The digits split is fixed, independent of the run seed, so that every run is scored on the same images.
DIGITS_SPLIT_SEED = 0
SYNTHETIC_DEFAULTS = {"classes": 10, "n": 1000, "size": 32, "seed": 0}


@dataclass
class InMemorySplit:
    """A split held in memory: images uint8 [N, 3, H, W] (0..255), labels int64 [N]."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FolderSplit:
    """A split read lazily from a folder of class sub-folders through torchvision's ImageFolder."""

    dataset: ImageFolder

    @property
    def labels(self) -> Tensor:
        """int64 [N]: the label of every sample, in index order (what CRD-style samplers need)."""
        return torch.tensor(self.dataset.targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.dataset)


Split = InMemorySplit | FolderSplit


@dataclass
class DataBundle:
    """A dataset ready for training: its splits and what models and loaders need to know about it."""

    name: str
    num_classes: int
    input_size: tuple[int, int]  # (H, W) of the images the model sees
    mean: tuple[float, ...]  # per-channel normalisation, applied by the loaders
    std: tuple[float, ...]
    train: Split
    val: Split


@dataclass(frozen=True)
class _Entry:
    description: str
    build: Callable[..., DataBundle]
    takes_arg: bool = False


_DATASETS: dict[str, _Entry] = {}


def _dataset(name: str, description: str, takes_arg: bool = False):
    def register(build: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        _DATASETS[name] = _Entry(description, build, takes_arg)
        return build

    return register


def list_datasets() -> dict[str, str]:
    """Dataset name -> one-line description."""
    return {name: entry.description for name, entry in _DATASETS.items()}


def build_data(
    spec: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    val_split: float | None = None,
) -> DataBundle:
    """The dataset named by `spec` (see the module doc), with its train and val splits.

    data_dir: where cifar10/cifar100 live (default $KD_DATA, else ~/.cache/kdcli/data).
    download: let torchvision download CIFAR when its files are missing.
    seed: the run seed. No split depends on it: every built-in split is fixed so runs with different
        seeds are compared on the same data (synthetic data has its own `seed=` option); the run
        seed drives shuffling and augmentation in the loaders.
    image_size: side of the square crops an image folder is trained and evaluated at (default 224);
        in-memory sets are used at their native size.
    val_split: for an image folder without val/, the fraction of each class held out for validation.
    A `pkg.module:factory` / `file.py:factory` spec calls the user's factory (see kdcli.data.custom).
    """
    from kdcli import plugins

    if plugins.is_plugin_spec(spec):
        from kdcli.data.custom import bundle_from_datasets

        _no_val_split(val_split, "your own data (split it in the factory)")
        return bundle_from_datasets(*plugins.call_data_factory(spec), name=spec)
    name, sep, arg = spec.strip().partition(":")
    name = name.strip().lower()
    entry = _DATASETS.get(name)
    if entry is None:
        raise unknown("dataset", name, _DATASETS, listing="kd list datasets")
    if image_size is not None and name != "imagefolder":
        raise KdError(
            f"dataset {name!r} has a fixed image size; image_size applies to imagefolder:PATH only",
            "leave the image size unset for this dataset",
        )
    if name == "imagefolder":
        return entry.build(arg, data_dir=data_dir, download=download, image_size=image_size, val_split=val_split)
    _no_val_split(val_split, f"dataset {name!r} (its split is fixed)")
    if entry.takes_arg:
        return entry.build(arg, data_dir=data_dir, download=download, image_size=image_size)
    if sep:
        raise KdError(f"dataset {name!r} takes no options (got {arg!r})", f"write just {name!r}")
    return entry.build(data_dir=data_dir, download=download)


def _no_val_split(val_split: float | None, what: str) -> None:
    if val_split is not None:
        raise KdError(f"--val-split does not apply to {what}", "--val-split is for imagefolder:PATH without a val/ folder")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The folder datasets are read from: data_dir, else $KD_DATA, else ~/.cache/kdcli/data."""
    return Path(data_dir or os.environ.get("KD_DATA") or DEFAULT_DATA_DIR).expanduser()


# --- CIFAR -------------------------------------------------------------------------------------


def _cifar(cls: type[CIFAR10], name: str, mean, std, data_dir, download: bool) -> DataBundle:
    root = resolve_data_dir(data_dir)
    folder = root / cls.base_folder
    if download:
        try:
            cls(str(root), train=True, download=True)
        except (OSError, RuntimeError) as e:
            raise KdError(
                f"could not download {name} into {root}: {e}",
                f"check the network, or fetch {cls.url} yourself and extract it into {root}",
            ) from e
    else:
        _check_cifar_files(cls, name, root)
    try:
        train, val = cls(str(root), train=True), cls(str(root), train=False)
    except RuntimeError as e:  # torchvision's checksum test failed
        raise KdError(
            f"the {name} files in {folder} are corrupted or incomplete",
            f"delete {folder} and pass --download to fetch them again",
        ) from e
    return DataBundle(
        name=name,
        num_classes=len(train.classes),
        input_size=(32, 32),
        mean=mean,
        std=std,
        train=_cifar_split(train),
        val=_cifar_split(val),
    )


def _check_cifar_files(cls: type[CIFAR10], name: str, root: Path) -> None:
    folder = root / cls.base_folder
    hint = f"pass --download, or --data-dir pointing at a folder that holds {cls.base_folder}/"
    if not folder.is_dir():
        raise KdError(f"{name} not found: there is no folder {folder}", hint)
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise KdError(f"{name} is incomplete: {folder} lacks {', '.join(missing)}", hint)


def _cifar_split(ds: CIFAR10) -> InMemorySplit:
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW, uint8
    return InMemorySplit(images, torch.tensor(ds.targets, dtype=torch.int64))


@_dataset("cifar10", "CIFAR-10: 60k 32x32 colour images, 10 classes (torchvision; --download)")
def _cifar10(data_dir=None, download=False) -> DataBundle:
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return _cifar(CIFAR10, "cifar10", mean, std, data_dir, download)


@_dataset("cifar100", "CIFAR-100: 60k 32x32 colour images, 100 classes (torchvision; --download)")
def _cifar100(data_dir=None, download=False) -> DataBundle:
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # RepDistiller's
    return _cifar(CIFAR100, "cifar100", mean, std, data_dir, download)


# --- image folders -----------------------------------------------------------------------------

_FOLDER_HINT = "imagefolder:PATH needs PATH/train/ and PATH/val/, each with a sub-folder of images per class"


@_dataset(
    "imagefolder",
    "imagefolder:PATH - your own images in PATH/train/<class>/ and PATH/val/<class>/",
    takes_arg=True,
)
def _imagefolder(path: str, data_dir=None, download=False, image_size: int | None = None, val_split: float | None = None) -> DataBundle:
    if not path.strip():
        raise KdError("imagefolder needs a path", _FOLDER_HINT)
    size = 224 if image_size is None else image_size
    if size < 8:
        raise KdError(f"image size {size} is too small for an image folder", "use an image size of 8 or more")
    root = Path(path.strip()).expanduser()
    if not root.is_dir():
        raise KdError(f"image folder {root} does not exist", _FOLDER_HINT)
    if val_split is not None:
        train, val = _held_out(root, val_split)
    else:
        missing = [sub for sub in ("train", "val") if not (root / sub).is_dir()]
        if missing:
            hint = _FOLDER_HINT + " (or, without val/, pass --val-split 0.1 to hold out 10% of train/)"
            raise KdError(f"image folder {root} has no {' or '.join(s + '/' for s in missing)}", hint)
        train, val = _image_folder(root / "train"), _image_folder(root / "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise KdError(
            f"the classes of {root / 'train'} and {root / 'val'} differ"
            f" (only in train: {_names(only_train)}; only in val: {_names(only_val)})",
            "give train/ and val/ the same class sub-folders",
        )
    return DataBundle(
        name=f"imagefolder:{root}",
        num_classes=len(train.classes),
        input_size=(size, size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        train=FolderSplit(train),
        val=FolderSplit(val),
    )


def _held_out(root: Path, fraction: float) -> tuple[ImageFolder, ImageFolder]:
    """train/ (or PATH itself) split per class: every image whose seeded rank falls in the first
    `fraction` of its class goes to val. The split depends only on the file list, never on the run seed."""
    if not 0 < fraction < 1:
        raise KdError(f"--val-split {fraction} is invalid", "use a fraction between 0 and 1, e.g. 0.1")
    if (root / "val").is_dir():
        raise KdError(f"{root} has a val/ folder already", "drop --val-split to validate on val/")
    folder = root / "train" if (root / "train").is_dir() else root
    train, val = _image_folder(folder), _image_folder(folder)
    order = torch.randperm(len(train.samples), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED)).tolist()
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(train.targets[i], []).append(i)
    held = set()
    for label, members in by_class.items():
        if len(members) < 2:
            raise KdError(f"class {train.classes[label]!r} has {len(members)} image", "--val-split needs at least 2 images per class")
        held.update(members[: min(len(members) - 1, max(1, round(fraction * len(members))))])
    for dataset, keep in ((train, lambda i: i not in held), (val, lambda i: i in held)):
        dataset.samples = [s for i, s in enumerate(dataset.samples) if keep(i)]
        dataset.imgs = dataset.samples
        dataset.targets = [label for _, label in dataset.samples]
    return train, val


def _image_folder(folder: Path) -> ImageFolder:
    try:
        return ImageFolder(str(folder), loader=read_image)
    except FileNotFoundError as e:  # no class folders, or a class folder with no images
        raise KdError(f"no usable images in {folder}: {e}", _FOLDER_HINT) from e


class UnreadableImage(KdError):
    """An image file that cannot be decoded (found when it is first read, in training or evaluation)."""

    def __init__(self, message: str, hint: str | None = None):
        # A DataLoader worker's exception comes back as cls("Caught ... Original Traceback ...: <message>"):
        # keep the original message, not the worker's traceback.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2] or message
        super().__init__(message, hint or "delete or replace that file, then run again (`--resume RUN` continues a run that had started)")


def read_image(path: str):
    """ImageFolder's loader: the image as RGB, or UnreadableImage naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = "not an image format PIL knows" if isinstance(e, UnidentifiedImageError) else str(e)
        raise UnreadableImage(f"cannot read image {path} ({reason})") from None


def _names(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --- built-in offline sets ---------------------------------------------------------------------


@_dataset("digits", "scikit-learn's 1797 handwritten 8x8 digits, upsampled to 32x32; offline, 10 classes")
def _digits(data_dir=None, download=False) -> DataBundle:
    # scikit-learn takes a second to import; only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = torch.from_numpy(digits.images).float()[:, None] * (255.0 / 16.0)  # [N, 1, 8, 8], 0..16 -> 0..255
    # Bilinear is a convex combination, so values stay in 0..255.
    up = F.interpolate(grey, size=(32, 32), mode="bilinear", align_corners=False)
    images = up.round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).to(torch.int64)
    train_idx, val_idx = (
        torch.from_numpy(idx).sort().values
        for idx in train_test_split(
            np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
        )
    )
    train = InMemorySplit(images[train_idx], labels[train_idx])
    return _in_memory_bundle("digits", 10, train, InMemorySplit(images[val_idx], labels[val_idx]))


@_dataset(
    "synthetic",
    "synthetic[:classes=10,n=1000,size=32,seed=0] - generated class-structured images for tests and CI",
    takes_arg=True,
)
def _synthetic(options: str, data_dir=None, download=False, image_size: int | None = None) -> DataBundle:
    opts = _synthetic_options(options)
    classes, n, size, seed = opts["classes"], opts["n"], opts["size"], opts["seed"]
    images, labels = synthetic_images(classes, n, size, seed)
    # Exactly stratified 80/20: every 5th sample of each class goes to val.
    val = (torch.arange(n) // classes) % 5 == 4
    return _in_memory_bundle(
        "synthetic:" + ",".join(f"{k}={v}" for k, v in opts.items()),
        classes,
        InMemorySplit(images[~val], labels[~val]),
        InMemorySplit(images[val], labels[val]),
    )


def _synthetic_options(text: str) -> dict[str, int]:
    opts = dict(SYNTHETIC_DEFAULTS)
    hint = "write e.g. synthetic:classes=10,n=1000,size=32,seed=0 (all optional)"
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in opts:
            raise unknown("synthetic option", key, opts)
        digits = value.removeprefix("-")
        if not eq or not (digits.isascii() and digits.isdigit()) or len(digits) > 30:
            raise KdError(f"synthetic option {key!r} needs an integer value, got {item[:60]!r}", hint)
        opts[key] = int(value)
    lows = {"classes": 2, "size": 8, "seed": 0, "n": 5 * opts["classes"]}
    for key, low in lows.items():
        if opts[key] < low:
            why = " (5 per class, so that every class has a val sample)" if key == "n" else ""
            raise KdError(f"synthetic option {key}={opts[key]} is too small: the least is {low}{why}", hint)
    highs = {"classes": 10_000, "size": 512, "seed": 2**63 - 1, "n": 1_000_000}
    for key, high in highs.items():
        if opts[key] > high:
            raise KdError(f"synthetic option {key}={opts[key]} is too large: the most is {high}", hint)
    if opts["n"] * opts["size"] ** 2 * 3 > 2**31:
        raise KdError(f"synthetic data of n={opts['n']} images of size={opts['size']} would need over 2 GiB",
                      "use fewer or smaller images (n x size x size x 3 bytes, at most 2 GiB)")
    return opts


def synthetic_images(classes: int, n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """n images uint8 [n, 3, size, size] and labels (sample i has class i % classes), deterministic in seed.

    Each class has a prototype: its own base colour blended with a smooth random colour field. A
    sample is its class's prototype circularly shifted by up to a quarter of the image, with random
    contrast, brightness and pixel noise. Colour statistics survive the shift, so a small CNN beats
    chance within an epoch (about 75% after two on the defaults) without saturating, and the shifts
    make crop augmentation useful.
    """
    g = torch.Generator().manual_seed(seed)
    field = torch.rand(classes, 3, 4, 4, generator=g)
    base = torch.rand(classes, 3, 1, 1, generator=g)
    prototypes = F.interpolate(0.5 * (base + field), size=(size, size), mode="bicubic", align_corners=False)
    labels = torch.arange(n) % classes
    max_shift = size // 4
    shift = torch.randint(-max_shift, max_shift + 1, (2, n, 1), generator=g)
    rows = (torch.arange(size) - shift[0]) % size  # [n, size]
    cols = (torch.arange(size) - shift[1]) % size
    channels = torch.arange(3)[:, None, None]
    x = prototypes[labels[:, None, None, None], channels, rows[:, None, :, None], cols[:, None, None, :]]
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    brightness = 0.15 * torch.randn(n, 1, 1, 1, generator=g)
    x = (x - 0.5) * contrast + 0.5 + brightness + 0.15 * torch.randn(n, 3, size, size, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels.to(torch.int64)


def _in_memory_bundle(name: str, num_classes: int, train: InMemorySplit, val: InMemorySplit) -> DataBundle:
    """A bundle whose normalisation is measured on its own train split."""
    x = train.images.double() / 255.0
    mean = tuple(round(v, 4) for v in x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(round(v, 4) for v in x.std(dim=(0, 2, 3)).tolist())
    h, w = train.images.shape[-2:]
    return DataBundle(name, num_classes, (h, w), mean, std, train, val)
