"""SP (Tung & Mori) and MLKD (Ding et al.): values against formulas written out here, properties,
gradients, state and one short real run each."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import LEARNED_TOP1
from kdcli.batch import Batch
from kdcli.engine.checkpoint import load_state, save_state
from kdcli.errors import KdError
from kdcli.methods import Shapes, method_class
from kdcli.methods.mlkd import alignment_loss, correlation_loss, supcon_loss
from kdcli.models.features import Outputs

# ---- helpers written from the formulas, on nested Python lists (float64) ----------------------


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def norm(a):
    return math.sqrt(dot(a, a))


def flat(sample):
    t = torch.as_tensor(sample, dtype=torch.float64)
    return t.reshape(-1).tolist()


def softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [v / sum(e) for v in e]


def sp_by_hand(student, teacher):
    """(1/B^2) ||G_t - G_s||_F^2 with each Gram row divided by its L2 norm."""

    def normalized_gram(feature):
        rows = [flat(x) for x in feature]
        gram = [[dot(a, b) for b in rows] for a in rows]
        return [[v / norm(row) for v in row] for row in gram]

    g_s, g_t = normalized_gram(student), normalized_gram(teacher)
    b = len(g_s)
    return sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def cos(a, b):
    return dot(a, b) / (norm(a) * norm(b))


def correlation_by_hand(student, teacher, b, tau):
    """Mean over rotated rows i of KL(softmax_j cos(t_i, t_j)/tau || softmax_j cos(s_i, s_j)/tau), j plain."""
    total = 0.0
    for i in range(b, len(student)):
        p = softmax([cos(teacher[i], teacher[j]) / tau for j in range(b)])
        q = softmax([cos(student[i], student[j]) / tau for j in range(b)])
        total += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    return total / (len(student) - b)


def supcon_by_hand(student, teacher, labels, tau, base, eps=1e-7):
    """SupCon over rows [student; teacher]: -(tau/base) * mean_a mean_{p in P(a)} log softmax, shifted by row max."""
    rows = student + teacher
    classes = labels + labels
    n = len(rows)
    total = 0.0
    for a in range(n):
        logits = [dot(rows[a], rows[q]) / tau for q in range(n)]
        m = max(logits)
        denominator = sum(math.exp(logits[q] - m) for q in range(n) if q != a)
        positives = [p for p in range(n) if p != a and classes[p] == classes[a]]
        total += sum(logits[p] - m - math.log(denominator + eps) for p in positives) / len(positives)
    return -(tau / base) * total / n


def alignment_by_hand(prediction, target):
    return 2 - 2 * sum(cos(p, t) for p, t in zip(prediction, target)) / len(prediction)


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


def batch_of(y, views=None):
    y = torch.as_tensor(y)
    return Batch(torch.zeros(len(y), 3, 4, 4), y, torch.arange(len(y)), views)


def assert_finite_run(summary):
    lines = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert lines
    for line in lines:
        for key, value in line.items():
            if key.startswith("train_") and isinstance(value, float):
                assert math.isfinite(value), (key, value)
    assert summary["top1"] > LEARNED_TOP1, summary
    return lines[-1]


# ---- SP ----------------------------------------------------------------------------------------

STEM = (4, 4, 4)


def sp_shapes(stages):
    return Shapes(features=[STEM, *stages], embedding=8, num_classes=3)


S_STAGES = [(2, 2, 2), (3, 2, 1), (4, 1, 1)]
T_STAGES = [(3, 2, 2), (5, 1, 2), (2, 2, 1), (6, 1, 1)]


def sp_method(**options):
    return method_class("sp")(sp_shapes(S_STAGES), sp_shapes(T_STAGES), num_samples=10, **options)


def sp_outputs(stage_shapes, b=4, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    features = [torch.rand(b, *shape, generator=g, dtype=torch.float64) for shape in [STEM, *stage_shapes]]
    for f in features:
        f.requires_grad_(requires_grad)
    logits = torch.randn(b, 3, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    return Outputs(logits, features, None)


def test_sp_loss_equals_the_formula_by_hand():
    student = [[[1.0, 2.0]], [[0.5, -1.0]], [[3.0, 0.0]]]
    teacher = [[[2.0, 1.0, 0.0]], [[1.0, 1.0, 1.0]], [[0.0, -2.0, 4.0]]]
    method = method_class("sp")(Shapes([STEM, (1, 1, 2)]), Shapes([STEM, (1, 1, 3)]), num_samples=3)
    s = Outputs(torch.zeros(3, 3, dtype=torch.float64), [torch.zeros(3, *STEM), t64(student)[:, None]], None)
    t = Outputs(torch.zeros(3, 3, dtype=torch.float64), [torch.zeros(3, *STEM), t64(teacher)[:, None]], None)
    terms = method(s, t, batch_of([0, 1, 2]))
    assert set(terms) == {"ce", "sp"}
    assert terms["sp"].item() == pytest.approx(3000 * sp_by_hand(student, teacher), rel=1e-12)


def test_sp_defaults_and_identity():
    cls = method_class("sp")
    assert cls.defaults == {"ce": 1.0, "kd": 0.0, "T": 4.0, "beta": 3000.0, "stages": [-1]}
    assert cls.needs.features and not cls.needs.embedding and cls.needs.views is None
    assert "Tung" in cls.paper and "1907.09682" in cls.paper


def test_sp_stages_select_stage_outputs_per_network():
    s, t = sp_outputs(S_STAGES, seed=1), sp_outputs(T_STAGES, seed=2)
    batch = batch_of([0, 1, 2, 0])

    def by_hand(i, j):
        return sp_by_hand(s.features[i].tolist(), t.features[j].tolist())

    last = sp_method()(s, t, batch)["sp"].item()
    assert last == pytest.approx(3000 * by_hand(3, 4), rel=1e-12)  # -1: each network's last stage
    assert sp_method(stages="-1")(s, t, batch)["sp"].item() == pytest.approx(last, rel=1e-12)
    assert sp_method(stages="1,2,3")(s, t, batch)["sp"].item() == pytest.approx(
        3000 * (by_hand(1, 1) + by_hand(2, 2) + by_hand(3, 3)), rel=1e-12
    )
    assert sp_method(stages="2,-1", beta="10")(s, t, batch)["sp"].item() == pytest.approx(
        10 * (by_hand(2, 2) + by_hand(3, 4)), rel=1e-12
    )


@pytest.mark.parametrize("stages", ["0", "4", "-4", "3,-1", ""])
def test_sp_rejects_bad_stages(stages):
    with pytest.raises(KdError) as err:
        sp_method(stages=stages)
    assert err.value.hint and "stages" in err.value.hint


def test_sp_needs_feature_maps():
    with pytest.raises(KdError, match="no stage feature maps"):
        method_class("sp")(Shapes(embedding=8, num_classes=3), sp_shapes(T_STAGES), num_samples=10)


def test_sp_is_invariant_to_batch_order_and_feature_scale():
    s, t = sp_outputs(S_STAGES, b=5, seed=3), sp_outputs(T_STAGES, b=5, seed=4)
    batch = batch_of([0, 1, 2, 0, 1])
    method = sp_method(stages="1,2,3")
    reference = method(s, t, batch)["sp"]
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = method(
        Outputs(s.logits[perm], [f[perm] for f in s.features], None),
        Outputs(t.logits[perm], [f[perm] for f in t.features], None),
        batch_of(batch.y[perm]),
    )["sp"]
    scaled = method(Outputs(s.logits, [7.5 * f for f in s.features], None), t, batch)["sp"]
    assert shuffled.item() == pytest.approx(reference.item(), rel=1e-10)
    assert scaled.item() == pytest.approx(reference.item(), rel=1e-10)
    same = sp_outputs(S_STAGES, b=5, seed=5)
    equal = method_class("sp")(sp_shapes(S_STAGES), sp_shapes(S_STAGES), 10, stages="1,2,3")
    assert equal(same, same, batch)["sp"].item() == pytest.approx(0.0, abs=1e-12)


def test_sp_gradients_reach_the_student_and_it_has_no_state():
    s, t = sp_outputs(S_STAGES, seed=6, requires_grad=True), sp_outputs(T_STAGES, seed=7)
    method = sp_method(stages="1,2,3")
    sum(method(s, t, batch_of([0, 1, 2, 0])).values()).backward()
    for f in s.features[1:]:
        assert f.grad is not None and f.grad.abs().sum() > 0
    assert s.features[0].grad is None  # the stem is not a stage
    assert method.trainable_parameters() == [] and method.state_dict() == {}


def test_sp_real_digits_run(distill_digits):
    last = assert_finite_run(distill_digits("sp"))
    assert "train_sp" in last and last["train_sp"] > 0


# ---- MLKD (Ding et al.) ------------------------------------------------------------------------

D_S, D_T = 6, 5


def mlkd_method(**options):
    return method_class("mlkd")(Shapes(embedding=D_S, num_classes=3), Shapes(embedding=D_T, num_classes=3), 10, **options)


def mlkd_outputs(b, dim, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4 * b, 3, generator=g, requires_grad=requires_grad)
    embedding = torch.rand(4 * b, dim, generator=g).requires_grad_(requires_grad)  # post-ReLU pooled: >= 0
    return Outputs(logits, [], embedding)


CORR_S = [[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [2.0, 1.0, 0.0], [0.0, 1.0, 1.0],
          [1.0, 1.0, 1.0], [-1.0, 2.0, 0.5], [3.0, -1.0, 1.0], [0.2, 0.4, 0.1]]
CORR_T = [[0.0, 1.0, 1.0, 2.0], [1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 0.0, 1.0], [2.0, 0.5, 0.5, 0.0],
          [0.0, 0.0, 1.0, 3.0], [1.0, 2.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.1], [2.0, 1.0, 0.0, 1.0]]


def test_correlation_loss_equals_the_formula_by_hand():
    value = correlation_loss(t64(CORR_S), t64(CORR_T), batch_size=2, temperature=0.5)
    assert value.item() == pytest.approx(correlation_by_hand(CORR_S, CORR_T, 2, 0.5), rel=1e-12)
    assert correlation_loss(t64(CORR_T), t64(CORR_T), 2).item() == pytest.approx(0.0, abs=1e-12)


def test_correlation_loss_ignores_rotated_row_order_and_student_scale():
    """The reference interleaves views per image; any order of the rotated rows gives the same value."""
    s, t = t64(CORR_S), t64(CORR_T)
    order = torch.tensor([0, 1, 5, 2, 7, 4, 3, 6])  # plain rows stay first and in order
    reference = correlation_loss(s, t, 2).item()
    assert correlation_loss(s[order], t[order], 2).item() == pytest.approx(reference, rel=1e-12)
    assert correlation_loss(3.0 * s, t, 2).item() == pytest.approx(reference, rel=1e-12)


SUP_S = [[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]]
SUP_T = [[0.8, 0.6], [-0.6, 0.8], [0.28, -0.96]]
SUP_Y = [0, 1, 0]


def test_supcon_loss_equals_the_formula_by_hand():
    for tau, base in ((0.07, 0.07), (0.5, 0.07)):
        value = supcon_loss(t64(SUP_S), t64(SUP_T), torch.tensor(SUP_Y), tau, base)
        assert value.item() == pytest.approx(supcon_by_hand(SUP_S, SUP_T, SUP_Y, tau, base), rel=1e-12)


def test_supcon_loss_is_invariant_to_sample_order():
    s, t, y = t64(SUP_S), t64(SUP_T), torch.tensor(SUP_Y)
    perm = torch.tensor([2, 0, 1])
    assert supcon_loss(s[perm], t[perm], y[perm]).item() == pytest.approx(supcon_loss(s, t, y).item(), rel=1e-12)


def test_alignment_loss_equals_the_formula_by_hand():
    prediction = [[1.0, 2.0, 2.0], [0.0, 3.0, 4.0], [1.0, -1.0, 0.5]]
    target = [[2.0, 0.0, 1.0], [0.0, 1.0, 1.0], [-1.0, 1.0, 0.0]]
    value = alignment_loss(t64(prediction), t64(target))
    assert value.item() == pytest.approx(alignment_by_hand(prediction, target), rel=1e-12)
    assert alignment_loss(4.0 * t64(prediction), 0.5 * t64(target)).item() == pytest.approx(value.item(), rel=1e-12)
    assert alignment_loss(t64(target), 2.0 * t64(target)).item() == pytest.approx(0.0, abs=1e-12)


def test_mlkd_identity_defaults_and_heads():
    cls = method_class("mlkd")
    assert cls.defaults["ce"] == 1.0 and cls.defaults["kd"] == 0.0
    assert (cls.defaults["corr"], cls.defaults["supcon"], cls.defaults["align"]) == (50.0, 1.0, 20.0)
    assert (cls.defaults["tau_corr"], cls.defaults["tau_sup"], cls.defaults["dim"]) == (0.5, 0.07, 128)
    assert cls.needs.embedding and cls.needs.views == "rotations" and cls.needs.joint_views
    assert "Ding" in cls.paper and "2012.00573" in cls.paper and "DLKD" in cls.paper and "mlld" in cls.paper
    method = mlkd_method()
    assert method.corr_head[0].weight.shape == (D_S, D_S) and method.corr_head[3].weight.shape == (D_S, D_S)
    assert method.align_head[0].weight.shape == (16 * D_T, D_S) and method.align_head[3].weight.shape == (D_T, 16 * D_T)
    assert method.embed_s.linear.weight.shape == (128, D_S) and method.embed_t.linear.weight.shape == (128, D_T)


def test_mlkd_terms_wire_the_heads_and_put_ce_on_plain_views_only():
    b = 4
    torch.manual_seed(0)
    method = mlkd_method(kd="0.5")
    s, t = mlkd_outputs(b, D_S, seed=1), mlkd_outputs(b, D_T, seed=2)
    batch = batch_of([0, 1, 2, 1], views=torch.zeros(3 * b, 3, 4, 4))
    terms = method(s, t, batch)
    assert set(terms) == {"ce", "kd", "corr", "supcon", "align"}
    y = batch.y
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s.logits[:b], y).item(), rel=1e-6)
    kl = F.kl_div(F.log_softmax(s.logits[:b] / 4, 1), F.softmax(t.logits[:b] / 4, 1), reduction="batchmean")
    assert terms["kd"].item() == pytest.approx(0.5 * 16 * kl.item(), rel=1e-5)
    f_s, f_t = s.embedding, t.embedding
    with torch.no_grad():  # the heads in train mode again: BatchNorm on the same batch gives the same output
        corr = correlation_loss(method.corr_head(f_s), f_t, b, 0.5)
        sup = supcon_loss(method.embed_s(f_s), method.embed_t(f_t), y.repeat(4))
        assert method.embed_s(f_s).norm(dim=1).sub(1).abs().max() < 1e-6  # unit vectors
        align = alignment_loss(method.align_head(f_s), f_t)
    assert terms["corr"].item() == pytest.approx(50 * corr.item(), rel=1e-5)
    assert terms["supcon"].item() == pytest.approx(sup.item(), rel=1e-5)
    assert terms["align"].item() == pytest.approx(20 * align.item(), rel=1e-5)
    assert set(mlkd_method(align="0")(s, t, batch)) == {"ce", "corr", "supcon"}


def test_mlkd_gradients_reach_the_student_and_every_head():
    b = 4
    method = mlkd_method()
    s, t = mlkd_outputs(b, D_S, seed=3, requires_grad=True), mlkd_outputs(b, D_T, seed=4)
    sum(method(s, t, batch_of([0, 1, 2, 0], views=torch.zeros(3 * b, 3, 4, 4))).values()).backward()
    assert s.embedding.grad.abs().sum() > 0
    assert s.logits.grad[:b].abs().sum() > 0 and s.logits.grad[b:].abs().sum() == 0  # CE on plain views only
    named = dict(method.named_parameters())
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in named.values()}
    for name, p in named.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mlkd_rejects_missing_views_and_embeddings():
    method = mlkd_method()
    s, t = mlkd_outputs(2, D_S, seed=5), mlkd_outputs(2, D_T, seed=6)
    with pytest.raises(KdError, match="rotated views"):
        method(s, t, batch_of([0, 1, 2, 0, 1, 2, 0, 1]))  # 8 labels for 8 rows: no views
    with pytest.raises(KdError, match="no pooled embedding"):
        method_class("mlkd")(Shapes(num_classes=3), Shapes(embedding=D_T, num_classes=3), 10)
    with pytest.raises(KdError, match="positive"):
        mlkd_method(dim="0")


def test_mlkd_state_survives_a_checkpoint(tmp_path):
    b = 4
    torch.manual_seed(1)
    method = mlkd_method()
    s, t = mlkd_outputs(b, D_S, seed=7), mlkd_outputs(b, D_T, seed=8)
    batch = batch_of([0, 1, 2, 0], views=torch.zeros(3 * b, 3, 4, 4))
    method(s, t, batch)  # moves the BatchNorm running statistics off their initial values
    state = method.state_dict()
    assert any(k.endswith("running_mean") for k in state)
    save_state(tmp_path / "ckpt.safetensors", {"method": state})
    torch.manual_seed(2)
    restored = mlkd_method()
    restored.load_state_dict(load_state(tmp_path / "ckpt.safetensors")["method"])
    for key, value in state.items():
        assert torch.equal(restored.state_dict()[key], value), key
    method.eval()
    restored.eval()
    with torch.no_grad():
        a, r = method(s, t, batch), restored(s, t, batch)
    for name in a:
        assert torch.equal(a[name], r[name]), name


def test_mlkd_real_digits_run(distill_digits):
    last = assert_finite_run(distill_digits("mlkd"))
    assert {"train_corr", "train_supcon", "train_align"} <= set(last)
