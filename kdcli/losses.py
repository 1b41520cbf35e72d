"""Stateless distillation losses, numerically equal to the papers' reference formulas.

Names and argument order are public API (see design.md). Every function works in float32 and
float64; half-precision inputs are promoted to float32 and autocast is switched off inside, because
Gram matrices and log-probabilities lose too much in fp16/bf16 (DKD's log(p_target) hits log(0)).

Teacher tensors are used as given: the engine computes them under no_grad, and a caller that wants
a gradient through the teacher side (e.g. CTKD's learned temperature) gets it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.pooling import adaptive_avg_pool2d

_Loss = TypeVar("_Loss", bound=Callable[..., Tensor])

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def full_precision(fn: _Loss) -> _Loss:
    """Run `fn` outside autocast, with fp16/bf16 tensor arguments (and tensors in list arguments) promoted to float32."""

    def promote(value):
        if isinstance(value, Tensor) and value.dtype in _LOW_PRECISION:
            return value.float()
        if isinstance(value, (list, tuple)):  # lists of feature maps (fsp, kdsvd, hcl)
            return type(value)(promote(v) for v in value)
        return value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(promote(a) for a in args)
        kwargs = {k: promote(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _as_column(temperature: float | Tensor) -> float | Tensor:
    """A per-sample temperature [B] as [B, 1], so it divides the rows of [B, C] logits."""
    if isinstance(temperature, Tensor) and temperature.ndim == 1:
        return temperature.unsqueeze(1)
    return temperature


def _batch_mean_times_t2(per_sample: Tensor, temperature: float | Tensor) -> Tensor:
    """Mean over the batch of per-sample losses, each scaled by its own T^2."""
    if isinstance(temperature, Tensor):
        return (per_sample * temperature.reshape(-1) ** 2).mean()
    return per_sample.mean() * temperature**2


def _kl_rows(log_q: Tensor, p: Tensor) -> Tensor:
    """KL(p || q) of each row, summed over the last dim (0 * log 0 counted as 0)."""
    return F.kl_div(log_q, p, reduction="none").sum(dim=1)


@full_precision
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor) -> Tensor:
    """Hinton's KD: KL(softmax(t/T) || softmax(s/T)) summed over classes, batch mean, times T^2.

    `temperature` may be a scalar or a per-sample tensor of shape [B] (instance temperatures).
    """
    temperature = _as_column(temperature)
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    per_sample = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return _batch_mean_times_t2(per_sample, temperature)


def _row_normalized_gram(feature: Tensor) -> Tensor:
    flat = feature.reshape(feature.shape[0], -1)
    return F.normalize(flat @ flat.t(), p=2, dim=1, eps=1e-12)


@full_precision
def sp_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori) for one layer pair; a scalar.

    Features [B, ...] are flattened per sample; each row of the B x B Gram matrix is L2-normalised
    (RepDistiller's `F.normalize(G)`, eps 1e-12, not the Frobenius norm); the loss is the squared
    Frobenius distance of the two normalised Grams divided by B^2. Channel and spatial sizes of
    student and teacher may differ. Several pairs: sum the calls.
    """
    batch = student_feature.shape[0]
    diff = _row_normalized_gram(teacher_feature) - _row_normalized_gram(student_feature)
    return diff.pow(2).sum() / (batch * batch)


def _attention_map(feature: Tensor, p: float) -> Tensor:
    """Channel mean of F^p, flattened over space and L2-normalised per sample: [B, H*W]."""
    energy = feature.pow(p).mean(dim=1).reshape(feature.shape[0], -1)
    return F.normalize(energy, p=2, dim=1, eps=1e-12)


@full_precision
def at_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis) for one stage pair [B, C, H, W]; a scalar.

    Mean over B and H*W of the squared difference of the normalised attention maps, as in
    RepDistiller/mdistiller (sum the calls over stages). When spatial sizes differ the larger map
    (by H*W) is adaptive-average-pooled to the smaller one's (H, W); for the square maps of the
    reference this is exactly its rule. F^p is the plain elementwise power, as in the reference.
    """
    s_size, t_size = student_feature.shape[2:], teacher_feature.shape[2:]
    if s_size != t_size:
        if s_size.numel() > t_size.numel():
            student_feature = adaptive_avg_pool2d(student_feature, tuple(t_size))
        else:
            teacher_feature = adaptive_avg_pool2d(teacher_feature, tuple(s_size))
    diff = _attention_map(student_feature, p) - _attention_map(teacher_feature, p)
    return diff.pow(2).mean()


def _pairwise_differences(embedding: Tensor) -> Tensor:
    """[B, B, d] with entry (i, j) = e_j - e_i."""
    flat = embedding.reshape(embedding.shape[0], -1)
    return flat.unsqueeze(0) - flat.unsqueeze(1)


def _mean_normalized_distances(diff: Tensor) -> Tensor:
    """Euclidean distances (squared clamped at 1e-12, zero diagonal) over their mean off zeros."""
    batch = diff.shape[0]
    dist = diff.pow(2).sum(dim=2).clamp(min=1e-12).sqrt()
    dist = dist.masked_fill(torch.eye(batch, dtype=torch.bool, device=dist.device), 0.0)
    # mean over the positive entries; zero entries add nothing to the sum
    return dist / (dist.sum() / (dist > 0).sum())


def _angles(diff: Tensor) -> Tensor:
    """Cosines <u_ij, u_ik> of unit difference vectors u_ij = normalize(e_j - e_i), flattened."""
    unit = F.normalize(diff, p=2, dim=2, eps=1e-12)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


@full_precision
def rkd_loss(
    student_embedding: Tensor,
    teacher_embedding: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """Relational KD (Park et al.): weighted smooth-L1 (delta 1, mean) on distance and angle relations.

    Distances are divided by their mean over positive entries; angles are the B^3 cosines at each
    anchor. Distances are taken from explicit differences rather than RepDistiller's
    |a|^2 + |b|^2 - 2ab expansion: the same formula, without its float32 cancellation. The
    reference computes the teacher side under no_grad; here that is the caller's job.
    """
    s_diff = _pairwise_differences(student_embedding)
    t_diff = _pairwise_differences(teacher_embedding)
    distance = F.smooth_l1_loss(_mean_normalized_distances(s_diff), _mean_normalized_distances(t_diff))
    angle = F.smooth_l1_loss(_angles(s_diff), _angles(t_diff))
    return distance_weight * distance + angle_weight * angle


_PKT_EPS = 1e-7


def _cosine_conditional(embedding: Tensor) -> Tensor:
    """Row-normalised cosine kernel (cos + 1) / 2 over the batch, diagonal included: [B, B]."""
    flat = embedding.reshape(embedding.shape[0], -1)
    unit = flat / (torch.linalg.vector_norm(flat, dim=1, keepdim=True) + _PKT_EPS)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@full_precision
def pkt_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas): KL of cosine-kernel conditionals.

    Reference-code details kept: eps 1e-7 in the norm and inside the log ratio, and the reduction is
    the mean over all B*B entries (not a per-row sum) — the 3e4 weight is calibrated for that.
    """
    p_s = _cosine_conditional(student_embedding)
    p_t = _cosine_conditional(teacher_embedding)
    return (p_t * torch.log((p_t + _PKT_EPS) / (p_s + _PKT_EPS))).mean()


@full_precision
def hint_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNet hint loss: mean squared error over all elements (nn.MSELoss default).

    `student_feature` is the output of the method's regressor, already in the teacher's shape.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"hint_loss needs equal shapes, got student {tuple(student_feature.shape)} "
            f"and teacher {tuple(teacher_feature.shape)}"
        )
    return F.mse_loss(student_feature, teacher_feature)


def _target_and_rest(probs: Tensor, is_target: Tensor) -> Tensor:
    """[B, 2]: probability of the target class and the summed probability of all others."""
    zero = torch.zeros_like(probs)
    return torch.stack(
        (torch.where(is_target, probs, zero).sum(dim=1), torch.where(is_target, zero, probs).sum(dim=1)),
        dim=1,
    )


@full_precision
def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float | Tensor = 4.0,
) -> Tensor:
    """Decoupled KD (Zhao et al.): alpha * TCKD + beta * NCKD, each T^2 * batch-mean KL.

    As mdistiller's code: TCKD compares [p_target, sum of the other p] with the student side as
    log of those sums; NCKD applies softmax to z/T - 1000 * onehot(target). The warm-up ramp is
    the method's job. `temperature` may also be a per-sample tensor [B] (ITKD); then each sample's
    KL is scaled by its own T^2 (the per-instance form, not ITKD's broadcast slip).
    """
    temperature = _as_column(temperature)
    scaled_s = student_logits / temperature
    scaled_t = teacher_logits / temperature
    is_target = F.one_hot(target, student_logits.shape[1]).bool()

    binary_s = _target_and_rest(F.softmax(scaled_s, dim=1), is_target)
    binary_t = _target_and_rest(F.softmax(scaled_t, dim=1), is_target)
    tckd = _kl_rows(torch.log(binary_s), binary_t)

    push_out = 1000.0 * is_target.to(scaled_s.dtype)
    log_rest_s = F.log_softmax(scaled_s - push_out, dim=1)
    rest_t = F.softmax(scaled_t - push_out, dim=1)
    nckd = _kl_rows(log_rest_s, rest_t)

    return _batch_mean_times_t2(alpha * tckd + beta * nckd, temperature)


@full_precision
def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardisation (Sun et al.): per-sample Z-score over the class (last) dim.

    As the released code: (x - mean) / (eps + std) with torch's unbiased std (1/(C-1)), not the
    paper's population std. The base temperature is applied afterwards by the KD loss (x / T).
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (eps + std)


# Multi-level logit distillation (Jin et al., CVPR 2023; registered as `mlld`).

MLLD_TEMPERATURES: tuple[float, ...] = (4.0, 3.0, 5.0, 2.0, 6.0)
"""The released code's temperatures: the configured one (4 on CIFAR) followed by 3, 5, 2, 6."""


def mlld_temperatures(temperature: float = 4.0) -> tuple[float, ...]:
    """The MLLD temperature set with `temperature` in place of the configured first entry."""
    return (float(temperature), *MLLD_TEMPERATURES[1:])


@full_precision
def mlld_instance_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperatures: Sequence[float] = MLLD_TEMPERATURES
) -> Tensor:
    """Instance level: sum over `temperatures` of `kd_loss` (T^2 * batch-mean KL) on [B, C] logits."""
    return sum(kd_loss(student_logits, teacher_logits, t) for t in temperatures)


def _gram_gap(student_logits: Tensor, teacher_logits: Tensor, temperature: float, classes: bool) -> Tensor:
    """||G_t - G_s||_F^2 of the softened predictions' Gram: P^T P (classes) or P P^T (samples)."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    if classes:
        p_s, p_t = p_s.t(), p_t.t()
    return (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum()


@full_precision
def mlld_batch_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperatures: Sequence[float] = MLLD_TEMPERATURES
) -> Tensor:
    """Batch level: sum over `temperatures` of ||P_t P_t^T - P_s P_s^T||_F^2 / B (no T^2 factor)."""
    batch = student_logits.shape[0]
    return sum(_gram_gap(student_logits, teacher_logits, t, classes=False) for t in temperatures) / batch


@full_precision
def mlld_class_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperatures: Sequence[float] = MLLD_TEMPERATURES
) -> Tensor:
    """Class level: sum over `temperatures` of ||P_t^T P_t - P_s^T P_s||_F^2 / C (no T^2 factor)."""
    classes = student_logits.shape[1]
    return sum(_gram_gap(student_logits, teacher_logits, t, classes=True) for t in temperatures) / classes


@full_precision
def mlld_mask_fractions(teacher_logits_weak: Tensor) -> tuple[Tensor, Tensor]:
    """Fractions of True entries in the released code's confidence masks (no grad), as 0-dim tensors.

    Sample mask: max softmax probability (T = 1) <= its batch median; class mask: summed class
    probability <= its median over classes. Medians by linear interpolation (np.percentile 50).
    The code multiplies already-reduced losses by these masks and averages, so only these
    fractions matter: 0.5 without ties, more with ties (e.g. saturated confidences), 32/63 at B = 63.
    """
    probs = F.softmax(teacher_logits_weak.detach(), dim=1)
    confidence = probs.max(dim=1).values
    class_confidence = probs.sum(dim=0)
    fractions = [(x <= torch.quantile(x, 0.5)).to(x.dtype).mean() for x in (confidence, class_confidence)]
    return fractions[0], fractions[1]


@full_precision
def mlld_loss_terms(
    student_weak: Tensor,
    teacher_weak: Tensor,
    student_strong: Tensor,
    teacher_strong: Tensor,
    temperature: float = 4.0,
    mask_fraction: float | None = 0.5,
    logit_standardization: bool = False,
) -> dict[str, Tensor]:
    """MLLD's three distillation terms, combined exactly as the released code; no CE, no weight.

    Arguments are [B, C] logits of the weak and strong views (teacher ones without grad);
    `temperature` is the configured one (4 on CIFAR, 1 on ImageNet, the base temperature with logit
    standardisation), joined by 3, 5, 2, 6. Returns, with T the temperature set and rho the mask
    fraction:
      "instance": rho * I_T(weak) + I_{temperature,3,5}(strong) + I_{2,6}(weak)
                  (the code's strong term uses the weak logits at T = 2 and 6; kept on purpose),
      "class":    rho_class * C_T(weak),
      "batch":    rho * B_T(weak)   (the strong-view class/batch terms are not in the code's total).
    `mask_fraction`: 0.5 (default) is what the code's confidence masks reduce to without ties (see
    `mlld_mask_fractions`); None computes rho and rho_class from `teacher_weak` as the code does.
    `logit_standardization` (MLKD+LS): Z-score the logits of the instance terms only; the masks and
    the Gram terms keep the raw logits, as in the logit-standardization repo.
    """
    if mask_fraction is None:
        rho, rho_class = mlld_mask_fractions(teacher_weak)
    else:
        rho = rho_class = mask_fraction
    temps = mlld_temperatures(temperature)
    if logit_standardization:
        i_s_weak, i_t_weak = standardize_logits(student_weak), standardize_logits(teacher_weak)
        i_s_strong, i_t_strong = standardize_logits(student_strong), standardize_logits(teacher_strong)
    else:
        i_s_weak, i_t_weak, i_s_strong, i_t_strong = student_weak, teacher_weak, student_strong, teacher_strong
    instance = (
        rho * mlld_instance_loss(i_s_weak, i_t_weak, temps)
        + mlld_instance_loss(i_s_strong, i_t_strong, temps[:3])
        + mlld_instance_loss(i_s_weak, i_t_weak, temps[3:])
    )
    return {
        "instance": instance,
        "class": rho_class * mlld_class_loss(student_weak, teacher_weak, temps),
        "batch": rho * mlld_batch_loss(student_weak, teacher_weak, temps),
    }


def mlld_loss(
    student_weak: Tensor,
    teacher_weak: Tensor,
    student_strong: Tensor,
    teacher_strong: Tensor,
    temperature: float = 4.0,
    mask_fraction: float | None = 0.5,
    logit_standardization: bool = False,
) -> Tensor:
    """Sum of `mlld_loss_terms` (same arguments): the code's loss_kd + loss_cc + loss_bc over lambda."""
    terms = mlld_loss_terms(
        student_weak, teacher_weak, student_strong, teacher_strong,
        temperature, mask_fraction, logit_standardization,
    )
    return terms["instance"] + terms["class"] + terms["batch"]


# ---- the RepDistiller / mdistiller zoo: cc, vid, nst, fsp, ft, ab, kdsvd, ofd, reviewkd, dist ------


def _pool_to_smaller(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """RepDistiller's rule for square maps: the map with the larger height is average-pooled to the other's size."""
    h_s, h_t = student.shape[2], teacher.shape[2]
    if h_s > h_t:
        student = adaptive_avg_pool2d(student, tuple(teacher.shape[2:]))
    elif h_s < h_t:
        teacher = adaptive_avg_pool2d(teacher, tuple(student.shape[2:]))
    return student, teacher


@full_precision
def cc_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Correlation congruence (Peng et al.), the authors' compact form used by RepDistiller.

    With D = |f_s - f_t| on [B, d] (the method's head outputs), the sum over features of
    D[i] * D[i+1] for neighbouring rows of the batch, averaged over the B - 1 pairs.
    """
    delta = (student_embedding - teacher_embedding).abs().reshape(student_embedding.shape[0], -1)
    if delta.shape[0] < 2:  # a last batch of one sample has no neighbouring pair: no signal, not NaN
        return delta.sum() * 0.0
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@full_precision
def vid_loss(pred_mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Variational information distillation (Ahn et al.) for one stage: Gaussian negative log-likelihood.

    `pred_mean` [B, C, H, W] (the regressor's output), `target` the teacher map of the same shape,
    `log_scale` [C] the per-channel parameter a with variance softplus(a) + eps. Mean over all
    elements of 0.5 * ((mu - t)^2 / var + log var); the 0.5 log(2 pi) constant is left out.
    """
    variance = (F.softplus(log_scale) + eps).reshape(1, -1, *([1] * (pred_mean.ndim - 2)))
    return (0.5 * ((pred_mean - target).pow(2) / variance + variance.log())).mean()


def _channel_maps(feature: Tensor) -> Tensor:
    """[B, C, H*W] with each channel's spatial map L2-normalised."""
    return F.normalize(feature.reshape(feature.shape[0], feature.shape[1], -1), p=2, dim=2, eps=1e-12)


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over batch and channel pairs of (a_i . b_j)^2 (degree-2 polynomial kernel, offset 0)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@full_precision
def nst_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Neuron selectivity transfer (Huang & Wang) for one stage pair: MMD^2 with the kernel (x^T y)^2.

    The map with the larger height is pooled to the other's size; each channel map is L2-normalised
    over space; mean(K_tt) + mean(K_ss) - 2 mean(K_st), each a plain mean over batch and channel
    pairs (RepDistiller / mdistiller), computed by batched matmul instead of their broadcast.
    """
    student_feature, teacher_feature = _pool_to_smaller(student_feature, teacher_feature)
    s, t = _channel_maps(student_feature), _channel_maps(teacher_feature)
    return _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(t, s)


def _fsp_matrix(lower: Tensor, upper: Tensor) -> Tensor:
    """[B, C_upper, C_lower]: spatial mean of the channel products of two consecutive maps."""
    lower, upper = _pool_to_smaller(lower, upper)
    a = lower.reshape(lower.shape[0], lower.shape[1], -1)
    b = upper.reshape(upper.shape[0], upper.shape[1], -1)
    return torch.bmm(b, a.transpose(1, 2)) / a.shape[2]


@full_precision
def fsp_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
    """Flow of solution procedure (Yim et al.): one FSP matrix per consecutive pair of maps.

    For each consecutive pair (lower, upper) of each list, G = upper . lower^T / (H*W) after pooling
    the larger map to the smaller; the loss is the sum over pairs of the mean squared difference
    of the student's and teacher's G. Channel counts must agree position by position.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"fsp_loss needs lists of equal length, got {len(student_features)} and {len(teacher_features)}")
    total = student_features[0].new_zeros(())
    for i in range(1, len(student_features)):
        g_s = _fsp_matrix(student_features[i - 1], student_features[i])
        g_t = _fsp_matrix(teacher_features[i - 1], teacher_features[i])
        if g_s.shape != g_t.shape:
            raise ValueError(f"fsp_loss needs equal channel counts, got {tuple(g_s.shape)} and {tuple(g_t.shape)} at pair {i}")
        total = total + (g_s - g_t).pow(2).mean()
    return total


def _factor(factor: Tensor, p1: float) -> Tensor:
    """RepDistiller's FT factor: channel mean of F^p1, flattened, L2-normalised per sample: [B, H*W]."""
    return F.normalize(factor.pow(p1).mean(dim=1).reshape(factor.shape[0], -1), p=2, dim=1, eps=1e-12)


@full_precision
def ft_loss(student_factor: Tensor, teacher_factor: Tensor, p1: float = 2, p2: float = 1) -> Tensor:
    """Factor transfer (Kim et al.) as RepDistiller: mean over B*H*W of |q_s - q_t|^p2.

    q is the L2-normalised channel mean of the factor to the power p1 (the larger map pooled to
    the smaller first); p2 = 1 is the absolute difference.
    """
    student_factor, teacher_factor = _pool_to_smaller(student_factor, teacher_factor)
    diff = _factor(student_factor, p1) - _factor(teacher_factor, p1)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


AB_SCALE = 3.0 / 1000.0
"""RepDistiller multiplies every activation-boundary pair loss by 3/1000."""


@full_precision
def ab_loss(student_feature: Tensor, teacher_feature: Tensor, margin: float = 1.0) -> Tensor:
    """Activation-boundary loss (Heo et al.) for one pre-ReLU stage pair, as RepDistiller scales it.

    Sum over all elements of (s + m)^2 where s > -m and the teacher is inactive (t <= 0), plus
    (s - m)^2 where s <= m and the teacher is active (t > 0); divided by the batch size, times
    3/1000. The per-layer weights 2^(l - n) are the method's.
    """
    inactive = (teacher_feature <= 0).to(student_feature.dtype)
    active = 1.0 - inactive
    loss = (student_feature + margin).pow(2) * (student_feature > -margin).to(student_feature.dtype) * inactive
    loss = loss + (student_feature - margin).pow(2) * (student_feature <= margin).to(student_feature.dtype) * active
    return loss.sum() / student_feature.shape[0] * AB_SCALE


def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _top_singular(feature: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The first n right-singular vectors [B, C, n] of the (positions x channels) matrix, and the
    singular values [B, n], each L2-normalised (non-finite entries zeroed first)."""
    x = feature.reshape(feature.shape[0], feature.shape[1], -1).transpose(1, 2)  # [B, H*W, C]
    if x.requires_grad:
        # SVD backward is unstable for (near-)repeated singular values: zero such gradients
        # instead of letting a NaN reach the weights
        x.register_hook(_finite)
    _, sigma, vh = torch.linalg.svd(x, full_matrices=False)
    v = _finite(vh.transpose(1, 2)[:, :, :n])
    return F.normalize(v, p=2, dim=1), F.normalize(_finite(sigma[:, :n]), p=2, dim=1)


def _aligned(student_v: Tensor, teacher_v: Tensor) -> Tensor:
    """For each teacher vector, the student vector with the largest |cosine|, sign-corrected: [B, C, k]."""
    cosine = student_v.transpose(1, 2) @ teacher_v  # [B, n_s, k]
    best = cosine.abs().argmax(dim=1, keepdim=True)  # [B, 1, k]
    sign = torch.sign(torch.gather(cosine, 1, best))
    picked = torch.gather(student_v, 2, best.expand(-1, student_v.shape[1], -1))
    return picked * sign


def _rbf(upper: Tensor, lower: Tensor) -> Tensor:
    """[B, C_upper, C_lower, k]: exp(-(v_upper[i] - v_lower[j])^2 / 8)."""
    return torch.exp(-(upper.unsqueeze(2) - lower.unsqueeze(1)).pow(2) / 8)


@full_precision
def kdsvd_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor], k: int = 1) -> Tensor:
    """SVD-based KD (Lee et al.) with the authors'/RepDistiller channel layout.

    Per stage: top right-singular vectors of the [H*W, C] matrix (k for the teacher, k + 3 for the
    student, the student's aligned and sign-corrected to the teacher's), both weighted by the
    teacher's normalised singular values; between consecutive stages the squared difference of the
    RBF correlations exp(-d^2/8), summed over all entries (non-finite ones zeroed), divided by B.
    Channel counts of student and teacher must agree per stage.
    """
    total = student_features[0].new_zeros(())
    previous: tuple[Tensor, Tensor] | None = None
    for f_s, f_t in zip(student_features, teacher_features):
        v_t, sigma_t = _top_singular(f_t, k)
        v_s, _ = _top_singular(f_s, k + 3)
        v_s = _aligned(v_s, v_t) * sigma_t.unsqueeze(1)
        v_t = v_t * sigma_t.unsqueeze(1)
        if previous is not None:
            gap = (_rbf(v_s, previous[0]) - _rbf(v_t, previous[1])).pow(2)
            total = total + _finite(gap).sum()
        previous = (v_s, v_t)
    return total / student_features[0].shape[0]


@full_precision
def hcl_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
    """ReviewKD's hierarchical context loss, summed over levels (pairs of equal-shape maps).

    Per level of height h: MSE at full size plus, for p in 4, 2, 1 with p < h, the MSE of both maps
    average-pooled to p x p with weights 1/2, 1/4, 1/8; the weighted sum divided by the total weight.
    """
    total = student_features[0].new_zeros(())
    for f_s, f_t in zip(student_features, teacher_features):
        level = F.mse_loss(f_s, f_t)
        weight, weights = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= f_s.shape[2]:
                continue
            weight /= 2.0
            level = level + weight * F.mse_loss(adaptive_avg_pool2d(f_s, size), adaptive_avg_pool2d(f_t, size))
            weights += weight
        total = total + level / weights
    return total


def ofd_margin(bn: nn.BatchNorm2d | tuple[Tensor, Tensor]) -> Tensor:
    """OFD's per-channel margin [C] from a BatchNorm's affine parameters (weight gamma, bias beta).

    The pre-ReLU response is taken as N(beta, gamma^2): m = E[x | x < 0] = beta - s*pdf(beta/s)/cdf(-beta/s)
    with s = |gamma|, or -3s where cdf(-beta/s) <= 0.001. Running statistics are not used.
    """
    weight, bias = (bn.weight, bn.bias) if isinstance(bn, nn.Module) else bn
    std, mean = weight.detach().abs().double(), bias.detach().double()
    z = mean / std
    below = 0.5 * torch.erfc(z / math.sqrt(2.0))  # Phi(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    margin = torch.where(below > 0.001, mean - std * pdf / below.clamp(min=1e-300), -3.0 * std)
    return margin.to(weight.dtype)


@full_precision
def ofd_loss(student_feature: Tensor, teacher_feature: Tensor, margin: Tensor) -> Tensor:
    """OFD's partial L2 for one stage: with T' = max(T, m), the sum over C*H*W of (S - T')^2 where
    S > T' or T' > 0, averaged over the batch. `margin` is [C] (or broadcastable to the maps);
    `teacher_feature` is the teacher's pre-ReLU map already pooled to the connector output's size."""
    if margin.ndim == 1:
        margin = margin.reshape(1, -1, 1, 1)
    target = torch.maximum(teacher_feature, margin.to(teacher_feature.dtype))
    mask = ((student_feature > target) | (target > 0)).to(student_feature.dtype)
    return ((student_feature - target).pow(2) * mask).sum() / student_feature.shape[0]


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row pair: centred cosine with eps added to the norms' product."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@full_precision
def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """DIST (Huang et al.): T^2 * (beta * inter + gamma * intra) on softmax(z / T).

    inter = 1 - mean over samples of the Pearson correlation of the class-probability rows;
    intra = 1 - mean over classes of the Pearson correlation of the probability columns.
    """
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1.0 - _pearson_rows(p_s, p_t).mean()
    intra = 1.0 - _pearson_rows(p_s.t(), p_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)
