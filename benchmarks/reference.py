"""RepDistiller's CIFAR training pieces, re-implemented for the benchmarks (not part of kdcli).

The reference side of `throughput.py` and `fast_vs_reference_digits.py`: the data path of
RepDistiller's dataset/cifar100.py (uint8 HWC arrays, a PIL image per sample, torchvision
transforms, CRD's per-sample negative sampling in __getitem__) and the losses of its
distiller_zoo/KD.py and crd/ (DistillKL, Embed, ContrastMemory, ContrastLoss), written the way the
reference writes them, host syncs included, so that timings compare against what it does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import transforms as T

def reference_transform(mean, std, size: int = 32) -> T.Compose:
    """RepDistiller's CIFAR-100 train transform (dataset/cifar100.py), for `size` x `size` images."""
    return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


class ReferenceInstance(Dataset):
    """CIFAR100Instance: uint8 HWC images held in memory, a PIL image per sample, (img, target, index)."""

    def __init__(self, data: np.ndarray, targets: list[int], transform):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img, target = self.data[index], self.targets[index]
        return self.transform(Image.fromarray(img)), target, index


class ReferenceInstanceSample(ReferenceInstance):
    """CIFAR100InstanceSample, mode 'exact', percent 1: K negatives of other classes per sample,
    drawn with np.random.choice in __getitem__; (img, target, index, [index, negatives...])."""

    def __init__(self, data: np.ndarray, targets: list[int], transform, k: int):
        super().__init__(data, targets, transform)
        self.k = k
        labels = np.asarray(targets)
        classes = int(labels.max()) + 1
        positive = [np.where(labels == c)[0] for c in range(classes)]
        self.cls_negative = [np.concatenate([positive[j] for j in range(classes) if j != c]) for c in range(classes)]

    def __getitem__(self, index: int):
        img, target, index = super().__getitem__(index)
        replace = self.k > len(self.cls_negative[target])
        neg_idx = np.random.choice(self.cls_negative[target], self.k, replace=replace)
        sample_idx = np.hstack((np.asarray([index]), neg_idx))
        return img, target, index, sample_idx


class DistillKL(nn.Module):
    """RepDistiller's KD loss: KL(p_t || p_s) at temperature T, summed, / batch, * T^2."""

    def __init__(self, T: float):
        super().__init__()
        self.T = T

    def forward(self, y_s: Tensor, y_t: Tensor) -> Tensor:
        p_s = F.log_softmax(y_s / self.T, dim=1)
        p_t = F.softmax(y_t / self.T, dim=1)
        return F.kl_div(p_s, p_t, reduction="sum") * (self.T**2) / y_s.shape[0]


class Embed(nn.Module):
    """Linear projection + L2 normalisation (RepDistiller's crd/criterion.py)."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x.view(x.shape[0], -1))
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class ContrastMemory(nn.Module):
    """The reference memory bank: scores against the other net's bank, Z on the first batch, momentum update.

    Reads its constants with .item() every call, as the reference does.
    """

    def __init__(self, dim: int, n_data: int, k: int, tau: float = 0.07, momentum: float = 0.5):
        super().__init__()
        self.register_buffer("params", torch.tensor([k, tau, -1, -1, momentum]))
        stdv = 1.0 / np.sqrt(dim / 3)
        self.register_buffer("memory_v1", torch.rand(n_data, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(n_data, dim).mul_(2 * stdv).add_(-stdv))

    def forward(self, v1: Tensor, v2: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        k, tau = int(self.params[0].item()), self.params[1].item()
        z_v1, z_v2, momentum = self.params[2].item(), self.params[3].item(), self.params[4].item()
        b, (n, d) = v1.shape[0], self.memory_v1.shape
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach().view(b, k + 1, d)
        out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(b, d, 1)), tau))
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach().view(b, k + 1, d)
        out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(b, d, 1)), tau))
        if z_v1 < 0:
            self.params[2] = out_v1.mean() * n
            z_v1 = self.params[2].clone().detach().item()
        if z_v2 < 0:
            self.params[3] = out_v2.mean() * n
            z_v2 = self.params[3].clone().detach().item()
        out_v1, out_v2 = torch.div(out_v1, z_v1).contiguous(), torch.div(out_v2, z_v2).contiguous()
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(memory, 0, y.view(-1)).mul_(momentum).add_(torch.mul(v, 1 - momentum))
                memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_v1, out_v2


def contrast_loss(x: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """The reference ContrastLoss (NCE) of scores [B, K+1, 1]."""
    b, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / b


class CRDLoss(nn.Module):
    def __init__(self, s_dim: int, t_dim: int, n_data: int, k: int, feat_dim: int = 128):
        super().__init__()
        self.embed_s, self.embed_t = Embed(s_dim, feat_dim), Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, k)
        self.n_data = n_data

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor) -> Tensor:
        out_s, out_t = self.contrast(self.embed_s(f_s), self.embed_t(f_t), idx, contrast_idx)
        return contrast_loss(out_s, self.n_data) + contrast_loss(out_t, self.n_data)


def accuracy(output: Tensor, target: Tensor, topk=(1,)) -> list[Tensor]:
    """RepDistiller's util.accuracy."""
    with torch.no_grad():
        _, pred = output.topk(max(topk), 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / target.size(0)) for k in topk]


class Meter:
    """RepDistiller's AverageMeter (sum and count; the mean is never read here)."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, n: int) -> None:
        self.sum += value * n
        self.count += n


def hwc_arrays(images: Tensor) -> np.ndarray:
    """uint8 [N, 3, H, W] tensor -> uint8 [N, H, W, 3] array, the layout of torchvision's CIFAR100.data."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()
