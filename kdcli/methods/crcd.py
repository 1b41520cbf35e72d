"""CRCD: complementary relation contrastive distillation (feature and gradient relations, NCE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import full_precision, kd_loss
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.methods.crd import check_contrast_options, crd_objective
from kdcli.methods.heads import Embed
from kdcli.methods.memory import ContrastMemory, NegativeSampler, gather_rows, nce_loss
from kdcli.models.features import Outputs

REL_EPS = 1e-6  # the reference adds it to every anchor-to-sample difference before normalising
EMBEDS = ("linear", "nonlinear", "nofc")
GRAD_LOSSES = ("crcd", "crd", "mse")
VARIANTS = ("paper", "code")


# ---- relation scores --------------------------------------------------------------------------
# For sample i, anchor j (a batch sample's entry in the other network's memory) and contrast
# entry k (k = 0 the sample's own memory row, k >= 1 its negatives), the reference builds
#   r_ij  = normalize(v_i - a_j + eps)          anchor -> sample, from the trained embedding
#   u_ijk = normalize(W_ik - a_j + eps)         anchor -> memory row, a constant
#   out_ijk = exp(<u_ijk, r_ij> / tau)
# by materialising u, a [B, B, K+1, d] tensor (1 GB per side at B=64, K=500). Here
#   <u_ijk, r_ij> = (<W_ik, r_ij> - <a_j, r_ij> + eps * sum(r_ij)) / ||W_ik - a_j + eps||
# needs only [B, B, K+1] blocks: one batched matmul, and the constant norms from a float64 Gram
# expansion (no cancellation trouble). When W_ik is the anchor itself (same dataset index) the
# difference is exactly 0 in the reference and u = normalize(eps * 1); those entries are set to
# that value directly. Blocks of samples bound the size of every intermediate (`chunk`).


def relation_rows_per_block(batch: int, k1: int, budget: int) -> int:
    """How many samples one block holds so that its [rows, batch, k1] scores stay within `budget`."""
    return max(1, min(batch, budget // (batch * k1)))


@torch.no_grad()
def relation_norms(rows: Tensor, anchors: Tensor, same: Tensor) -> Tensor:
    """||W_ik - a_j + eps|| as [c, B, K+1] for memory rows [c, K+1, d] and anchors [B, d]."""
    w, a = rows.double(), anchors.double()
    d = w.shape[-1]
    sq = torch.matmul(w, a.T).transpose(1, 2).mul(-2.0)
    sq += (torch.einsum("ckd,ckd->ck", w, w) + 2 * REL_EPS * w.sum(-1))[:, None, :]
    sq += (torch.einsum("bd,bd->b", a, a) - 2 * REL_EPS * a.sum(-1))[None, :, None]
    sq += d * REL_EPS**2
    dist = sq.clamp_min_(0).sqrt_().masked_fill_(same, REL_EPS * math.sqrt(d))
    return dist.clamp_min_(1e-12).to(rows.dtype)


def relation_scores(v: Tensor, anchors: Tensor, rows: Tensor, same: Tensor, tau: float) -> Tensor:
    """out [c, B, K+1] for samples v [c, d], anchors [B, d], their memory rows [c, K+1, d].

    `same[i, j, k]` marks memory rows that are the anchor itself (contrast index == anchor index).
    """
    rel = F.normalize(v[:, None, :] - anchors[None] + REL_EPS, dim=2)
    shift = REL_EPS * rel.sum(2, keepdim=True)
    num = torch.bmm(rel, rows.transpose(1, 2)) - (rel * anchors[None]).sum(2, keepdim=True) + shift
    num = torch.where(same, shift, num)
    return torch.exp(num / relation_norms(rows, anchors, same) / tau)


def relation_nce(
    memory: ContrastMemory, side: int, v: Tensor, index: Tensor, contrast: Tensor, tau: float, budget: int
) -> Tensor:
    """NCE over the B*B (sample, anchor) rows of one side; anchors and contrast rows from the other bank.

    side 0: student embeddings against teacher memory; side 1: the reverse. Several blocks are
    each recomputed in backward (activation checkpointing), so memory stays within the budget;
    gathered rows are copies, so the memory update that follows cannot change a recomputation.
    """
    bank = memory.teacher if side == 0 else memory.student
    batch, k1 = contrast.shape
    anchors, rows = gather_rows(bank, index), gather_rows(bank, contrast)
    step = relation_rows_per_block(batch, k1, budget)
    starts = range(0, batch, step)

    def scores(v_block: Tensor, rows_block: Tensor, contrast_block: Tensor) -> Tensor:
        same = contrast_block[:, None, :] == index[None, :, None]
        return relation_scores(v_block, anchors, rows_block, same, tau)

    def blocks(a: int) -> tuple[Tensor, Tensor, Tensor]:
        return v[a : a + step], rows[a : a + step], contrast[a : a + step]

    def first_mean() -> Tensor:
        return sum(scores(*blocks(a)).sum() for a in starts) / (batch * batch * k1)

    z = memory.constant(side, first_mean)

    def block_loss(v_block: Tensor, rows_block: Tensor, contrast_block: Tensor) -> Tensor:
        out = scores(v_block, rows_block, contrast_block).reshape(-1, k1)
        return nce_loss(out, z, memory.num_samples) * out.shape[0]

    if len(starts) == 1:
        return block_loss(v, rows, contrast) / (batch * batch)
    total = sum(checkpoint(block_loss, *blocks(a), use_reentrant=False) for a in starts)
    return total / (batch * batch)


@full_precision
def crcd_objective(
    memory: ContrastMemory, v_s: Tensor, v_t: Tensor, index: Tensor, contrast: Tensor, tau: float, budget: int
) -> Tensor:
    """L_rel = L_nce(P_s) + L_nce(P_t) over anchor-based relations (crcd.md); memory read before update.

    In fp32 outside autocast, like every loss: tau = 0.07 magnifies bf16 rounding of the relations."""
    return relation_nce(memory, 0, v_s, index, contrast, tau, budget) + relation_nce(memory, 1, v_t, index, contrast, tau, budget)


def teacher_gradient(logits: Tensor, target: Tensor, weight: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """d CE(logits, target) / d f for logits = f W^T + b, CE averaged over the batch: (softmax - q) W / B.

    q is the target distribution: one-hot, or with label smoothing eps (1 - eps) one-hot + eps / K, so the
    teacher's gradient is taken of the same loss as the student's."""
    classes = logits.shape[1]
    q = F.one_hot(target, classes).float() * (1.0 - label_smoothing) + label_smoothing / classes
    residual = torch.softmax(logits.float(), dim=1) - q
    return residual @ weight.float() / logits.shape[0]


class _Normalized(nn.Module):
    """A projection followed by L2 normalisation of each row."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.body(x.reshape(x.shape[0], -1)), dim=1)


def relation_head(dim_in: int, dim_out: int, kind: str) -> nn.Module:
    """CRCD's `Embed`: linear (CRD's head), nonlinear (3-layer MLP) or nofc (normalisation only)."""
    if kind == "linear":
        return Embed(dim_in, dim_out)
    if kind == "nofc":
        return _Normalized(nn.Identity())
    return _Normalized(nn.Sequential(
        nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True),
        nn.Linear(dim_in, dim_out), nn.ReLU(inplace=True),
        nn.Linear(dim_out, dim_out),
    ))


@register("crcd")
class CRCD(Method):
    """Zhu et al.: contrast anchor-based relations of the embeddings and of their CE gradients.

    Paper intent (default, crcd.md's recommendation):
    `L = ce*CE + w*(kd*KD + beta*(L_rel(f) + grad*L_grad))`, where `w` is 0 in the last
    `round(off_frac * epochs)` epochs (10 of 250) and 1 before, and `L_grad` is the relation
    loss on the gradients dCE/df (`grad_loss=crcd`, own heads and memory), CRD's loss on them
    (`crd`), or the script's `10 * (1 - mean cos(g_t, g_s))` (`mse`).
    `variant=code` combines the gradient term as the released script does:
    `L = ce*CE + w*(kd*KD + beta*L_rel(f)) + kd*KD*grad*L_grad` (a product, never switched off);
    with `grad_loss=mse` that is the script's default configuration.
    """

    title = "Complementary Relation Contrastive Distillation"
    paper = "Zhu, Tang, Chen, Yu, Liu, Rong, Yang & Wang, CVPR 2021 (arXiv 2103.16367)"
    year = 2021
    needs = Needs(embedding=True, index=True, teacher_head=True)
    defaults = {
        "ce": 1.0, "kd": 0.9, "T": 4.0, "beta": 1.0,
        "grad": 1.0,  # weight of the gradient-relation term (grad_kd_weight)
        "grad_loss": "crcd",  # crcd | crd | mse: the loss put on the gradients dCE/df
        "dim": 128,  # embedding width of the heads and banks (feat_dim)
        "K": 500,  # negatives per sample (nce_k)
        "tau": 0.05,  # temperature (nce_t)
        "momentum": 0.5,  # memory update momentum (nce_m)
        "embed": "linear",  # linear | nonlinear | nofc
        "off_frac": 0.04,  # distillation off in this last fraction of the epochs (10 of 250)
        "variant": "paper",  # paper | code: how the gradient term enters the loss (see the class doc)
        "negatives": "class",  # "class": other classes only (the reference sampler); "any": all other samples
        "chunk": 1 << 22,  # most relation scores (samples x anchors x (K+1)) one block computes at once
    }
    ranges = {
        "beta": "nonnegative", "grad": "nonnegative", "dim": "count", "K": "count", "tau": "positive",
        "momentum": "fraction", "off_frac": "fraction", "chunk": "count",
    }

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        hp = self.hp
        check_contrast_options(hp, student, teacher, num_samples)
        self._check_options(student, teacher, teacher_head)
        dim = student.embedding if hp["embed"] == "nofc" else hp["dim"]
        self.embed_s = relation_head(student.embedding, dim, hp["embed"])
        self.embed_t = relation_head(teacher.embedding, dim, hp["embed"])
        self.memory = ContrastMemory(num_samples, dim, hp["momentum"], normalized_init=True)
        if self.uses_gradients and hp["grad_loss"] != "mse":
            self.grad_embed_s = relation_head(student.embedding, dim, hp["embed"])
            self.grad_embed_t = relation_head(teacher.embedding, dim, hp["embed"])
            self.grad_memory = ContrastMemory(num_samples, dim, hp["momentum"], normalized_init=hp["grad_loss"] == "crcd")
        self.sampler = NegativeSampler(num_samples, class_aware=hp["negatives"] == "class")
        if self.train_labels is not None:
            self.sampler.observe(torch.arange(num_samples), self.train_labels)
        self.mimic = True

    @property
    def uses_gradients(self) -> bool:
        """Whether the gradient term can be non-zero (it is a product with KD in the code variant)."""
        hp = self.hp
        return bool(hp["grad"] and (hp["beta"] if hp["variant"] == "paper" else hp["kd"]))

    def _check_options(self, student: Shapes, teacher: Shapes, teacher_head) -> None:
        hp = self.hp
        for key, choices in (("embed", EMBEDS), ("grad_loss", GRAD_LOSSES), ("variant", VARIANTS)):
            if hp[key] not in choices:
                raise KdError(f"{key}={hp[key]!r} is not one of {', '.join(choices)}", f"e.g. --set {key}={choices[0]}")
        if not 0 <= hp["off_frac"] <= 1 or hp["chunk"] < 1 or hp["grad"] < 0:
            raise KdError(
                f"need 0 <= off_frac <= 1, chunk >= 1, grad >= 0; got off_frac={hp['off_frac']} chunk={hp['chunk']} grad={hp['grad']}",
                "e.g. --set off_frac=0.04",
            )
        same_width = student.embedding == teacher.embedding
        if hp["embed"] == "nofc" and not same_width:
            raise KdError(
                f"embed=nofc needs embeddings of equal width, got student {student.embedding} and teacher {teacher.embedding}",
                "use --set embed=linear",
            )
        if self.uses_gradients and hp["grad_loss"] == "mse" and not same_width:
            raise KdError(
                f"grad_loss=mse compares gradients directly and needs embeddings of equal width, "
                f"got student {student.embedding} and teacher {teacher.embedding}",
                "use --set grad_loss=crcd",
            )
        if self.uses_gradients and teacher_head is None:
            raise KdError("CRCD's gradient term needs the teacher's final Linear classifier", "use --set grad=0 to leave it out")

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self.mimic = epoch <= epochs - round(self.hp["off_frac"] * epochs)

    def epoch_metrics(self) -> dict[str, float]:
        return {"mimic_weight": float(self.mimic)}

    def forward(self, s: Outputs, t: Outputs, batch: Batch) -> dict[str, Tensor]:
        hp = self.hp
        rows = batch.y.numel()
        logits = s.logits[:rows]
        ce = self.cross_entropy(logits, batch.y)
        terms = {"ce": hp["ce"] * ce} if hp["ce"] else {}
        gradient_term = self.uses_gradients and (self.mimic or hp["variant"] == "code")
        kd = kd_loss(logits, t.logits[:rows], hp["T"]) if hp["kd"] and (self.mimic or gradient_term) else None
        if self.mimic and kd is not None:
            terms["kd"] = hp["kd"] * kd
        if not (self.mimic and hp["beta"]) and not gradient_term:
            return terms
        self.sampler.observe(batch.index, batch.y)
        contrast = self.sampler.draw(batch.index, batch.y, hp["K"])
        if self.mimic and hp["beta"]:
            v_s = self.embed_s(s.embedding[:rows]).float()
            v_t = self.embed_t(t.embedding[:rows]).float()
            terms["crcd"] = hp["beta"] * crcd_objective(self.memory, v_s, v_t, batch.index, contrast, hp["tau"], hp["chunk"])
            self.memory.update(batch.index, v_s, v_t)
        if gradient_term:
            weight = hp["beta"] if hp["variant"] == "paper" else hp["kd"] * kd
            terms["crcd_grad"] = weight * hp["grad"] * self._gradient_loss(ce, s, t, batch, contrast)
        return terms

    def _gradient_loss(self, ce: Tensor, s: Outputs, t: Outputs, batch: Batch, contrast: Tensor) -> Tensor:
        """The loss between dCE/df of both networks: the student's by autograd (create_graph, so it
        trains), the frozen teacher's in closed form from its classifier."""
        rows = batch.y.numel()
        (g_s,) = torch.autograd.grad(ce, s.embedding, create_graph=True, allow_unused=True)
        if g_s is None:
            raise KdError(
                "the student's logits do not depend on its embedding tensor, so dCE/df cannot be taken",
                "use a student from the CIFAR zoo, or --set grad=0",
            )
        g_s = g_s[:rows]
        g_t = teacher_gradient(t.logits[:rows], batch.y, self.teacher_head_weight, self.label_smoothing)
        if self.hp["grad_loss"] == "mse":
            return 10.0 * (1.0 - F.cosine_similarity(g_t, g_s.float(), dim=1).mean())
        v_s = self.grad_embed_s(g_s).float()
        v_t = self.grad_embed_t(g_t).float()
        if self.hp["grad_loss"] == "crcd":
            loss = crcd_objective(self.grad_memory, v_s, v_t, batch.index, contrast, self.hp["tau"], self.hp["chunk"])
        else:
            loss = crd_objective(self.grad_memory, v_s, v_t, contrast, self.hp["tau"])
        self.grad_memory.update(batch.index, v_s, v_t)
        return loss
