"""ITKD: the agent's pieces against hand computations, its optimisers, checkpoints, and a real run."""

import json
import math
import os
import signal

import pytest
import torch

from tests.conftest import LEARNED_TOP1, _Silent
from kdcli.batch import Batch
from kdcli.engine.checkpoint import load_state, save_state
from kdcli.errors import KdError
from kdcli.losses import dkd_loss
from kdcli.methods import Shapes, method_class
from kdcli.methods.itkd import (
    batch_accuracy,
    calibrated_rewards,
    clipped_surrogate,
    gae,
    reward_scale,
    state_features,
)
from kdcli.models.features import Outputs

CLASSES = 5


def _build(seed=0, **options):
    torch.manual_seed(seed)
    return method_class("itkd")(Shapes(num_classes=CLASSES), Shapes(num_classes=CLASSES), num_samples=100, **options)


def _inputs(seed, batch=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randn(batch, CLASSES, generator=g)).to(dtype)
    zt = (2 * torch.randn(batch, CLASSES, generator=g)).to(dtype)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    return zs, zt, y


def _step(method, zs, zt, y):
    zs = zs.clone().requires_grad_(True)
    batch = Batch(torch.zeros(y.numel(), 3, 2, 2), y, torch.arange(y.numel()))
    terms = method(Outputs(zs, [], None), Outputs(zt, [], None), batch)
    return terms, zs


def _softmax(z, temp=1.0):
    e = [math.exp(v / temp) for v in z]
    return [v / sum(e) for v in e]


# ---- pure pieces ---------------------------------------------------------------------------------


def test_state_features_match_hand_computation_in_both_variants():
    zs = [[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 2.5, 2.0]]
    zt = [[0.0, 1.0, 4.0, 1.0], [3.0, 0.0, 0.0, 1.0]]
    for code in (False, True):
        got = state_features(torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64), code=code)
        for row, (s, t) in enumerate(zip(zs, zt)):
            p_s, p_t = sorted(_softmax(s)), _softmax(t)
            second = p_s[1] if code else p_s[-2]  # code: kthvalue(p, 2) = second smallest
            expected = [p_s[-1], max(p_t), p_s[-1] - second]
            assert got[row].tolist() == pytest.approx(expected, abs=1e-12)


def test_gae_and_returns_match_a_hand_written_recursion():
    gamma, lam = 0.99, 0.95
    rewards = [0.0, 0.0, 0.0, 0.7]
    values = [0.2, -0.1, 0.4, 0.3]
    last = 0.3
    adv, ret = [0.0] * 4, [0.0] * 4
    next_adv, next_ret, next_value = 0.0, last, last
    for k in reversed(range(4)):
        delta = rewards[k] + gamma * next_value - values[k]
        next_adv = adv[k] = delta + gamma * lam * next_adv
        next_ret = ret[k] = rewards[k] + gamma * next_ret
        next_value = values[k]
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got_adv, got_ret = gae(f64(rewards), f64(values), f64(last), gamma, lam)
    assert got_adv.dtype == torch.float64
    assert got_adv.tolist() == pytest.approx(adv, abs=1e-14)
    assert got_ret.tolist() == pytest.approx(ret, abs=1e-14)


def test_clipped_surrogate_matches_hand_computation():
    logp = [0.0, 0.5, -0.5, 0.1]
    old = [0.0, 0.0, 0.0, 0.3]
    adv = [1.0, 2.0, -1.5, -0.5]
    eps = 0.2
    expected = 0.0
    for lp, lo, a in zip(logp, old, adv):
        ratio = math.exp(lp - lo)
        expected -= min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a) / len(adv)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert clipped_surrogate(f64(logp), f64(old), f64(adv), eps).item() == pytest.approx(expected, abs=1e-14)


def test_reward_scale_follows_the_code_schedule_and_scales_with_the_run():
    def c(amplitude, period, e):
        return amplitude * (1 + (1 + math.cos(math.pi * e / period)) / 2)

    assert reward_scale(1) == pytest.approx(c(10, 75, 1))
    assert reward_scale(20) == pytest.approx(c(10, 75, 20))
    assert reward_scale(140) == pytest.approx(c(10, 75, 140))
    assert reward_scale(160) == pytest.approx(c(5, 30, 160))
    assert reward_scale(220) == pytest.approx(c(2, 30, 220))
    assert reward_scale(240) == pytest.approx(4.0)  # intent: the last piece, 2 * (1 + 1)
    assert reward_scale(240, code=True) == 1.0  # the code has no branch for e = 240
    assert reward_scale(50, epochs=120) == pytest.approx(reward_scale(100))
    assert reward_scale(1, epochs=2) == pytest.approx(c(10, 75, 120))


def test_macro_accuracy_is_torchmetrics_mean_recall_over_seen_classes():
    logits = torch.eye(4)[[0, 1, 1, 3]] * 5.0  # predictions 0, 1, 1, 3
    target = torch.tensor([0, 1, 2, 2])  # class 3 predicted only, class 2 never right
    assert batch_accuracy(logits, target).item() == pytest.approx(0.5)
    # recalls: class0 1, class1 1, class2 0, class3 0 (no support, but predicted) -> 2 / 4
    assert batch_accuracy(logits, target, macro=True).item() == pytest.approx(0.5)
    assert batch_accuracy(logits[:3], target[:3], macro=True).item() == pytest.approx(2 / 3)


def test_calibrated_rewards_sum_to_the_return():
    g = torch.tensor([0.1, -0.2, 0.4], dtype=torch.float64)
    r = calibrated_rewards(g, torch.tensor(1.0, dtype=torch.float64))
    assert r.sum().item() == pytest.approx(1.0, abs=1e-14)
    assert (r - g).tolist() == pytest.approx([0.7 / 3] * 3, abs=1e-14)


# ---- the method ----------------------------------------------------------------------------------


def test_schedule_scales_defaults_with_the_run_and_keeps_explicit_values():
    method = _build()
    method.on_epoch_start(1, 240)
    assert method.schedule == {"warmup": 20, "rl_every": 20, "dkd_warmup": 20}
    method.on_epoch_start(1, 2)
    assert method.schedule == {"warmup": 1, "rl_every": 1, "dkd_warmup": 1}
    method.on_epoch_start(1, 24)
    assert method.schedule == {"warmup": 2, "rl_every": 2, "dkd_warmup": 2}
    explicit = _build(warmup=5)
    explicit.on_epoch_start(1, 24)
    assert explicit.schedule["warmup"] == 5 and explicit.schedule["rl_every"] == 2
    assert _build(host="dkd").hp["ce"] == 1.0 and _build(host="dkd", ce=0.5).hp["ce"] == 0.5


@pytest.mark.parametrize("options", [{"variant": "paper"}, {"host": "crd"}, {"purify": "true", "purify_every": "0"}, {"rl_every": 0}])
def test_bad_options_are_clean_errors(options):
    with pytest.raises(KdError):
        _build(**options)


def test_warmup_uses_the_fixed_temperature_then_the_agent_acts():
    method = _build(warmup=2, rl_every=2)
    zs, zt, y = _inputs(0)
    method.on_epoch_start(1, 10)
    assert torch.equal(method.temperatures(zs, zt, y), torch.full((8,), 4.0))
    assert method.epoch_metrics()["itkd_T_mean"] == pytest.approx(4.0)
    assert method.epoch_metrics()["itkd_T_std"] == 0.0
    method.on_epoch_start(2, 10)
    assert method.temperatures(zs, zt, y).std() > 0


def test_temperatures_stay_in_range():
    zs, zt, y = _inputs(1, batch=256)
    for variant in ("intent", "code"):
        method = _build(variant=variant, warmup=1)
        method.on_epoch_start(1, 10)
        with torch.no_grad():
            method.actor.log_std_parts.fill_(0.3)  # sigma = e^2.5: many samples saturate
        temps = method.temperatures(zs, zt, y)
        assert temps.max() <= 10.0 and temps.min() >= 0.0
        if variant == "intent":
            assert temps.min() == 1.0 and temps.max() == 10.0  # clamped to [1, 10]
        else:
            assert temps.min() < 1.0  # 10 * sigmoid(u), unclamped


def test_kd_term_equals_a_per_sample_loop_with_the_chosen_temperatures():
    method = _build(warmup=1, rl_every=2)  # acts, does not learn: temperatures() has no side effects on T
    method.on_epoch_start(1, 10)
    zs, zt, y = _inputs(2, dtype=torch.float64)
    torch.manual_seed(7)
    temps = method.temperatures(zs, zt, y).tolist()
    torch.manual_seed(7)
    terms, _ = _step(method, zs, zt, y)
    kl_sum, ce_sum = 0.0, 0.0
    for s, t, label, temp in zip(zs.tolist(), zt.tolist(), y.tolist(), temps):
        p, q = _softmax(t, temp), _softmax(s, temp)
        kl_sum += temp * temp * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        ce_sum -= math.log(_softmax(s)[label])
    assert len(set(temps)) == len(temps)  # really per instance
    assert terms["kd"].item() == pytest.approx(0.9 * kl_sum / len(temps), rel=1e-9)
    assert terms["ce"].item() == pytest.approx(0.1 * ce_sum / len(temps), rel=1e-12)


def test_dkd_host_per_instance_and_the_code_broadcast():
    zs, zt, y = _inputs(3, dtype=torch.float64)
    temps = torch.linspace(1.0, 9.0, 8, dtype=torch.float64)
    per_sample = [dkd_loss(zs[i : i + 1], zt[i : i + 1], y[i : i + 1], 1.0, 8.0, temps[i].item()) for i in range(8)]
    kl = [loss / temps[i] ** 2 for i, loss in enumerate(per_sample)]  # dkd_loss(scalar T) includes T^2
    intent = _build(host="dkd")
    intent.on_epoch_start(5, 240)  # DKD warm-up: weight 5 / 20
    got = intent.host_loss(zs, zt, y, temps)
    assert got.item() == pytest.approx(0.25 * sum(per_sample).item() / 8, rel=1e-10)
    code = _build(host="dkd", variant="code")
    code.on_epoch_start(5, 240)
    expected = 0.25 * (sum(kl) / 8) * (temps**2).mean()
    assert code.host_loss(zs, zt, y, temps).item() == pytest.approx(expected.item(), rel=1e-10)


def _agent_parameters(method):
    return {name: p for name, p in method.named_parameters()}


def test_agent_learns_with_its_own_optimisers_only_and_the_student_gets_gradient():
    method = _build(warmup=1, rl_every=1)
    assert method.trainable_parameters() == []
    optimizers = method.own_optimizers()
    assert set(optimizers) == {"actor", "critic", "redistribution", "detector"}
    owned = {id(p) for opt in optimizers.values() for group in opt.param_groups for p in group["params"]}
    assert owned == {id(p) for p in method.parameters()}
    assert optimizers["actor"].param_groups[0]["lr"] == 1e-4 and optimizers["critic"].param_groups[0]["lr"] == 1e-3
    before = {name: p.detach().clone() for name, p in _agent_parameters(method).items()}
    method.on_epoch_start(1, 2)
    for step in range(3):
        zs, zt, y = _inputs(10 + step)
        terms, student = _step(method, zs, zt, y)
        sum(terms.values()).backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        # the student's loss never reaches the agent (T is a constant there)
        assert all(p.grad is None for p in method.parameters())
    assert method.epoch_metrics()["itkd_agent_updates"] == 2.0
    for name, p in _agent_parameters(method).items():
        assert not torch.equal(p.detach(), before[name]), f"{name} was not updated"


@pytest.mark.parametrize("variant", ["intent", "code"])
def test_agent_and_optimisers_survive_a_checkpoint_and_resume_identically(tmp_path, variant):
    method = _build(seed=0, warmup=1, rl_every=1, variant=variant)
    method.on_epoch_start(1, 3)
    for step in range(3):
        _step(method, *_inputs(20 + step))
    path = tmp_path / "state.safetensors"
    optimizers = {k: o.state_dict() for k, o in method.own_optimizers().items()}
    save_state(path, {"method": method.state_dict(), "opt": optimizers})
    state = load_state(path)

    def restored(with_optimizers=True):
        fresh = _build(seed=123, warmup=1, rl_every=1, variant=variant)
        fresh.load_state_dict(state["method"])
        if with_optimizers:
            for name, opt in fresh.own_optimizers().items():
                opt.load_state_dict(state["opt"][name])
        return fresh

    resumed, weights_only = restored(), restored(with_optimizers=False)
    for key, value in method.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key

    def next_epoch(m):
        m.on_epoch_start(2, 3)
        temps = []
        for step in range(3):
            torch.manual_seed(100 + step)
            temps.append(m.temperatures(*_inputs(30 + step)))
        return temps

    original, again, no_adam_state = next_epoch(method), next_epoch(resumed), next_epoch(weights_only)
    for a, b in zip(original, again):
        assert torch.equal(a, b)
    assert torch.equal(original[0], no_adam_state[0])  # same weights, no update yet this epoch
    assert not torch.equal(original[1], no_adam_state[1])  # Adam's moments shaped the first update


def test_distill_digits_with_the_agent_acting_and_learning(distill_digits):
    summary = distill_digits("itkd", warmup=1, rl_every=1)
    lines = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    assert len(lines) == 3
    for line in lines:
        assert math.isfinite(line["train_loss"]) and math.isfinite(line["train_kd"])
        assert 1.0 <= line["itkd_T_mean"] <= 10.0 and math.isfinite(line["itkd_T_std"]) and line["itkd_T_std"] > 0
        assert line["itkd_agent_updates"] > 0
    assert summary["top1"] > LEARNED_TOP1, summary


class _CtrlCInEpoch2(_Silent):
    """Presses Ctrl-C during step 4 of epoch 2 (the loop stops after it)."""

    def step(self, epoch, step, *rest):
        if (epoch, step) == (2, 4):
            os.kill(os.getpid(), signal.SIGINT)


def test_mid_epoch_stop_and_resume_in_a_learning_epoch_is_bit_exact(tmp_path):
    """A Ctrl-C inside a learning epoch checkpoints the rollout still waiting for its reward (and the
    epoch's temperature sums): the resumed run equals the uninterrupted one bit for bit."""
    from kdcli import api
    from kdcli.config import build_config
    from kdcli.models import create_model
    from kdcli.teachers import save_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    save_model(teacher, create_model("resnet8", num_classes=4), arch="resnet8", num_classes=4, dataset="synthetic")

    def config(out):
        return build_config({"command": "distill", "teacher": str(teacher), "student": "resnet8", "method": "itkd",
                             "options": {"warmup": 1, "rl_every": 1}, "data": "synthetic:classes=4,n=200,size=16",
                             "epochs": 2, "batch_size": 16, "device": "cpu", "seed": 1, "out": str(out)})

    api.run(config(tmp_path / "straight"), reporter=_Silent())
    with pytest.raises(KdError, match="interrupted at step 4/"):
        api.run(config(tmp_path / "stopped"), reporter=_CtrlCInEpoch2())
    state = load_state(tmp_path / "stopped" / "checkpoints" / "last.safetensors")
    assert state["partial"]["epoch"] == 2 and state["ranks"][0]["method"]["pending"] is not None
    api.resume(tmp_path / "stopped", reporter=_Silent())

    got, expected = (load_file(tmp_path / run / "student.safetensors") for run in ("stopped", "straight"))
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    measured = {"epoch_time_s", "images_per_s", "peak_memory_mb"}
    lines = [[{k: v for k, v in json.loads(line).items() if k not in measured}
              for line in open(tmp_path / run / "metrics.jsonl")] for run in ("stopped", "straight")]
    assert lines[0] == lines[1] and lines[0][1]["itkd_agent_updates"] > 0
