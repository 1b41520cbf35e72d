"""Golden values of the zoo losses (cc, vid, nst, fsp, ft, ab, kdsvd, hcl, ofd, dist).

Every reference is written out independently of the library in plain Python / numpy float64
loops following the spec formulas (shared/methods/*.md), never the library's torch ops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdcli import losses as L


def close(value, expected, rel=1e-6, abs=1e-12):
    return float(value) == pytest.approx(float(expected), rel=rel, abs=abs)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def np_(t):
    return t.detach().numpy().astype(np.float64)


def np_pool(x, size):
    """Adaptive average pool of [B, C, H, W] to size x size, for sizes that divide H."""
    b, c, h, w = x.shape
    k = h // size
    out = np.zeros((b, c, size, size))
    for i in range(size):
        for j in range(size):
            out[:, :, i, j] = x[:, :, i * k : (i + 1) * k, j * k : (j + 1) * k].mean(axis=(2, 3))
    return out


def np_pool_smaller(s, t):
    if s.shape[2] > t.shape[2]:
        return np_pool(s, t.shape[2]), t
    if s.shape[2] < t.shape[2]:
        return s, np_pool(t, s.shape[2])
    return s, t


# ---- cc ------------------------------------------------------------------------------------------


def test_cc_loss_neighbouring_rows():
    s, t = rand(5, 3, seed=1), rand(5, 3, seed=2)
    a, b = np_(s), np_(t)
    total = 0.0
    for i in range(4):
        for k in range(3):
            total += abs(a[i, k] - b[i, k]) * abs(a[i + 1, k] - b[i + 1, k])
    assert close(L.cc_loss(s, t), total / 4)


# ---- vid -----------------------------------------------------------------------------------------


def test_vid_loss_gaussian_nll():
    mu, target, a = rand(2, 3, 2, 2, seed=3), rand(2, 3, 2, 2, seed=4), rand(3, seed=5)
    m, tt, av = np_(mu), np_(target), np_(a)
    total, count = 0.0, 0
    for b in range(2):
        for c in range(3):
            var = math.log1p(math.exp(av[c])) + 1e-5
            for h in range(2):
                for w in range(2):
                    total += 0.5 * ((m[b, c, h, w] - tt[b, c, h, w]) ** 2 / var + math.log(var))
                    count += 1
    assert close(L.vid_loss(mu, target, a), total / count)


def test_vid_initial_variance_is_five():
    init = math.log(math.exp(5.0 - 1e-5) - 1.0)
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    assert close(L.vid_loss(x, x, torch.tensor([init], dtype=torch.float64)), 0.5 * math.log(5.0))


# ---- nst -----------------------------------------------------------------------------------------


def _np_nst(s, t):
    s, t = np_pool_smaller(s, t)

    def maps(x):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        return flat / np.maximum(np.sqrt((flat**2).sum(axis=2, keepdims=True)), 1e-12)

    def kmean(a, b):
        vals = [float(np.dot(a[n, i], b[n, j])) ** 2 for n in range(a.shape[0]) for i in range(a.shape[1]) for j in range(b.shape[1])]
        return sum(vals) / len(vals)

    a, b = maps(s), maps(t)
    return kmean(b, b) + kmean(a, a) - 2 * kmean(b, a)


@pytest.mark.parametrize("s_shape,t_shape", [((2, 3, 4, 4), (2, 5, 4, 4)), ((2, 3, 4, 4), (2, 2, 2, 2)), ((2, 2, 2, 2), (2, 3, 4, 4))])
def test_nst_loss_mmd_poly_kernel(s_shape, t_shape):
    s, t = rand(*s_shape, seed=6), rand(*t_shape, seed=7)
    assert close(L.nst_loss(s, t), _np_nst(np_(s), np_(t)))


def test_nst_loss_zero_for_equal_maps():
    s = rand(2, 3, 4, 4, seed=8)
    assert abs(float(L.nst_loss(s, s.clone()))) < 1e-12


# ---- fsp -----------------------------------------------------------------------------------------


def _np_fsp_matrix(lower, upper):
    lower, upper = np_pool_smaller(lower, upper)
    b, ca, h, w = lower.shape
    cb = upper.shape[1]
    g = np.zeros((b, cb, ca))
    for n in range(b):
        for j in range(cb):
            for i in range(ca):
                g[n, j, i] = sum(upper[n, j, y, x] * lower[n, i, y, x] for y in range(h) for x in range(w)) / (h * w)
    return g


def test_fsp_loss_consecutive_pairs():
    shapes = [(2, 2, 4, 4), (2, 2, 4, 4), (2, 3, 2, 2)]
    s = [rand(*sh, seed=10 + i) for i, sh in enumerate(shapes)]
    t = [rand(*sh, seed=20 + i) for i, sh in enumerate(shapes)]
    expected = 0.0
    for i in range(1, 3):
        gs = _np_fsp_matrix(np_(s[i - 1]), np_(s[i]))
        gt = _np_fsp_matrix(np_(t[i - 1]), np_(t[i]))
        expected += ((gs - gt) ** 2).mean()
    assert close(L.fsp_loss(s, t), expected)


def test_fsp_loss_rejects_unequal_channels():
    with pytest.raises(ValueError, match="channel"):
        L.fsp_loss([rand(1, 2, 2, 2), rand(1, 3, 2, 2)], [rand(1, 2, 2, 2), rand(1, 4, 2, 2)])


# ---- ft ------------------------------------------------------------------------------------------


def _np_factor(x, p1):
    m = (x**p1).mean(axis=1).reshape(x.shape[0], -1)
    return m / np.maximum(np.sqrt((m**2).sum(axis=1, keepdims=True)), 1e-12)


@pytest.mark.parametrize("p2", [1, 2])
def test_ft_loss(p2):
    s, t = rand(2, 3, 4, 4, seed=30), rand(2, 2, 2, 2, seed=31)
    a, b = np_pool_smaller(np_(s), np_(t))
    diff = _np_factor(a, 2) - _np_factor(b, 2)
    expected = np.abs(diff).mean() if p2 == 1 else (diff**2).mean()
    assert close(L.ft_loss(s, t, p1=2, p2=p2), expected)


# ---- ab ------------------------------------------------------------------------------------------


def test_ab_loss_margin_hinge():
    s, t = rand(3, 2, 2, 2, seed=40) * 1.5, rand(3, 2, 2, 2, seed=41)
    a, b = np_(s).ravel(), np_(t).ravel()
    total = 0.0
    for x, y in zip(a, b):
        if y <= 0 and x > -1.0:
            total += (x + 1.0) ** 2
        if y > 0 and x <= 1.0:
            total += (x - 1.0) ** 2
    assert close(L.ab_loss(s, t, margin=1.0), total / 3 * 3 / 1000)


def test_ab_loss_zero_beyond_the_margin():
    t = torch.tensor([[-1.0, 2.0]], dtype=torch.float64).reshape(1, 2, 1, 1)
    s = torch.tensor([[-1.5, 1.2]], dtype=torch.float64).reshape(1, 2, 1, 1)
    assert float(L.ab_loss(s, t)) == 0.0


# ---- kdsvd ---------------------------------------------------------------------------------------


def _np_svd_vectors(x, n):
    b, c = x.shape[:2]
    vs, ss = [], []
    for i in range(b):
        m = x[i].reshape(c, -1).T  # [HW, C]
        _, sig, vh = np.linalg.svd(m, full_matrices=False)
        v = vh.T[:, :n]
        v = v / np.sqrt((v**2).sum(axis=0, keepdims=True))
        sig = sig[:n] / np.sqrt((sig[:n] ** 2).sum())
        vs.append(v)
        ss.append(sig)
    return np.stack(vs), np.stack(ss)


def _np_kdsvd(s_list, t_list, k):
    total, prev = 0.0, None
    for fs, ft in zip(s_list, t_list):
        vt, st = _np_svd_vectors(ft, k)
        vs, _ = _np_svd_vectors(fs, k + 3)
        b = fs.shape[0]
        aligned = np.zeros_like(vt)
        for n in range(b):
            for j in range(k):
                cos = [float(np.dot(vs[n, :, i], vt[n, :, j])) for i in range(k + 3)]
                best = int(np.argmax(np.abs(cos)))
                aligned[n, :, j] = vs[n, :, best] * np.sign(cos[best])
        vs = aligned * st[:, None, :]
        vt = vt * st[:, None, :]
        if prev is not None:
            ps, pt = prev
            for n in range(b):
                for i in range(vs.shape[1]):
                    for j in range(ps.shape[1]):
                        for r in range(k):
                            gs = math.exp(-((vs[n, i, r] - ps[n, j, r]) ** 2) / 8)
                            gt = math.exp(-((vt[n, i, r] - pt[n, j, r]) ** 2) / 8)
                            total += (gs - gt) ** 2
        prev = (vs, vt)
    return total / s_list[0].shape[0]


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_loss(k):
    shapes = [(2, 6, 4, 4), (2, 6, 4, 4), (2, 7, 3, 3)]
    s = [rand(*sh, seed=50 + i) for i, sh in enumerate(shapes)]
    t = [rand(*sh, seed=60 + i) for i, sh in enumerate(shapes)]
    assert close(L.kdsvd_loss(s, t, k=k), _np_kdsvd([np_(x) for x in s], [np_(x) for x in t], k), rel=1e-6)


def test_kdsvd_loss_has_student_gradient():
    s = [rand(2, 4, 3, 3, seed=70 + i).requires_grad_() for i in range(2)]
    t = [rand(2, 4, 3, 3, seed=80 + i) for i in range(2)]
    L.kdsvd_loss(s, t).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in s)


# ---- hcl -----------------------------------------------------------------------------------------


def test_hcl_loss_levels_4_2_1():
    s = [rand(2, 3, 8, 8, seed=90), rand(2, 2, 2, 2, seed=91), rand(2, 4, 1, 1, seed=92)]
    t = [rand(2, 3, 8, 8, seed=93), rand(2, 2, 2, 2, seed=94), rand(2, 4, 1, 1, seed=95)]
    expected = 0.0
    for a, b in zip(map(np_, s), map(np_, t)):
        h = a.shape[2]
        level, w, tot = ((a - b) ** 2).mean(), 1.0, 1.0
        for p in (4, 2, 1):
            if p < h:
                w /= 2
                level += w * ((np_pool(a, p) - np_pool(b, p)) ** 2).mean()
                tot += w
        expected += level / tot
    assert close(L.hcl_loss(s, t), expected)


# ---- ofd -----------------------------------------------------------------------------------------


def _np_margin(gamma, beta):
    out = []
    for g, b in zip(gamma, beta):
        s = abs(g)
        z = b / s
        below = 0.5 * math.erfc(z / math.sqrt(2))
        pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        out.append(b - s * pdf / below if below > 0.001 else -3 * s)
    return out


def test_ofd_margin_from_bn_affine():
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.1], dtype=torch.float64))
        bn.bias.copy_(torch.tensor([0.0, 0.3, -1.0, 1.0], dtype=torch.float64))
        bn.running_mean.fill_(7.0)  # running statistics are not part of the margin
    expected = _np_margin([1.0, -0.5, 2.0, 0.1], [0.0, 0.3, -1.0, 1.0])
    got = L.ofd_margin(bn)
    assert got.shape == (4,)
    for g, e in zip(got.tolist(), expected):
        assert close(g, e)
    assert close(got[0], -math.sqrt(2 / math.pi))  # E[x | x < 0] of N(0, 1)
    assert close(got[3], -0.3)  # Phi(-10) < 0.001: -3 sigma


def test_ofd_loss_three_cases():
    s, t = rand(2, 3, 2, 2, seed=100), rand(2, 3, 2, 2, seed=101)
    m = torch.tensor([-0.5, -0.2, -1.0], dtype=torch.float64)
    a, b, mm = np_(s), np_(t), np_(m)
    total = 0.0
    for n in range(2):
        for c in range(3):
            for h in range(2):
                for w in range(2):
                    x, y = a[n, c, h, w], b[n, c, h, w]
                    if x > mm[c] and y <= mm[c]:
                        total += (x - mm[c]) ** 2
                    elif x > y and mm[c] < y <= 0:
                        total += (x - y) ** 2
                    elif y > 0:
                        total += (x - y) ** 2
    assert close(L.ofd_loss(s, t, m), total / 2)


# ---- dist ----------------------------------------------------------------------------------------


def _np_pearson(u, v):
    u, v = np.asarray(u) - np.mean(u), np.asarray(v) - np.mean(v)
    return float(np.dot(u, v)) / (math.sqrt(float(np.dot(u, u))) * math.sqrt(float(np.dot(v, v))) + 1e-8)


def _np_softmax_rows(z, temp):
    out = []
    for row in z:
        e = [math.exp(x / temp - max(row) / temp) for x in row]
        out.append([x / sum(e) for x in e])
    return np.array(out)


@pytest.mark.parametrize("temp,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)])
def test_dist_loss(temp, beta, gamma):
    s, t = rand(4, 5, seed=110), rand(4, 5, seed=111)
    ps, pt = _np_softmax_rows(np_(s), temp), _np_softmax_rows(np_(t), temp)
    inter = 1 - sum(_np_pearson(ps[i], pt[i]) for i in range(4)) / 4
    intra = 1 - sum(_np_pearson(ps[:, c], pt[:, c]) for c in range(5)) / 5
    assert close(L.dist_loss(s, t, beta=beta, gamma=gamma, temperature=temp), temp**2 * (beta * inter + gamma * intra))


def test_dist_loss_near_zero_for_identical_logits():
    t = rand(4, 5, seed=112)
    # not exactly 0: eps 1e-8 is added to the product of the (small) centred norms
    assert 0.0 <= float(L.dist_loss(t.clone(), t)) < 1e-5


# ---- all of them: float32 in, float32 out; half precision promoted ------------------------------


def test_zoo_losses_accept_half_precision():
    s, t = rand(2, 3, 4, 4, seed=120).half(), rand(2, 3, 4, 4, seed=121).half()
    for value in (L.nst_loss(s, t), L.ft_loss(s, t), L.ab_loss(s, t), L.ofd_loss(s, t, torch.zeros(3)),
                  L.fsp_loss([s, s], [t, t]), L.hcl_loss([s], [t]), L.kdsvd_loss([s, s], [t, t])):
        assert value.dtype == torch.float32 and torch.isfinite(value)


def _equal_singular_values_case():
    """Maps whose [H*W, C] matrix has orthonormal columns: all singular values 1 (repeated)."""
    q, _ = torch.linalg.qr(rand(9, 4, seed=130))
    x = q.t().reshape(1, 4, 3, 3).repeat(2, 1, 1, 1)
    return [x.clone().requires_grad_() for _ in range(2)], [rand(2, 4, 3, 3, seed=131 + i) for i in range(2)]


def test_kdsvd_gradient_stays_finite_for_repeated_singular_values(monkeypatch):
    s, t = _equal_singular_values_case()
    L.kdsvd_loss(s, t).backward()
    assert all(torch.isfinite(x.grad).all() for x in s)
    # the case is degenerate: without the guard, SVD's backward gives non-finite gradients
    monkeypatch.setattr(torch.Tensor, "register_hook", lambda self, hook: None)
    s, t = _equal_singular_values_case()
    L.kdsvd_loss(s, t).backward()
    assert not all(torch.isfinite(x.grad).all() for x in s)


def test_cc_loss_of_a_single_sample_is_zero_not_nan():
    value = L.cc_loss(rand(1, 3, seed=140).requires_grad_(), rand(1, 3, seed=141))
    assert float(value.detach()) == 0.0
