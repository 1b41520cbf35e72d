"""Golden values and properties of kdcli.losses.

Every reference below is written out independently of the library: plain Python/numpy loops in
float64, following the formulas of the method specs (shared/methods/*.md), never the same torch ops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcli import losses as L

REL = 1e-6


def close(value, expected, rel=REL, abs=0.0):
    return float(value) == pytest.approx(float(expected), rel=rel, abs=abs)


def randn(*shape, seed=0, dtype=torch.float64):
    # drawn in float64 so that the float32 cases are the same numbers, rounded
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- independent references


def np_softmax(row):
    m = max(row)
    exps = [math.exp(x - m) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def np_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_kd(s, t, temps):
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    temps = np.broadcast_to(np.asarray(temps, dtype=np.float64), (s.shape[0],))
    total = 0.0
    for i in range(s.shape[0]):
        T = temps[i]
        total += T * T * np_kl(np_softmax(t[i] / T), np_softmax(s[i] / T))
    return total / s.shape[0]


def ref_sp(fs, ft):
    def normalized_gram(f):
        q = np.asarray(f, dtype=np.float64).reshape(f.shape[0], -1)
        b = q.shape[0]
        g = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                g[i, j] = sum(q[i, k] * q[j, k] for k in range(q.shape[1]))
        for i in range(b):
            g[i] /= math.sqrt(sum(x * x for x in g[i]))
        return g

    gs, gt = normalized_gram(fs), normalized_gram(ft)
    b = gs.shape[0]
    return sum((gt[i, j] - gs[i, j]) ** 2 for i in range(b) for j in range(b)) / b**2


def np_adaptive_avg_pool(f, out_h, out_w):
    """PyTorch's adaptive pooling windows: [floor(i*H/h), ceil((i+1)*H/h))."""
    b, c, h, w = f.shape
    out = np.zeros((b, c, out_h, out_w))
    for i in range(out_h):
        h0, h1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            w0, w1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            out[:, :, i, j] = f[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def ref_at(fs, ft, p=2):
    fs, ft = np.asarray(fs, dtype=np.float64), np.asarray(ft, dtype=np.float64)
    if fs.shape[2] > ft.shape[2]:
        fs = np_adaptive_avg_pool(fs, ft.shape[2], ft.shape[3])
    elif fs.shape[2] < ft.shape[2]:
        ft = np_adaptive_avg_pool(ft, fs.shape[2], fs.shape[3])

    def attention(f):
        b, c, h, w = f.shape
        a = np.zeros((b, h * w))
        for n in range(b):
            for y in range(h):
                for x in range(w):
                    a[n, y * w + x] = sum(f[n, k, y, x] ** p for k in range(c)) / c
            a[n] /= max(math.sqrt(sum(v * v for v in a[n])), 1e-12)
        return a

    a_s, a_t = attention(fs), attention(ft)
    return ((a_s - a_t) ** 2).sum() / a_s.size


def smooth_l1(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def ref_rkd(es, et, wd=25.0, wa=50.0):
    es, et = np.asarray(es, dtype=np.float64), np.asarray(et, dtype=np.float64)
    b = es.shape[0]

    def distances(e):
        d = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                if i != j:
                    d[i, j] = math.sqrt(max(sum((e[i, k] - e[j, k]) ** 2 for k in range(e.shape[1])), 1e-12))
        positive = [x for x in d.flatten() if x > 0]
        return d / (sum(positive) / len(positive))

    def angles(e):
        a = np.zeros((b, b, b))
        for i in range(b):
            units = []
            for j in range(b):
                v = e[j] - e[i]
                units.append(v / max(math.sqrt(sum(x * x for x in v)), 1e-12))
            for j in range(b):
                for k in range(b):
                    a[i, j, k] = sum(x * y for x, y in zip(units[j], units[k]))
        return a

    ds, dt = distances(es), distances(et)
    loss_d = sum(smooth_l1(x, y) for x, y in zip(ds.flatten(), dt.flatten())) / b**2
    as_, at_ = angles(es), angles(et)
    loss_a = sum(smooth_l1(x, y) for x, y in zip(as_.flatten(), at_.flatten())) / b**3
    return wd * loss_d + wa * loss_a


def ref_pkt(es, et, eps=1e-7):
    def conditional(e):
        e = np.asarray(e, dtype=np.float64)
        b = e.shape[0]
        unit = [row / (math.sqrt(sum(x * x for x in row)) + eps) for row in e]
        k = np.array([[(sum(x * y for x, y in zip(unit[i], unit[j])) + 1.0) / 2.0 for j in range(b)] for i in range(b)])
        return np.array([row / sum(row) for row in k])

    ps, pt = conditional(es), conditional(et)
    b = ps.shape[0]
    return sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for i in range(b) for j in range(b)) / b**2


def ref_dkd_parts(s, t, y, temps):
    """Per-sample (TCKD, NCKD) without T^2, from the paper's definitions: binary [p_y, 1 - p_y]
    and the distribution renormalised over the non-target classes (the target removed exactly)."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    temps = np.broadcast_to(np.asarray(temps, dtype=np.float64), (s.shape[0],))
    parts = []
    for i in range(s.shape[0]):
        T, c = temps[i], int(y[i])
        ps, pt = np_softmax(s[i] / T), np_softmax(t[i] / T)
        bs, bt = [ps[c], sum(ps) - ps[c]], [pt[c], sum(pt) - pt[c]]
        rest_s = np_softmax([x / T for k, x in enumerate(s[i]) if k != c])
        rest_t = np_softmax([x / T for k, x in enumerate(t[i]) if k != c])
        parts.append((np_kl(bt, bs), np_kl(rest_t, rest_s), T))
    return parts


def ref_dkd(s, t, y, alpha, beta, temps):
    parts = ref_dkd_parts(s, t, y, temps)
    return sum(T * T * (alpha * tc + beta * nc) for tc, nc, T in parts) / len(parts)


def np_probs(z, T):
    return np.array([np_softmax(row / T) for row in np.asarray(z, dtype=np.float64)])


def ref_batch_gap(s, t, T):
    ps, pt = np_probs(s, T), np_probs(t, T)
    b, c = ps.shape
    total = 0.0
    for i in range(b):
        for j in range(b):
            gs = sum(ps[i, k] * ps[j, k] for k in range(c))
            gt = sum(pt[i, k] * pt[j, k] for k in range(c))
            total += (gt - gs) ** 2
    return total / b


def ref_class_gap(s, t, T):
    ps, pt = np_probs(s, T), np_probs(t, T)
    b, c = ps.shape
    total = 0.0
    for i in range(c):
        for j in range(c):
            gs = sum(ps[n, i] * ps[n, j] for n in range(b))
            gt = sum(pt[n, i] * pt[n, j] for n in range(b))
            total += (gt - gs) ** 2
    return total / c


def ref_standardize(z):
    out = []
    for row in np.asarray(z, dtype=np.float64):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))
        out.append([(x - mean) / (1e-7 + std) for x in row])
    return np.array(out)


def ref_mlld(sw, tw, ss, ts, T=4.0, fractions=(0.5, 0.5), standardize=False):
    temps = [T, 3.0, 5.0, 2.0, 6.0]
    rho, rho_class = fractions
    isw, itw, iss, its = (ref_standardize(x) if standardize else x for x in (sw, tw, ss, ts))
    instance = rho * sum(ref_kd(isw, itw, tt) for tt in temps)
    instance += sum(ref_kd(iss, its, tt) for tt in temps[:3]) + sum(ref_kd(isw, itw, tt) for tt in temps[3:])
    return {
        "instance": instance,
        "class": rho_class * sum(ref_class_gap(sw, tw, tt) for tt in temps),
        "batch": rho * sum(ref_batch_gap(sw, tw, tt) for tt in temps),
    }


def np_mask_fractions(tw):
    """As the released MLLD code: np.percentile(., 50) thresholds, `<=` masks, mean of the mask."""
    probs = np_probs(tw, 1.0)
    conf = probs.max(axis=1)
    class_conf = probs.sum(axis=0)
    return (conf <= np.percentile(conf, 50)).mean(), (class_conf <= np.percentile(class_conf, 50)).mean()


# ---------------------------------------------------------------- fixtures

B, C = 6, 5


@pytest.fixture
def logits():
    return randn(B, C, seed=1) * 3, randn(B, C, seed=2) * 3, torch.tensor([0, 1, 4, 2, 2, 3])


# ---------------------------------------------------------------- kd


def test_kd_hand_computed_2x3():
    # T = 2; teacher logits 2*log(1,2,3) and 2*log(1,1,1) -> p_t = (1,2,3)/6 and (1,1,1)/3;
    # student logits 2*log(1,1,1) and 2*log(1,1,2) -> q = (1,1,1)/3 and (1,1,2)/4.
    t = torch.tensor([[0.0, 2 * math.log(2), 2 * math.log(3)], [0.0, 0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2 * math.log(2)]], dtype=torch.float64)
    kl_row1 = (1 / 6) * math.log(0.5) + (2 / 6) * math.log(1.0) + (3 / 6) * math.log(1.5)
    kl_row2 = (1 / 3) * (2 * math.log(4 / 3) + math.log(2 / 3))
    expected = 4 * (kl_row1 + kl_row2) / 2
    assert close(L.kd_loss(s, t, 2.0), expected)


def test_kd_golden(logits):
    s, t, _ = logits
    for T in (1.0, 4.0):
        assert close(L.kd_loss(s, t, T), ref_kd(s.numpy(), t.numpy(), T))


def test_kd_zero_when_equal(logits):
    s, _, _ = logits
    assert abs(float(L.kd_loss(s, s.clone(), 4.0))) < 1e-12


def test_kd_per_sample_temperature(logits):
    s, t, _ = logits
    same = torch.full((B,), 4.0, dtype=torch.float64)
    assert close(L.kd_loss(s, t, same), L.kd_loss(s, t, 4.0), rel=1e-12)
    temps = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    assert close(L.kd_loss(s, t, temps), ref_kd(s.numpy(), t.numpy(), temps.numpy()))


def test_kd_learnable_temperature_gets_gradient(logits):
    s, t, _ = logits
    tau = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    L.kd_loss(s, t, tau).backward()
    assert tau.grad is not None and torch.isfinite(tau.grad) and tau.grad != 0


# ---------------------------------------------------------------- sp


def test_sp_hand_computed():
    # G_s = I; G_t = all ones -> rows (1, 1)/sqrt(2); ||G_t - G_s||^2 = 2 * (2 - sqrt 2); / B^2 = 4
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert close(L.sp_loss(s, t), 1 - math.sqrt(2) / 2)


def test_sp_golden_and_properties():
    fs, ft = randn(5, 3, 2, 2, seed=3), randn(5, 4, 3, 3, seed=4)
    expected = ref_sp(fs.numpy(), ft.numpy())
    assert close(L.sp_loss(fs, ft), expected)
    assert close(L.sp_loss(7.5 * fs, 0.1 * ft), expected, rel=1e-10)  # scale of either side cancels
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert close(L.sp_loss(fs[perm], ft[perm]), expected, rel=1e-10)  # same permutation of the batch
    assert abs(float(L.sp_loss(fs, fs.clone()))) < 1e-14


# ---------------------------------------------------------------- at


def test_at_hand_computed():
    # student energy (1,0,0,0) -> unit; teacher (1,1,1,1) -> (1,1,1,1)/2; squared gaps .25+3*.25
    s = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    t = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    assert close(L.at_loss(s, t), 0.25)


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [((4, 3, 4, 4), (4, 5, 4, 4)), ((4, 3, 8, 8), (4, 5, 4, 4)), ((4, 3, 3, 3), (4, 5, 7, 7))],
)
def test_at_golden(s_shape, t_shape):
    fs, ft = randn(*s_shape, seed=5).relu(), randn(*t_shape, seed=6).relu()
    assert close(L.at_loss(fs, ft), ref_at(fs.numpy(), ft.numpy()))


def test_at_other_p_and_properties():
    fs, ft = randn(3, 2, 4, 4, seed=7).relu(), randn(3, 6, 4, 4, seed=8).relu()
    assert close(L.at_loss(fs, ft, p=4), ref_at(fs.numpy(), ft.numpy(), p=4))
    base = L.at_loss(fs, ft)
    assert close(L.at_loss(3.0 * fs, ft), base, rel=1e-10)  # maps are L2-normalised
    assert abs(float(L.at_loss(fs, fs.clone()))) < 1e-14
    big = randn(3, 2, 8, 8, seed=9).relu()
    assert close(L.at_loss(big, ft), L.at_loss(F.avg_pool2d(big, 2), ft), rel=1e-12)


# ---------------------------------------------------------------- rkd


def test_rkd_hand_computed():
    # 1-D points: teacher 0,1,3 (pair distances 1,3,2, mean 2), student 0,1,2 (1,2,1, mean 4/3).
    # psi_t = (.5, 1.5, 1), psi_s = (.75, 1.5, .75): four off-diagonal gaps of .25 -> 4 * .5 * .25^2 / 9.
    # Angles on a line with the same order are identical -> angle term 0.
    t = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    s = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    assert close(L.rkd_loss(s, t), 25.0 * 4 * 0.5 * 0.25**2 / 9)


def test_rkd_golden():
    es, et = randn(5, 4, seed=10), randn(5, 6, seed=11) * 2
    assert close(L.rkd_loss(es, et), ref_rkd(es.numpy(), et.numpy()))
    assert close(L.rkd_loss(es, et, 1.0, 0.0), ref_rkd(es.numpy(), et.numpy(), 1.0, 0.0))
    assert close(L.rkd_loss(es, et, 0.0, 1.0), ref_rkd(es.numpy(), et.numpy(), 0.0, 1.0))
    # large distances exercise the linear branch of smooth-L1
    far = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0]], dtype=torch.float64)
    near = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert close(L.rkd_loss(far, near), ref_rkd(far.numpy(), near.numpy()))


def test_rkd_similarity_invariance():
    et = randn(6, 4, seed=12)
    q, _ = torch.linalg.qr(randn(4, 4, seed=13))
    similar = 3.0 * et @ q + 5.0  # rotation, scale and shift keep distance ratios and angles
    assert abs(float(L.rkd_loss(similar, et))) < 1e-10
    es = randn(6, 3, seed=14)
    base = L.rkd_loss(es, et)
    assert close(L.rkd_loss(0.2 * es, et), base, rel=1e-10)
    perm = torch.tensor([5, 2, 0, 1, 4, 3])
    assert close(L.rkd_loss(es[perm], et[perm]), base, rel=1e-10)


# ---------------------------------------------------------------- pkt


def test_pkt_hand_computed():
    # student rows orthogonal: cos = diag(a), a = 1/(1+eps)^2; teacher rows identical: cos = a everywhere
    eps = 1e-7
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    a = 1 / (1 + eps) ** 2
    ks_diag, ks_off = (a + 1) / 2, 0.5
    ps_diag, ps_off = ks_diag / (ks_diag + ks_off), ks_off / (ks_diag + ks_off)
    pt = 0.5
    expected = (2 * pt * math.log((pt + eps) / (ps_diag + eps)) + 2 * pt * math.log((pt + eps) / (ps_off + eps))) / 4
    assert close(L.pkt_loss(s, t), expected)


def test_pkt_golden_and_properties():
    es, et = randn(5, 4, seed=15), randn(5, 7, seed=16)
    expected = ref_pkt(es.numpy(), et.numpy())
    assert close(L.pkt_loss(es, et), expected)
    perm = torch.tensor([4, 3, 0, 2, 1])
    assert close(L.pkt_loss(es[perm], et[perm]), expected, rel=1e-10)
    row_scale = torch.tensor([[0.5], [2.0], [3.0], [1.0], [7.0]], dtype=torch.float64)
    assert close(L.pkt_loss(es * row_scale, et), expected, rel=1e-5)  # cosine kernel (up to eps)
    assert abs(float(L.pkt_loss(es, es.clone()))) < 1e-14


# ---------------------------------------------------------------- hint


def test_hint_golden_and_shape_check():
    fs, ft = randn(2, 3, 4, 4, seed=17), randn(2, 3, 4, 4, seed=18)
    a, b = fs.numpy().ravel(), ft.numpy().ravel()
    assert close(L.hint_loss(fs, ft), sum((x - y) ** 2 for x, y in zip(a, b)) / a.size)
    assert close(L.hint_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])), 2.5)
    with pytest.raises(ValueError, match="equal shapes"):
        L.hint_loss(fs, ft[:, :2])


# ---------------------------------------------------------------- dkd


def test_dkd_hand_computed():
    # T = 1, target 0. Teacher log(2,1,1): p_t = (1/2,1/4,1/4) -> b_t = (1/2,1/2), rest_t = (1/2,1/2).
    # Student log(1,1,2): p_s = (1/4,1/4,1/2) -> b_s = (1/4,3/4), rest_s = (1/3,2/3).
    t = torch.tensor([[math.log(2), 0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0, math.log(2)]], dtype=torch.float64)
    tckd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    nckd = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    assert close(L.dkd_loss(s, t, torch.tensor([0]), 1.0, 8.0, 1.0), tckd + 8 * nckd)


def test_dkd_golden(logits):
    s, t, y = logits
    for alpha, beta, T in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 6.0, 2.5)):
        assert close(L.dkd_loss(s, t, y, alpha, beta, T), ref_dkd(s.numpy(), t.numpy(), y, alpha, beta, T))
    assert close(L.dkd_loss(s, t, y), ref_dkd(s.numpy(), t.numpy(), y, 1.0, 8.0, 4.0))  # defaults


def test_dkd_parts(logits):
    s, t, y = logits
    parts = ref_dkd_parts(s.numpy(), t.numpy(), y, 4.0)
    tckd = 16 * sum(p[0] for p in parts) / B
    assert close(L.dkd_loss(s, t, y, alpha=1.0, beta=0.0), tckd)  # beta = 0: TCKD alone
    assert close(L.dkd_loss(s, t, y, alpha=2.0, beta=0.0), 2 * tckd)
    assert abs(float(L.dkd_loss(s, s.clone(), y))) < 1e-12


def test_dkd_decomposes_kd():
    # DKD paper, Eq. 5: KD = TCKD + (1 - p_t[target]) * NCKD, per sample
    s, t = randn(1, 7, seed=19) * 2, randn(1, 7, seed=20) * 2
    y, T = torch.tensor([3]), 2.0
    p_target = float(F.softmax(t / T, dim=1)[0, 3])
    assert close(L.dkd_loss(s, t, y, 1.0, 1.0 - p_target, T), L.kd_loss(s, t, T), rel=1e-10)


def test_dkd_per_sample_temperature(logits):
    s, t, y = logits
    same = torch.full((B,), 4.0, dtype=torch.float64)
    assert close(L.dkd_loss(s, t, y, 1.0, 8.0, same), L.dkd_loss(s, t, y, 1.0, 8.0, 4.0), rel=1e-12)
    temps = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    assert close(L.dkd_loss(s, t, y, 1.0, 8.0, temps), ref_dkd(s.numpy(), t.numpy(), y, 1.0, 8.0, temps.numpy()))


# ---------------------------------------------------------------- logit standardisation


def test_standardize_hand_computed():
    z = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    out = L.standardize_logits(z)
    expected = [[-1 / (1 + 1e-7), 0.0, 1 / (1 + 1e-7)], [0.0, 0.0, 0.0]]
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_standardize_golden_and_properties(logits):
    z, _, _ = logits
    out = L.standardize_logits(z)
    assert np.allclose(out.numpy(), ref_standardize(z.numpy()), rtol=REL, atol=1e-12)
    assert torch.allclose(out.mean(dim=1), torch.zeros(B, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out.std(dim=1), torch.ones(B, dtype=torch.float64), rtol=1e-6)  # unbiased std
    assert torch.allclose(L.standardize_logits(3.0 * z - 7.0), out, rtol=1e-6, atol=1e-9)
    assert torch.equal(out.argsort(dim=1), z.argsort(dim=1))


# ---------------------------------------------------------------- mlld


def test_mlld_hand_computed():
    # one sample, two classes, T = 1: p_s = (1/2, 1/2), p_t = (3/4, 1/4)
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3), 0.0]], dtype=torch.float64)
    # batch: P P^T = 1/2 vs 10/16 -> (1/8)^2 / B
    assert close(L.mlld_batch_loss(s, t, (1.0,)), 1 / 64)
    # class: P^T P = 1/4 everywhere vs (9,3,3,1)/16 -> gaps (5,-1,-1,-3)/16 -> 36/256 / C
    assert close(L.mlld_class_loss(s, t, (1.0,)), 36 / 256 / 2)
    # instance at T = 1 and 2: at T = 2, p_t = (sqrt 3, 1) / (sqrt 3 + 1), p_s unchanged; T^2 = 4
    kl1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    r = math.sqrt(3)
    kl2 = sum(p * math.log(p / 0.5) for p in (r / (r + 1), 1 / (r + 1)))
    assert close(L.mlld_instance_loss(s, t, (1.0, 2.0)), kl1 + 4 * kl2)


def test_mlld_level_goldens(logits):
    s, t, _ = logits
    sn, tn = s.numpy(), t.numpy()
    temps = L.MLLD_TEMPERATURES
    assert temps == (4.0, 3.0, 5.0, 2.0, 6.0)
    assert L.mlld_temperatures(1.0) == (1.0, 3.0, 5.0, 2.0, 6.0)
    assert close(L.mlld_instance_loss(s, t), sum(ref_kd(sn, tn, T) for T in temps))
    assert close(L.mlld_batch_loss(s, t), sum(ref_batch_gap(sn, tn, T) for T in temps))
    assert close(L.mlld_class_loss(s, t), sum(ref_class_gap(sn, tn, T) for T in temps))


@pytest.fixture
def views():
    return tuple(randn(B, C, seed=21 + k) * 3 for k in range(4))  # student weak, teacher weak, s/t strong


def check_terms(terms, expected):
    assert set(terms) == {"instance", "class", "batch"}
    for key in expected:
        assert close(terms[key], expected[key]), key


def test_mlld_combination(views):
    sw, tw, ss, ts = views
    np_views = [v.numpy() for v in views]
    check_terms(L.mlld_loss_terms(sw, tw, ss, ts), ref_mlld(*np_views))
    check_terms(L.mlld_loss_terms(sw, tw, ss, ts, temperature=1.0), ref_mlld(*np_views, T=1.0))
    expected = sum(ref_mlld(*np_views).values())
    assert close(L.mlld_loss(sw, tw, ss, ts), expected)


def test_mlld_code_mask_fractions(views):
    sw, tw, ss, ts = views
    np_views = [v.numpy() for v in views]
    fractions = np_mask_fractions(np_views[1])
    assert fractions == (0.5, 0.6)  # B = 6 samples: 3 at or below the median; C = 5 classes: 3
    check_terms(L.mlld_loss_terms(sw, tw, ss, ts, mask_fraction=None), ref_mlld(*np_views, fractions=fractions))
    # ties (duplicated teacher rows, an odd batch) move the fractions away from 1/2
    tied = torch.cat([tw[:1].repeat(3, 1), tw[1:4]])[:5]
    rho, rho_class = L.mlld_mask_fractions(tied)
    np_rho, np_rho_class = np_mask_fractions(tied.numpy())
    assert np_rho != 0.5
    assert close(rho, np_rho, rel=1e-12) and close(rho_class, np_rho_class, rel=1e-12)
    got = L.mlld_loss_terms(sw[:5], tied, ss[:5], ts[:5], mask_fraction=None)
    expected = ref_mlld(sw[:5].numpy(), tied.numpy(), ss[:5].numpy(), ts[:5].numpy(), fractions=(np_rho, np_rho_class))
    check_terms(got, expected)


def test_mlld_logit_standardization(views):
    sw, tw, ss, ts = views
    expected = ref_mlld(*[v.numpy() for v in views], T=2.0, standardize=True)
    check_terms(L.mlld_loss_terms(sw, tw, ss, ts, temperature=2.0, logit_standardization=True), expected)


# ---------------------------------------------------------------- all losses: dtype, gradients, autocast


def cases(dtype=torch.float64):
    s_logits, t_logits = randn(B, C, seed=30, dtype=dtype) * 3, randn(B, C, seed=31, dtype=dtype) * 3
    y = torch.tensor([0, 1, 4, 2, 2, 3])
    s_map, t_map = randn(B, 3, 4, 4, seed=32, dtype=dtype), randn(B, 5, 4, 4, seed=33, dtype=dtype)
    s_emb, t_emb = randn(B, 4, seed=34, dtype=dtype), randn(B, 7, seed=35, dtype=dtype)
    s_strong, t_strong = randn(B, C, seed=36, dtype=dtype) * 3, randn(B, C, seed=37, dtype=dtype) * 3
    return {
        "kd": (L.kd_loss, (s_logits, t_logits), (4.0,)),
        "kd_per_sample": (L.kd_loss, (s_logits, t_logits), (torch.linspace(1, 6, B, dtype=dtype),)),
        "sp": (L.sp_loss, (s_map, t_map), ()),
        "at": (L.at_loss, (s_map.relu(), t_map.relu()), ()),
        "rkd": (L.rkd_loss, (s_emb, t_emb), ()),
        "pkt": (L.pkt_loss, (s_emb, t_emb), ()),
        "hint": (L.hint_loss, (s_map, t_map[:, :3]), ()),
        "dkd": (L.dkd_loss, (s_logits, t_logits), (y,)),
        "standardize": (lambda s: L.standardize_logits(s).pow(3).sum(), (s_logits,), ()),
        "mlld_instance": (L.mlld_instance_loss, (s_logits, t_logits), ()),
        "mlld_batch": (L.mlld_batch_loss, (s_logits, t_logits), ()),
        "mlld_class": (L.mlld_class_loss, (s_logits, t_logits), ()),
        "mlld": (lambda s, t: L.mlld_loss(s, t, s_strong + s - s.detach(), t_strong), (s_logits, t_logits), ()),
    }


NAMES = list(cases())


@pytest.mark.parametrize("name", NAMES)
def test_float32_matches_float64(name):
    fn, inputs, extra = cases(torch.float32)[name]
    value32 = fn(*inputs, *extra)
    assert value32.dtype == torch.float32 and value32.ndim == 0
    fn64, inputs64, extra64 = cases(torch.float64)[name]
    assert close(value32, fn64(*inputs64, *extra64), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_student_only(name):
    fn, inputs, extra = cases()[name]
    student = inputs[0].clone().requires_grad_(True)
    teachers = [t.clone() for t in inputs[1:]]
    fn(student, *teachers, *extra).backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert all(t.grad is None and not t.requires_grad for t in teachers)


def test_low_precision_runs_in_float32():
    s, t = randn(B, 3, 4, 4, seed=40, dtype=torch.float32), randn(B, 5, 4, 4, seed=41, dtype=torch.float32)
    exact = L.sp_loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(L.sp_loss(s, t), exact)  # autocast is switched off inside
    half = L.sp_loss(s.bfloat16(), t.bfloat16())
    assert half.dtype == torch.float32
    assert close(half, exact, rel=5e-2)
