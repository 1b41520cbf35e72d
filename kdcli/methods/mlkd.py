"""Multi-level KD via knowledge alignment and correlation (Ding et al.; journal version "DLKD").

Not Jin et al.'s multi-level *logit* distillation (CVPR 2023), which later papers also call
"MLKD": that one is registered as `mlld`.

Every batch arrives with three rotated copies of each image (`Needs(views="rotations")`), so the
networks' outputs have 4B rows: the B plain images first, then the 90, 180 and 270 degree views,
B rows each. The reference code (`ifding/DLKD`) interleaves the four views of each image instead;
every term below is invariant to that reordering (row means, and the same column order for
student and teacher), so the values equal the reference's on the same images. One data-level
difference stays: the reference flips an image once for all four copies, while the loader here
crops and flips each rotated view independently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.losses import full_precision
from kdcli.methods.base import Method, Needs, Shapes, register
from kdcli.methods.heads import Embed
from kdcli.models.features import Outputs

VIEWS = 4  # the plain image and its three rotations
_SUPCON_EPS = 1e-7  # inside the log of the SupCon denominator, as in the reference


def _cosine_matrix(rows: Tensor, columns: Tensor) -> Tensor:
    """[R, C] cosine similarities (norms clamped at 1e-8, as F.cosine_similarity)."""
    return F.normalize(rows, dim=1, eps=1e-8) @ F.normalize(columns, dim=1, eps=1e-8).t()


@full_precision
def correlation_loss(student: Tensor, teacher: Tensor, batch_size: int, temperature: float = 0.5) -> Tensor:
    """Knowledge correlation: how each rotated view relates to the batch's plain views.

    `student` (the correlation head's output) and `teacher` (raw teacher embeddings) are [4B, d]
    with the B plain views first. For each of the 3B rotated views, the softmax over the B plain
    views of cosine similarity / temperature is computed in both networks; the loss is
    KL(teacher || student) summed over the B columns and averaged over the 3B rows.
    """
    s_sim = _cosine_matrix(student[batch_size:], student[:batch_size])
    t_sim = _cosine_matrix(teacher[batch_size:], teacher[:batch_size]).detach()
    log_q = F.log_softmax(s_sim / temperature, dim=1)
    p = F.softmax(t_sim / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


@full_precision
def supcon_loss(
    student: Tensor, teacher: Tensor, labels: Tensor, temperature: float = 0.07, base_temperature: float = 0.07
) -> Tensor:
    """Supervised contrastive loss (Khosla et al.) over the student and teacher embeddings together.

    `student`, `teacher`: [N, D] unit vectors, `labels`: [N]. The 2N anchors are the rows of
    [student; teacher]; the positives of an anchor are all other rows of its class (its own
    counterpart in the other network included), the denominator runs over all other rows. The
    loss is -(temperature / base_temperature) times the mean over anchors of the mean positive
    log-probability; logits are shifted by their row max and eps 1e-7 sits inside the log.
    """
    features = torch.cat([student, teacher])
    classes = labels.repeat(2)
    logits = features @ features.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(len(features), dtype=torch.bool, device=features.device)
    positive = (classes[:, None] == classes[None, :]) & not_self
    denominator = (logits.exp() * not_self).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(denominator + _SUPCON_EPS)
    mean_positive = (log_prob * positive).sum(dim=1) / positive.sum(dim=1)
    return -(temperature / base_temperature) * mean_positive.mean()


@full_precision
def alignment_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL-style alignment: 2 - 2 * mean cosine between each prediction and its target row."""
    cosine = (F.normalize(prediction, dim=1) * F.normalize(target, dim=1)).sum(dim=1)
    return 2 - 2 * cosine.mean()


def mlp_head(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear (the reference's MLPHead)."""
    return nn.Sequential(
        nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out)
    )


@register("mlkd")
class MultiLevelKD(Method):
    """Ding et al.: knowledge alignment plus knowledge correlation on four rotated views.

    L = ce*CE(plain views) + corr*L_corr + supcon*L_sup + align*L_align (+ kd*KD, off by default
    as in the released scripts; when on, on the plain views like CE), on pooled embeddings:
      L_corr  `correlation_loss` of corr_head(f_s) against the raw teacher embeddings (tau_corr);
      L_sup   `supcon_loss` of the L2-normalised linear embeddings embed_s(f_s), embed_t(f_t)
              (`dim`), all 4B views labelled with their image's class (tau_sup, tau_base);
      L_align `alignment_loss` of align_head(f_s) (hidden width align_width * d_t) onto f_t.
    All four heads (the teacher-side embed_t included) train with the student's optimizer.
    Defaults: the CIFAR-100 script (`scripts/run_cifar_mlkd.sh`: -r 1 -a 50 -b 1 -d 20); the
    ImageNet script uses corr 20, supcon 0.5, align 10.
    """

    title = "Multi-level KD via Knowledge Alignment and Correlation (Ding et al.; DLKD)"
    paper = (
        "Ding, Yang, Hu, Krovi & Luo, arXiv 2012.00573 (2020); journal version 'Dual-Level Knowledge "
        "Distillation via Knowledge Alignment and Correlation' (DLKD), IEEE TNNLS 2024. "
        "Not Jin et al.'s multi-level logit KD (CVPR 2023): that is `mlld`"
    )
    year = 2020
    needs = Needs(embedding=True, views="rotations")
    defaults = {
        "ce": 1.0,
        "kd": 0.0,
        "T": 4.0,
        "corr": 50.0,
        "supcon": 1.0,
        "align": 20.0,
        "tau_corr": 0.5,
        "tau_sup": 0.07,
        "tau_base": 0.07,
        "dim": 128,
        "align_width": 16,
    }
    ranges = {
        "corr": "nonnegative", "supcon": "nonnegative", "align": "nonnegative", "tau_corr": "positive",
        "tau_sup": "positive", "tau_base": "positive", "dim": "count", "align_width": "count",
    }

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams):
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        d_s, d_t = student.embedding, teacher.embedding
        if d_s < 1 or d_t < 1:
            network = "student" if d_s < 1 else "teacher"
            raise KdError(
                f"the {network} exposes no pooled embedding, which mlkd needs", "pick another architecture"
            )
        for key in ("dim", "align_width"):
            if self.hp[key] < 1:
                raise KdError(
                    f"mlkd option {key}={self.hp[key]} must be a positive integer",
                    f"e.g. --set {key}={self.defaults[key]}",
                )
        self.corr_head = mlp_head(d_s, d_s, d_s)
        self.embed_s = Embed(d_s, self.hp["dim"])
        self.embed_t = Embed(d_t, self.hp["dim"])
        self.align_head = mlp_head(d_s, self.hp["align_width"] * d_t, d_t)

    def forward(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        """CE (and optional KD) on the plain views' logits; the distillation terms on all 4B rows."""
        plain = batch.y.numel()
        if s.embedding.shape[0] != VIEWS * plain:
            raise KdError(
                f"mlkd needs each batch with its 3 rotated views ({VIEWS * plain} rows), got {s.embedding.shape[0]}",
                "run mlkd through `kd distill` on an in-memory dataset, which builds the rotations",
            )
        return super().forward(s._replace(logits=s.logits[:plain]), t._replace(logits=t.logits[:plain]), batch)

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        f_s, f_t = s.embedding, t.embedding.detach()
        hp = self.hp
        terms: dict[str, Tensor] = {}
        if hp["corr"]:
            terms["corr"] = hp["corr"] * correlation_loss(self.corr_head(f_s), f_t, batch.y.numel(), hp["tau_corr"])
        if hp["supcon"]:
            labels = batch.y.repeat(VIEWS)  # the views are stacked view-major, B rows each
            terms["supcon"] = hp["supcon"] * supcon_loss(
                self.embed_s(f_s), self.embed_t(f_t), labels, hp["tau_sup"], hp["tau_base"]
            )
        if hp["align"]:
            terms["align"] = hp["align"] * alignment_loss(self.align_head(f_s), f_t)
        return terms
