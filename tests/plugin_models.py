"""A user's own networks and data, as tests name them: `--student tests.plugin_models:factory`."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from kdcli.data.registry import synthetic_images


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class StageNet(nn.Module):
    """A small CNN built from stage modules: kd finds its stem/stage maps and classifier by hooks."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = _stage(3, width, 1)
        self.stage1 = _stage(width, 2 * width, 2)
        self.stage2 = _stage(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stage2(self.stage1(self.stem(x)))), 1))


class FlatNet(nn.Module):
    """No spatial stages at all (an MLP on 16x16 images): fine for kd, refused by feature methods."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def factory(num_classes: int) -> nn.Module:
    return StageNet(num_classes, width=4)


def teacher_factory(num_classes: int) -> nn.Module:
    return StageNet(num_classes, width=8)


def flat_factory(num_classes: int) -> nn.Module:
    return FlatNet(num_classes)


class DictNet(StageNet):
    """Returns a dict with a string in it: kd can store its weights, but tracing cannot export it."""

    def forward(self, x):
        return {"logits": super().forward(x), "note": "not a tensor"}


def dict_factory(num_classes: int) -> nn.Module:
    return DictNet(num_classes, width=4)


def broken_factory(num_classes: int) -> nn.Module:
    raise ValueError(f"cannot build a net for {num_classes} classes")


def not_a_model(num_classes: int):
    return "resnet20"


class ToyImages(Dataset):
    """A user's Dataset: float images [3, 16, 16] in 0..1 and int labels, with its own flip augmentation."""

    def __init__(self, train: bool, classes: int = 4, n: int = 160, augment: bool = False):
        images, labels = synthetic_images(classes, n, 16, seed=3)
        keep = (torch.arange(n) // classes) % 5 != 4
        keep = keep if train else ~keep
        self.images, self.labels = images[keep].float() / 255.0, labels[keep].tolist()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def data():
    return ToyImages(True, augment=True), ToyImages(False), 4


def bad_data():
    return ToyImages(True)


class CudaOnlyPoolNet(StageNet):
    """Raises, in training under deterministic algorithms, the RuntimeError PyTorch raises on a GPU for an
    op without a deterministic kernel (an adaptive pool called as a function, as in torchvision's MobileNetV2)."""

    def forward(self, x):
        if self.training and torch.are_deterministic_algorithms_enabled():
            raise RuntimeError("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but you "
                               "set 'torch.use_deterministic_algorithms(True)'.")
        return super().forward(x)


def cuda_only_pool_factory(num_classes: int) -> nn.Module:
    return CudaOnlyPoolNet(num_classes)
