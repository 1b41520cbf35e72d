"""The RepDistiller / mdistiller zoo: cc, vid, ab, ft, fsp, nst, ofd, reviewkd, kdsvd, dist (+ DOT,
the init stage and FitNet's two-stage form).

Losses themselves are golden-tested in test_losses_zoo.py. Here: the wiring (which features, which
weights, stage weights, warm-up), gradients into the student and every head, state round trips,
the init stage (marks, optimizer, exact resume) and short real runs through `kd distill`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from kdcli import api, losses as L
from kdcli.api import shapes_of
from kdcli.batch import Batch
from kdcli.config import build_config
from kdcli.engine.checkpoint import load_state, save_state
from kdcli.engine.dot import DOT
from kdcli.errors import KdError
from kdcli.methods import Shapes, list_methods, method_class
from kdcli.models import create_model
from kdcli.models.features import forward_outputs
from kdcli.models.prerelu import stage_bns
from kdcli.teachers import save_model
from tests.conftest import Crash, CrashAfterFirstEpoch, LEARNED_TOP1, MEASURED_FIELDS, TINY_DATA

NEW = ["cc", "vid", "ab", "ft", "fsp", "nst", "ofd", "reviewkd", "kdsvd", "dist"]
STAGED = {"ab", "ft", "fsp"}
RANGE_KINDS = {"positive", "nonnegative", "fraction", "count", "any"}


# ---- registry, defaults, ranges -------------------------------------------------------------------

def test_every_new_method_is_listed_with_paper_and_ranges():
    methods = list_methods()
    for name in NEW:
        cls = methods[name]
        assert cls.title and cls.paper and cls.year > 2000
        assert set(cls.ranges) <= set(cls.defaults) and set(cls.ranges.values()) <= RANGE_KINDS


@pytest.mark.parametrize("name, weight", [("cc", 0.02), ("vid", 1.0), ("ft", 200.0), ("nst", 50.0), ("ofd", 1e-3),
                                          ("reviewkd", 5.0), ("kdsvd", 1.0), ("dist", 2.0), ("ab", 1.0), ("fsp", 50.0)])
def test_defaults_are_repdistiller_and_mdistiller_weights(name, weight):
    defaults = method_class(name).defaults
    assert defaults["beta"] == weight and defaults["ce"] == 1.0 and defaults["kd"] == 0.0
    assert defaults.get("init_epochs", 0) == (30 if name in STAGED else 0)


# ---- real (tiny) networks -------------------------------------------------------------------------

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


def _nets(student="resnet8", teacher="resnet20"):
    torch.manual_seed(0)
    return create_model(student, num_classes=4), create_model(teacher, num_classes=4)


def _method(name, s_net, t_net, **options):
    extra = {"teacher_bn": stage_bns(t_net)} if method_class(name).needs.teacher_bn else {}
    return method_class(name)(shapes_of(s_net, X), shapes_of(t_net, X), num_samples=8, **extra, **options)


def _outputs(method, s_net, t_net):
    needs = method.needs
    s_out = forward_outputs(s_net, X, preact=needs.preact)
    with torch.no_grad():
        t_out = forward_outputs(t_net, X, preact=needs.preact or needs.teacher_preact)
    return s_out, t_out


def _terms(method, s_net, t_net):
    s_out, t_out = _outputs(method, s_net, t_net)
    return method(s_out, t_out, Batch(X, Y, torch.arange(4)))


def _no_grad_missing(params):
    return [p.shape for p in params if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]


PAIRS = {"fsp": ("resnet8", "resnet20"), "kdsvd": ("resnet8", "resnet20")}


@pytest.mark.parametrize("name", [n for n in NEW if n not in STAGED] + ["ft"])
def test_main_stage_gradients_reach_the_student_and_every_head(name):
    s_net, t_net = _nets(*PAIRS.get(name, ("resnet8", "resnet20")))
    method = _method(name, s_net, t_net)
    method.on_epoch_start(20, 240)  # past ReviewKD's warm-up
    terms = _terms(method, s_net, t_net)
    assert name in terms and torch.isfinite(terms[name])
    terms[name].backward()
    assert _no_grad_missing(method.trainable_parameters()) == []
    # feature methods reach every layer but the classifier; dist (logits) reaches all of them
    reached = [p for n, p in s_net.named_parameters() if name == "dist" or not n.startswith("fc.")]
    assert _no_grad_missing(reached) == []
    assert all(p.grad is None for p in t_net.parameters())


@pytest.mark.parametrize("name", ["ab", "fsp", "ft"])
def test_init_stage_terms_train_exactly_the_init_parameters(name):
    s_net, t_net = _nets()
    method = _method(name, s_net, t_net)
    method.stage = "init"
    terms = _terms(method, s_net, t_net)
    assert list(terms) == [{"ft": "paraphraser"}.get(name, name)] and "ce" not in terms
    sum(terms.values()).backward()
    init = method.init_parameters(s_net)
    assert init and _no_grad_missing(init) == []
    assert all(p.grad is None for p in s_net.fc.parameters())  # the classifier is not in the init stage
    if name == "ft":
        assert all(p.grad is None for p in s_net.parameters())  # FT's init stage leaves the student alone
        assert not method.init_trains_student()


@pytest.mark.parametrize("name", ["ab", "fsp"])
def test_ab_and_fsp_main_stage_is_cross_entropy_only(name):
    s_net, t_net = _nets()
    method = _method(name, s_net, t_net)
    terms = _terms(method, s_net, t_net)
    assert list(terms) == ["ce"]
    assert method.trainable_parameters() == []


def test_ft_paraphraser_is_frozen_in_the_main_stage():
    s_net, t_net = _nets()
    method = _method("ft", s_net, t_net)
    main = {id(p) for p in method.trainable_parameters()}
    assert main and not main & {id(p) for p in method.paraphraser.parameters()}
    assert method.translator[-1].negative_slope == 0.1 and len([m for m in method.translator if isinstance(m, torch.nn.BatchNorm2d)]) == 3
    assert method.paraphraser.encoder[-2].out_channels == 32  # int(0.5 * 64)


# ---- wiring against the formulas ---------------------------------------------------------------------

def test_cc_is_beta_times_cc_loss_of_the_linear_heads():
    s_net, t_net = _nets()
    method = _method("cc", s_net, t_net)
    s_out, t_out = _outputs(method, s_net, t_net)
    got = method(s_out, t_out, Batch(X, Y, torch.arange(4)))["cc"]
    f_s, f_t = method.embed_s(s_out.embedding), method.embed_t(t_out.embedding)
    assert f_s.shape == (4, 128) and f_s.norm(dim=1).sub(1).abs().max() > 1e-3  # not L2-normalised
    assert float(got.detach()) == pytest.approx(0.02 * float(L.cc_loss(f_s, f_t).detach()), rel=1e-6)


def test_dist_uses_tau_and_its_inner_weights():
    method = method_class("dist")(Shapes(num_classes=4), Shapes(num_classes=4), 8, tau=2.0, inter_weight=0.5)
    s, t = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    out = lambda z: type("O", (), {"logits": z, "features": [], "embedding": None})()  # noqa: E731
    got = method.distill(out(s), out(t), Batch(X, Y, None))["dist"]
    assert float(got) == pytest.approx(2.0 * float(L.dist_loss(s, t, 0.5, 1.0, 2.0)), rel=1e-9)


def test_ab_weights_layers_by_powers_of_two():
    s_net, t_net = _nets()
    method = _method("ab", s_net, t_net)
    method.stage = "init"
    s_out, t_out = _outputs(method, s_net, t_net)
    got = method(s_out, t_out, Batch(X, Y, None))["ab"]
    expected = sum(w * L.ab_loss(s_out.features[i], t_out.features[i]) for i, w in zip((1, 2, 3), (0.25, 0.5, 1.0)))
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert all(isinstance(c, torch.nn.Identity) for c in method.connectors)  # resnet8 / resnet20: equal shapes


def test_ofd_margins_stage_weights_and_preact_teacher():
    s_net, t_net = _nets()
    method = _method("ofd", s_net, t_net)
    bns = stage_bns(t_net)
    assert [bn is t_net.layer3[-1].bn2 for bn in bns][-1]
    s_out, t_out = _outputs(method, s_net, t_net)
    got = method(s_out, t_out, Batch(X, Y, None))["ofd"]
    expected = 0.0
    for i in range(3):
        margin = L.ofd_margin(bns[i]).reshape(1, -1, 1, 1)
        expected += L.ofd_loss(method.connectors[i](s_out.features[i + 1]), t_out.features[i + 1], margin) / 2 ** (2 - i)
    assert float(got.detach()) == pytest.approx(1e-3 * float(expected.detach()), rel=1e-5)


def test_ofd_teacher_bn_uses_batch_statistics_without_moving_buffers():
    from kdcli.engine.teacher_pass import teacher_mode

    _, t_net = _nets()
    t_net.eval()
    before = {k: v.clone() for k, v in t_net.state_dict().items()}
    with torch.no_grad():
        eval_logits = t_net(X)
        with teacher_mode(t_net, method_class("ofd").needs):
            batch_logits = t_net(X)
    assert not torch.allclose(eval_logits, batch_logits)
    assert all(torch.equal(before[k], v) for k, v in t_net.state_dict().items())
    assert not t_net.training and all(not m.training for m in t_net.modules())


def test_reviewkd_shapes_follow_the_official_per_pair_table_and_warm_up():
    s_net, t_net = _nets("resnet8x4", "resnet32x4")
    method = _method("reviewkd", s_net, t_net)
    assert [abf.conv1[0].in_channels for abf in method.abfs] == [64, 128, 256, 256]
    assert [abf.conv2[0].out_channels for abf in method.abfs] == [64, 128, 256, 256]
    assert [abf.att is None for abf in method.abfs] == [False, False, False, True]
    assert method.out_sizes == [(16, 16), (8, 8), (4, 4), (1, 1)]  # 16x16 inputs: 32, 16, 8 at 32x32
    values = []
    for epoch in (1, 10, 20, 40):
        method.on_epoch_start(epoch, 240)
        values.append(float(_terms(method, s_net, t_net)["reviewkd"]))
    assert values[1] / values[0] == pytest.approx(10.0, rel=1e-6)
    assert values[3] / values[0] == pytest.approx(20.0, rel=1e-6) and values[2] == pytest.approx(values[3])


def test_fsp_and_kdsvd_refuse_unequal_channels():
    s_net, t_net = _nets("wrn_16_1", "wrn_16_2")
    for name in ("fsp", "kdsvd"):
        with pytest.raises(KdError, match="channel"):
            _method(name, s_net, t_net)


def test_vid_variance_starts_at_init_var_and_can_be_frozen():
    s_net, t_net = _nets()
    method = _method("vid", s_net, t_net)
    assert torch.allclose(torch.nn.functional.softplus(method.log_scales[0]) + 1e-5, torch.tensor(5.0))
    frozen = _method("vid", s_net, t_net, learn_variance="false")
    assert all(not p.requires_grad for p in frozen.log_scales)
    assert len(frozen.trainable_parameters()) == len(method.trainable_parameters()) - 3


# ---- state round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
def test_state_round_trips_through_a_checkpoint(name, tmp_path):
    s_net, t_net = _nets()
    a = _method(name, s_net, t_net)
    torch.manual_seed(123)
    b = _method(name, s_net, t_net)
    save_state(tmp_path / "m.safetensors", {"method": a.state_dict()})
    b.load_state_dict(load_state(tmp_path / "m.safetensors")["method"])
    for (k, v), (k2, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, w)
    a.eval(), b.eval()
    if name not in ("ab", "fsp"):
        assert torch.equal(_terms(a, s_net, t_net)[name], _terms(b, s_net, t_net)[name])


# ---- DOT ------------------------------------------------------------------------------------------

def test_dot_update_matches_the_rule_by_hand():
    """Two parameters: w gets both gradients, h (a head) only the distillation one."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    h = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = DOT([w, h], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.01)
    ww, hh = 1.0, 2.0
    v = u = uh = None
    for _ in range(3):
        # task = 3 w^2 (grad 6w), distill = w * h + h^2 (grads h for w, w + 2h for h)
        g_t, g_dw, g_dh = 6 * ww, hh, ww + 2 * hh
        opt.backward_step({"ce": 3 * w[0] ** 2, "kd": w[0] * h[0] + h[0] ** 2})
        d = g_t + 0.01 * ww
        v = d if v is None else 0.825 * v + d
        ww -= 0.1 * v
        u = g_dw if u is None else 0.975 * u + g_dw
        ww -= 0.1 * u
        uh = g_dh if uh is None else 0.9 * uh + g_dh + 0.01 * hh
        hh -= 0.1 * uh
        assert float(w) == pytest.approx(ww, rel=1e-12) and float(h) == pytest.approx(hh, rel=1e-12)
    state = opt.state_dict()["state"]
    assert set(state[0]) == {"momentum_buffer", "momentum_kd_buffer"} and set(state[1]) == {"momentum_kd_buffer"}


def test_dot_without_distillation_terms_is_sgd_with_momentum():
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    ref = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    dot, sgd = DOT([w], lr=0.1, momentum=0.9), torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for _ in range(3):
        dot.backward_step({"ce": w[0] ** 2})
        sgd.zero_grad()
        (ref[0] ** 2).backward()
        sgd.step()
    assert float(w) == pytest.approx(float(ref), rel=1e-12)


def test_dot_delta_is_validated(kd):
    result = kd("distill", "--method", "kd", "--optimizer", "dot", "--dot-delta", "0.2", "--data", TINY_DATA)
    assert result.code == 2 and "dot-delta" in result.stderr and "Traceback" not in result.stderr
    result = kd("distill", "--method", "kd", "--optimizer", "adam", "--data", TINY_DATA)
    assert result.code == 2 and "--optimizer" in result.stderr


# ---- the init stage in a real run: marks, lr, exact resume ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("zoo_teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_model(path, create_model("resnet8", num_classes=4), arch="resnet8", num_classes=4, dataset="synthetic")
    return str(path)


def _staged_layers(teacher, method="fitnet", options=None):
    return {"command": "distill", "teacher": teacher, "student": "resnet8", "method": method, "data": TINY_DATA,
            "options": options if options is not None else {"init_epochs": "2", "init_lr": "0.02", "kd": "0.9", "ce": "0.1"},
            "epochs": 2, "batch_size": 32, "lr": 0.05, "device": "cpu", "seed": 3}


def test_init_stage_is_marked_in_metrics_with_its_own_lr(tiny_teacher, tmp_path):
    summary = api.run(build_config(_staged_layers(tiny_teacher), {"out": str(tmp_path / "run")}))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["epoch"], x["stage"], x["stage_epoch"]) for x in lines] == [(1, "init", 1), (2, "init", 2), (3, "main", 1), (4, "main", 2)]
    assert [x["lr"] for x in lines[:2]] == [0.02, 0.02] and lines[2]["lr"] == 0.05
    assert "train_fitnet" in lines[0] and "train_ce" not in lines[0]
    assert "train_fitnet" not in lines[2] and {"train_ce", "train_kd"} <= set(lines[2])
    assert summary["best_epoch"] >= 3  # best weights come from the main stage


@pytest.mark.parametrize("crash_after", [1, 2])
def test_resume_inside_and_right_after_the_init_stage_is_exact(tiny_teacher, tmp_path, crash_after):
    layers = _staged_layers(tiny_teacher)
    straight = api.run(build_config(layers, {"out": str(tmp_path / "straight")}))

    class Crash(Exception):
        pass

    class StopAfter:
        def start(self, *a): ...
        def step(self, *a, **k): ...
        def finish(self): ...
        def epoch_end(self, metrics):
            if metrics["epoch"] == crash_after:
                raise Crash

    with pytest.raises(Crash):
        api.run(build_config(layers, {"out": str(tmp_path / "resumed")}), reporter=StopAfter())
    resumed = api.resume(tmp_path / "resumed")
    assert resumed["top1"] == straight["top1"]

    def weights(run):
        with safe_open(str(tmp_path / run / "student.safetensors"), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}

    a, b = weights("straight"), weights("resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def metrics(run):
        return [{k: v for k, v in json.loads(x).items() if k not in MEASURED_FIELDS}
                for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert metrics("straight") == metrics("resumed")


def test_dot_run_resumes_exactly(tiny_teacher, tmp_path):
    layers = {**_staged_layers(tiny_teacher, "kd", {}), "optimizer": "dot", "epochs": 2}
    straight = api.run(build_config(layers, {"out": str(tmp_path / "straight")}))

    with pytest.raises(Crash):
        api.run(build_config(layers, {"out": str(tmp_path / "resumed")}), reporter=CrashAfterFirstEpoch())
    state = load_state(tmp_path / "resumed" / "checkpoints" / "last.safetensors")
    assert any("momentum_kd_buffer" in s for s in state["optimizer"]["state"].values())
    assert api.resume(tmp_path / "resumed")["top1"] == straight["top1"]


# ---- short real runs through `kd distill` ----------------------------------------------------------

def _distill_digits(kd, teacher, tmp_path, method, *extra):
    out = tmp_path / method
    result = kd("distill", "--teacher", teacher, "--student", "resnet8", "--method", method, "--data", "digits",
                "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--device", "cpu", "--seed", "0",
                "--out", out, "--json", *extra)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout), [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# The default suite keeps three (a logit method, the teacher-BN path, the init stage); the rest are slow.
FAST_RUNS = [("dist", ()), ("ofd", ()), ("fsp", ("--set", "init_epochs=1"))]
SLOW_RUNS = [("cc", ()), ("nst", ()), ("vid", ()), ("kdsvd", ()), ("reviewkd", ()), ("ab", ("--set", "init_epochs=1")),
             ("ft", ("--set", "init_epochs=1")), ("kd", ("--optimizer", "dot"))]


def _check_run(summary, lines, method, extra):
    staged = "init_epochs=1" in extra
    assert len(lines) == 3 + staged and lines[-1]["stage" if staged else "epoch"] == ("main" if staged else 3)
    assert all(math.isfinite(v) for line in lines for k, v in line.items() if k.startswith("train_") and isinstance(v, float))
    assert summary["top1"] > LEARNED_TOP1, summary


@pytest.mark.parametrize("method, extra", FAST_RUNS)
def test_short_digits_run_through_kd_distill_learns(kd, digits_teacher, tmp_path, method, extra):
    _check_run(*_distill_digits(kd, digits_teacher, tmp_path, method, *extra), method, extra)


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", SLOW_RUNS)
def test_short_digits_run_through_kd_distill_learns_slow(kd, digits_teacher, tmp_path, method, extra):
    _check_run(*_distill_digits(kd, digits_teacher, tmp_path, method, *extra), method, extra)


# ---- presets ------------------------------------------------------------------------------------

def _preset(name):
    from kdcli.config import load_preset
    from kdcli.methods.base import resolve_hparams

    config = build_config(load_preset(name))
    assert (config.data, config.epochs, config.batch_size, config.milestone_epochs()) == ("cifar100", 240, 64, [150, 180, 210])
    return config, resolve_hparams(method_class(config.method), config.options)


@pytest.mark.parametrize("pair, beta", [("res32x4-res8x4", 5.0), ("res56-res20", 0.6), ("res110-res32", 1.0),
                                        ("wrn40_2-wrn16_2", 5.0), ("wrn40_2-wrn40_1", 5.0), ("res32x4-shv1", 5.0),
                                        ("wrn40_2-shv1", 5.0), ("res32x4-shv2", 8.0)])
def test_reviewkd_pair_presets_hold_the_official_weights(pair, beta):
    config, hp = _preset(f"cifar100-reviewkd-{pair}")
    assert config.method == "reviewkd" and (hp["beta"], hp["warmup"], hp["ce"], hp["kd"]) == (beta, 20, 1.0, 0.0)
    assert config.lr == (0.01 if "shv" in pair else 0.05)


@pytest.mark.parametrize("pair, beta", [("res56-res20", 2.0), ("res110-res32", 2.0), ("vgg13-vgg8", 2.0),
                                        ("vgg13-mv2", 2.0), ("wrn40_2-wrn16_2", 2.0), ("wrn40_2-wrn40_1", 2.0),
                                        ("wrn40_2-shv1", 2.0), ("res32x4-res8x4", 8.0), ("res32x4-shv1", 8.0),
                                        ("res32x4-shv2", 8.0)])
def test_itkd_dkd_pair_presets_hold_per_teacher_betas(pair, beta):
    config, hp = _preset(f"cifar100-itkd-dkd-{pair}")
    assert config.method == "itkd" and hp["host"] == "dkd" and hp["dkd_beta"] == beta and hp["dkd_alpha"] == 1.0
    assert config.lr == (0.05 if "shv" in pair or "mv2" not in pair else 0.01)  # ITKD: 0.05 for ShuffleNets too


def test_dist_ofd_and_crd_kd_presets():
    for pair in ("res56-res20", "wrn40_2-wrn40_1", "res32x4-res8x4", "r50-mv2", "res32x4-shv1", "res32x4-shv2"):
        config, hp = _preset(f"cifar100-dist-{pair}")
        assert (hp["tau"], hp["beta"], hp["ce"]) == (4.0, 2.0, 1.0)
    config, hp = _preset("cifar100-ofd-res32x4-res8x4")
    assert hp["beta"] == 1e-3
    config, hp = _preset("cifar100-crd-kd")
    assert config.method == "crd" and (hp["ce"], hp["kd"], hp["beta"]) == (1.0, 1.0, 0.8)


def test_bench_grids_cover_the_repdistiller_and_mdistiller_methods():
    from kdcli.config import load_preset

    bench = load_preset("cifar100-bench")["compare"]["methods"]
    assert {"cc", "vid", "ab", "ft", "nst", "fitnet", "at", "sp", "rkd", "pkt", "crd", "kd"} <= set(bench)
    assert load_preset("cifar100-bench-fsp")["compare"]["methods"] == ["fsp"]
    assert {"ofd", "reviewkd", "dist", "dkd"} <= set(load_preset("cifar100-bench-mdistiller")["compare"]["methods"])


# ---- data-parallel (gloo) ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("ab", ["--set", "init_epochs=1"]), ("ofd", []), ("reviewkd", [])])
def test_two_process_runs_of_staged_and_teacher_bn_methods(tiny_teacher, tmp_path, method, extra):
    import os
    import subprocess
    import sys

    out = tmp_path / method
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "kdcli", "distill", "--teacher", tiny_teacher, "--student", "resnet8",
                           "--method", method, *extra, "--data", TINY_DATA, "--epochs", "2", "--batch-size", "32",
                           "--device", "cpu", "--nproc", "2", "--out", str(out), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["processes"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 + bool(extra)


def test_ofd_teacher_bn_eval_option_turns_batch_statistics_off():
    s_net, t_net = _nets()
    assert _method("ofd", s_net, t_net).needs.teacher_batch_stats
    assert not _method("ofd", s_net, t_net, teacher_bn_eval="true").needs.teacher_batch_stats


def test_ofd_refuses_a_teacher_without_known_stage_bns():
    from kdcli.models.prerelu import stage_bns

    with pytest.raises(KdError, match="BatchNorm"):
        stage_bns(create_model("ShuffleV1", num_classes=4))
