"""CRD: contrastive representation distillation through memory banks and NCE."""

from __future__ import annotations

import torch
from torch import Tensor

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import full_precision
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.methods.heads import Embed
from kdcli.methods.memory import ContrastMemory, NegativeSampler, gather_rows, nce_loss
from kdcli.models.features import Outputs

NEGATIVES = ("class", "any")


# Scoring against the whole bank with one matmul beats gathering the [B, K+1, d] contrast rows
# while the bank has at most this many rows per contrast entry (CRD on CIFAR: 50000 / 16385 ~ 3).
WHOLE_BANK_RATIO = 8


@full_precision
def contrast_scores(anchor: Tensor, bank: Tensor, contrast: Tensor, tau: float) -> Tensor:
    """exp(<bank[contrast_ik], anchor_i> / tau) [B, K+1] for unit anchors [B, d], a bank [N, d], indices [B, K+1].

    In fp32 outside autocast (tau = 0.07 magnifies bf16 rounding of the dot products 14-fold).
    """
    if bank.shape[0] <= WHOLE_BANK_RATIO * contrast.shape[1]:
        # A copy of the bank: the memory update after this step must not change what backward reads.
        dots = (anchor @ bank.clone().t()).gather(1, contrast)
    else:
        dots = torch.bmm(gather_rows(bank, contrast), anchor.unsqueeze(2)).squeeze(2)
    return torch.exp(dots / tau)


def crd_objective(memory: ContrastMemory, v_s: Tensor, v_t: Tensor, contrast: Tensor, tau: float) -> Tensor:
    """L_nce(P_s) + L_nce(P_t): each embedding must pick its own sample out of the other net's memory.

    The memory rows are read as they were before this batch (call `memory.update` afterwards).
    """
    out_s = contrast_scores(v_s, memory.teacher, contrast, tau)
    out_t = contrast_scores(v_t, memory.student, contrast, tau)
    n = memory.num_samples
    return nce_loss(out_s, memory.constant(0, out_s.mean), n) + nce_loss(out_t, memory.constant(1, out_t.mean), n)


def check_contrast_options(hp: dict, student: Shapes, teacher: Shapes, num_samples: int) -> None:
    """KdErrors for the options CRD and CRCD share and for networks they cannot serve."""
    if not student.embedding or not teacher.embedding:
        raise KdError("this method needs the pooled embedding of both networks", "use models with a pooled penultimate layer")
    if hp["negatives"] not in NEGATIVES:
        raise KdError(f"negatives={hp['negatives']!r} is not one of {', '.join(NEGATIVES)}", "use negatives=class (CRD's sampler) or any")
    if hp["negatives"] == "class" and student.num_classes < 2:
        raise KdError("class-aware negatives need at least two classes", "use --set negatives=any")
    if hp["K"] < 1 or hp["dim"] < 1:
        raise KdError(f"K and dim must be positive, got K={hp['K']} dim={hp['dim']}", "e.g. --set K=4096")
    if num_samples < 2:
        raise KdError("a contrastive memory needs at least two training samples", "train on a larger dataset")
    if hp["tau"] <= 0 or not 0 <= hp["momentum"] < 1:
        raise KdError(f"need tau > 0 and 0 <= momentum < 1, got tau={hp['tau']} momentum={hp['momentum']}", "e.g. --set tau=0.07")


@register("crd")
class CRD(Method):
    """Tian et al.: maximise a bound on the mutual information of the two embeddings (NCE, memory banks).

    `L = ce*CE + kd*KD + beta*(L_nce(P_s) + L_nce(P_t))`, with class-aware negatives (crd.md).
    """

    title = "Contrastive Representation Distillation"
    paper = "Tian, Krishnan & Isola, ICLR 2020 (arXiv 1910.10699)"
    year = 2020
    needs = Needs(embedding=True, index=True)
    defaults = {
        "ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 0.8,
        "dim": 128,  # embedding width of the heads and banks (feat_dim)
        "K": 16384,  # negatives per sample (nce_k)
        "tau": 0.07,  # temperature (nce_t)
        "momentum": 0.5,  # memory update momentum (nce_m)
        "negatives": "class",  # "class": other classes only (the reference sampler); "any": all other samples
    }
    ranges = {"beta": "nonnegative", "dim": "count", "K": "count", "tau": "positive", "momentum": "fraction"}

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        check_contrast_options(self.hp, student, teacher, num_samples)
        dim = self.hp["dim"]
        self.embed_s = Embed(student.embedding, dim)
        self.embed_t = Embed(teacher.embedding, dim)
        self.memory = ContrastMemory(num_samples, dim, self.hp["momentum"])
        self.sampler = NegativeSampler(num_samples, class_aware=self.hp["negatives"] == "class")
        if self.train_labels is not None:
            self.sampler.observe(torch.arange(num_samples), self.train_labels)

    def distill(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        if not self.hp["beta"]:
            return {}
        rows = batch.y.numel()
        v_s = self.embed_s(s.embedding[:rows]).float()
        v_t = self.embed_t(t.embedding[:rows]).float()
        self.sampler.observe(batch.index, batch.y)
        contrast = self.sampler.draw(batch.index, batch.y, self.hp["K"])
        loss = crd_objective(self.memory, v_s, v_t, contrast, self.hp["tau"])
        self.memory.update(batch.index, v_s, v_t)
        return {"crd": self.hp["beta"] * loss}
