"""Training recipes (issue 17): optimizers, lr schedules, accumulation, clipping, EMA, label smoothing,
exact resume with each, the logs (summary.csv, TensorBoard), the recipe block, and the presets."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdcli import api
from kdcli.batch import Batch
from kdcli.config import build_config, list_presets, load_preset
from kdcli.engine.ema import ModelEma
from kdcli.engine.optim import GradientStep, OptimizerSettings, build_optimizer, optimizer_names
from kdcli.engine.schedule import LrSchedule
from kdcli.engine.trainer import Stopped
from kdcli.methods import Shapes, method_class
from kdcli.methods.base import resolve_hparams
from kdcli.models.features import Outputs
from tests.conftest import MEASURED_FIELDS, TINY_DATA, assert_clean_error

CPU = torch.device("cpu")


# ---- schedules: values at chosen steps, computed by hand ------------------------------------------

def test_cosine_with_warmup_at_chosen_steps():
    # 10 epochs x 10 steps, 2 warm-up epochs: W = 20, K = 100.
    s = LrSchedule("cosine", lr=0.1, epochs=10, steps_per_epoch=10, warmup_epochs=2)
    assert s.at(0) == pytest.approx(0.1 * 1 / 20)  # first step is not at zero
    assert s.at(9) == pytest.approx(0.05)
    assert s.at(19) == pytest.approx(0.1)  # warm-up ends at lr0
    assert s.at(20) == pytest.approx(0.1)  # cosine starts at lr0
    assert s.at(60) == pytest.approx(0.05)  # half way through the 80 cosine steps: cos(pi/2) = 0
    assert s.at(40) == pytest.approx(0.1 * (1 + math.sqrt(0.5)) / 2)  # a quarter: cos(pi/4)
    assert s.at(99) == pytest.approx(0.1 * (1 - math.cos(math.pi / 80)) / 2)  # last: cos(79 pi/80) = -cos(pi/80)
    floor = LrSchedule("cosine", lr=0.1, epochs=10, steps_per_epoch=10, warmup_epochs=2, min_lr=0.01)
    assert floor.at(60) == pytest.approx(0.055) and floor.at(20) == pytest.approx(0.1)


def test_multistep_step_and_constant_at_chosen_steps():
    m = LrSchedule("multistep", lr=0.05, epochs=240, steps_per_epoch=5, milestones=[150, 180, 210], decay=0.1)
    assert m.at(m.step_of(150, 4)) == pytest.approx(0.05)  # last step of epoch 150
    assert m.at(m.step_of(151, 0)) == pytest.approx(0.005)
    assert m.at(m.step_of(181, 2)) == pytest.approx(0.0005)
    assert m.at(m.step_of(240, 4)) == pytest.approx(0.00005)
    warm = LrSchedule("multistep", lr=0.4, epochs=3, steps_per_epoch=4, milestones=[2], decay=0.5, warmup_epochs=1)
    # Warm-up through epoch 1, epochs 1-2 (milestone 2 included) at lr0, epoch 3 halved.
    assert [warm.at(k) for k in range(12)] == pytest.approx([0.1, 0.2, 0.3, 0.4] + [0.4] * 4 + [0.2] * 4)
    step = LrSchedule("step", lr=0.1, epochs=90, steps_per_epoch=3, step_size=30, decay=0.1)
    assert [step.epoch_lr(e) for e in (1, 30, 31, 60, 61, 90)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    constant = LrSchedule("constant", lr=0.3, epochs=2, steps_per_epoch=4, warmup_epochs=0.5)
    assert [constant.at(k) for k in range(8)] == pytest.approx([0.15] + [0.3] * 7)


# ---- optimizers ---------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.pos = nn.Parameter(torch.zeros(1, 3, 4))  # a 3-d parameter the model asks not to decay

    def no_weight_decay(self):
        return {"pos"}


def _ids(params):
    return {id(p) for p in params}


def test_adamw_groups_skip_norms_biases_and_no_weight_decay():
    net, head = _Net(), nn.Linear(3, 2)  # `head` stands for a method's trainable head
    opt = build_optimizer(OptimizerSettings("adamw", lr=1e-3, weight_decay=0.05), net, head.parameters(), CPU)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert _ids(decayed["params"]) == _ids([net.conv.weight, net.fc.weight, head.weight])
    assert _ids(plain["params"]) == _ids([net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias, net.pos, head.bias])


def test_sgd_decays_everything_as_the_cifar_protocol():
    net, head = _Net(), nn.Linear(3, 2)
    opt = build_optimizer(OptimizerSettings("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4), net, head.parameters(), CPU)
    (group,) = opt.param_groups
    assert isinstance(opt, torch.optim.SGD) and group["weight_decay"] == 5e-4 and group["momentum"] == 0.9
    assert _ids(group["params"]) == _ids(list(net.parameters()) + list(head.parameters()))
    assert {"sgd", "adamw", "dot"} <= set(optimizer_names())
    from kdcli.config import OPTIMIZERS

    assert set(OPTIMIZERS) == set(optimizer_names())  # the flag check knows every registered optimizer


# ---- accumulation and clipping --------------------------------------------------------------------

def _train(batches: list[int], accumulate: int, optimizer: str, epochs: int = 2, clip: float | None = None):
    """A float64 linear model trained on fixed data split into `batches` (sizes) per epoch."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    model = nn.Linear(5, 3).double()
    torch.manual_seed(1)
    settings = OptimizerSettings(optimizer, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt = build_optimizer(settings, model, [], CPU)
    steps = GradientStep.steps_per_epoch(len(batches), accumulate)
    schedule = LrSchedule("cosine", 0.1, epochs, steps, warmup_epochs=0.5)
    step = GradientStep(opt, schedule, accumulate, clip)
    for epoch in range(1, epochs + 1):
        start = 0
        for b, size in enumerate(batches, start=1):
            xb, yb = x[start:start + size], y[start:start + size]
            start += size
            step({"ce": nn.functional.cross_entropy(model(xb), yb)}, epoch, b, len(batches))
    return model


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_equals_the_large_batch(optimizer):
    big = _train([8, 8, 4], 1, optimizer)
    small = _train([4, 4, 4, 4, 4], 2, optimizer)  # groups [4, 4], [4, 4], [4]: the same three steps
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(_train([4] * 5, 1, optimizer).weight, big.weight)  # it is not a no-op


def test_clip_grad_bounds_the_update_norm():
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = build_optimizer(OptimizerSettings("sgd", lr=1.0, momentum=0.0, weight_decay=0.0), model, [], CPU)
    step = GradientStep(opt, LrSchedule("constant", 1.0, 1, 1), clip_grad=0.5)
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]], dtype=torch.float64)
    step({"ce": model(x).sum()}, 1, 1, 1)  # gradient (3, 4, 0, 0), norm 5 -> clipped to norm 0.5
    torch.testing.assert_close(model.weight, torch.tensor([[1 - 0.3, 1 - 0.4, 1.0, 1.0]], dtype=torch.float64))


# ---- EMA and label smoothing ----------------------------------------------------------------------

def test_ema_update_values():
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        model[0].bias.fill_(0.0)
        model[1].running_mean.fill_(4.0)
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -2.0]]))
        model[0].bias.fill_(1.0)
        model[1].running_mean.fill_(-6.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, torch.tensor([[1.2, 1.6]]))  # 0.9 * old + 0.1 * new
    torch.testing.assert_close(ema.module[0].bias, torch.tensor([0.1]))
    torch.testing.assert_close(ema.module[1].running_mean, torch.tensor([3.0]))  # buffers too
    assert ema.module[1].num_batches_tracked.item() == 7  # integers are copied
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, torch.tensor([[0.9 * 1.2 + 0.3, 0.9 * 1.6 - 0.2]]))
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_label_smoothing_ce_term_matches_the_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], dtype=torch.float64)
    target = torch.tensor([0, 2])
    eps, k = 0.1, 3
    expected = 0.0
    for row, t in zip(logits.tolist(), target.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        q = [(1 - eps) * (i == t) + eps / k for i in range(k)]
        expected -= sum(qi * lp for qi, lp in zip(q, log_p))
    expected /= 2
    method = method_class("kd")(Shapes(), Shapes(), 2, ce=2.0, kd=0.0)
    method.label_smoothing = eps
    terms = method(Outputs(logits, [], None), None, Batch(logits, target, torch.arange(2)))
    assert terms["ce"].item() == pytest.approx(2.0 * expected, rel=1e-12)


# ---- end to end: resume exactness with each option, logs ---------------------------------------

BASE = {"command": "distill", "student": "resnet8", "method": "none", "data": TINY_DATA, "epochs": 2,
        "batch_size": 32, "device": "cpu", "seed": 3, "precision": "fp32"}

OPTIONS = {
    "adamw": {"optimizer": "adamw", "lr": 0.002, "weight_decay": 0.05},
    "cosine-warmup": {"schedule": "cosine", "warmup_epochs": 1.5, "min_lr": 0.001},
    "step": {"schedule": "step", "step_size": 1, "lr_decay": 0.5},
    "constant": {"schedule": "constant"},
    "label-smoothing": {"label_smoothing": 0.2},
    "clip-grad": {"clip_grad": 0.1},
    "accumulate": {"accumulate": 3},
    "ema": {"ema": 0.7},
}


class _Crash(Exception):
    pass


class _CrashAfterFirstEpoch:
    def start(self, *a): ...
    def step(self, *a): ...
    def finish(self): ...
    def epoch_end(self, metrics):
        if metrics["epoch"] == 1:
            raise _Crash


class _InterruptAtStep:
    """Sends this process a SIGINT at step `at` of epoch 1: the trainer stops at the next optimizer step."""

    def __init__(self, at: int):
        self.at = at

    def start(self, *a): ...
    def epoch_end(self, metrics): ...
    def finish(self): ...
    def step(self, epoch, step, images, loss=None):
        if epoch == 1 and step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def _weights(path):
    return load_file(str(path))


def _metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_FIELDS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a, b, weights="student.safetensors"):
    for name in (weights, weights.replace(".safetensors", "_ema.safetensors")):
        if (a / name).exists():
            wa, wb = _weights(a / name), _weights(b / name)
            assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert _metrics(a) == _metrics(b)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_resume_is_exact_with_each_option(tmp_path, option):
    layers = {**BASE, **OPTIONS[option]}
    straight = api.run(build_config(layers, {"out": str(tmp_path / "straight")}))
    with pytest.raises(_Crash):
        api.run(build_config(layers, {"out": str(tmp_path / "resumed")}), reporter=_CrashAfterFirstEpoch())
    resumed = api.resume(tmp_path / "resumed")
    assert resumed["top1"] == straight["top1"]
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    config = (tmp_path / "straight" / "config.toml").read_text()
    for key, value in OPTIONS[option].items():  # every option is recorded in config.toml
        assert build_config(load_preset(str(tmp_path / "straight" / "config.toml"))).to_dict()[key] == value, key
        assert f"{key} = " in config


def test_mid_epoch_interrupt_with_every_option_resumes_exactly(tmp_path):
    """SIGINT inside an accumulation group: the run stops at the group's end and resumes exactly."""
    layers = {**BASE, "batch_size": 16, "optimizer": "adamw", "lr": 0.002, "schedule": "cosine", "warmup_epochs": 1,
              "label_smoothing": 0.1, "clip_grad": 1.0, "accumulate": 3, "ema": 0.8, "log": ["tensorboard"]}
    straight = api.run(build_config(layers, {"out": str(tmp_path / "straight")}))
    with pytest.raises(Stopped) as stopped:
        api.run(build_config(layers, {"out": str(tmp_path / "resumed")}), reporter=_InterruptAtStep(4))
    assert "step 6/8 of epoch 1" in stopped.value.message  # 8 batches of 16, groups of 3: 3, 6, 8
    resumed = api.resume(tmp_path / "resumed")
    assert resumed["top1"] == straight["top1"] and resumed["ema_top1"] == straight["ema_top1"]
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    rows = list(csv.DictReader((tmp_path / "resumed" / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs the tensorboard extra")
def test_tensorboard_events_and_summary_csv_are_written_and_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    layers = {**BASE, "ema": 0.9, "log": ["tensorboard"]}
    summary = api.run(build_config(layers, {"out": str(run)}))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/ce", "train/loss", "train/top1", "train/top5", "val/top1", "val/top5", "val/ema_top1", "lr",
            "images_per_s", "train/loss_interval", "lr_step"} <= tags
    val = events.Scalars("val/top1")
    assert [e.value for e in val] == pytest.approx([m["val_top1"] for m in lines])
    assert [e.step for e in val] == [4, 8]  # batches seen: 4 per epoch
    assert summary["ema_top1"] == pytest.approx(lines[-1]["val_ema_top1"])
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert len(rows) == 2 and float(rows[1]["val_top1"]) == pytest.approx(lines[1]["val_top1"])
    assert set(lines[0]) == set(rows[0])


def test_cli_prints_the_recipe_and_takes_the_flags(kd, tmp_path):
    out = tmp_path / "run"
    result = kd("distill", "--student", "resnet8", "--method", "none", "--data", TINY_DATA, "--epochs", "1",
                "--batch-size", "32", "--device", "cpu", "--out", out, "--optimizer", "adamw", "--lr", "0.001",
                "--schedule", "cosine", "--warmup-epochs", "0.5", "--label-smoothing", "0.1", "--clip-grad", "2",
                "--accumulate", "2", "--ema", "0.99", "--weight-decay", "0.05", "--json")
    assert result.code == 0, result.stderr
    assert "recipe" in result.stderr
    assert "adamw lr 0.001, weight decay 0.05 (not on norms and biases), clip grad norm 2" in result.stderr
    assert "cosine to 0 (per step), linear warm-up 0.5 epochs; 1 epoch x 2 optimizer steps" in result.stderr
    assert "32 x 2 accumulated x 1 process = 64 per optimizer step" in result.stderr
    assert "label smoothing 0.1" in result.stderr and "ema        decay 0.99" in result.stderr
    summary = json.loads(result.stdout)
    assert (out / "student_ema.safetensors").is_file() and summary["ema_weights"].endswith("student_ema.safetensors")
    config = build_config(load_preset(str(out / "config.toml")))
    assert (config.optimizer, config.schedule, config.accumulate, config.ema) == ("adamw", "cosine", 2, 0.99)


@pytest.mark.parametrize("flags, fragment, hint", [
    (["--optimizer", "adam"], "--optimizer 'adam' is invalid", "sgd, adamw, dot"),
    (["--schedule", "cosin"], "--schedule 'cosin' is invalid", "multistep, cosine, step, constant"),
    (["--accumulate", "0"], "--accumulate 0 is invalid", "an integer from 1"),
    (["--ema", "1.5"], "--ema 1.5 is invalid", "(0, 1)"),
    (["--label-smoothing", "1"], "--label-smoothing 1.0 is invalid", "[0, 1)"),
    (["--clip-grad", "0"], "--clip-grad 0.0 is invalid", "above 0"),
    (["--log", "mlflow"], "--log ['mlflow'] is invalid", "tensorboard"),
])
def test_bad_recipe_flags_are_clean_errors(kd, tmp_path, flags, fragment, hint):
    result = kd("train", "resnet8", "--data", TINY_DATA, "--device", "cpu", "--out", tmp_path / "run", *flags)
    assert_clean_error(result, fragment)
    assert hint in result.stderr.splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_log_wandb_without_wandb_is_a_clean_error(kd, tmp_path):
    result = kd("train", "resnet8", "--data", TINY_DATA, "--device", "cpu", "--out", tmp_path / "run", "--log", "wandb")
    assert_clean_error(result, "--log wandb needs the wandb package")
    assert "pip install wandb" in result.stderr
    assert not (tmp_path / "run").exists()


IMAGENET_PRESETS = ["imagenet-kd-r34-r18", "imagenet-kd-r50-mv1", "imagenet-kd-r50-mv2", "imagenet-deit-tiny"]


@pytest.mark.parametrize("name", IMAGENET_PRESETS)
def test_imagenet_presets_load_and_name_real_models(name):
    import timm
    import torchvision

    assert name in list_presets()
    config = build_config(load_preset(name))
    assert config.pretrained and config.student_pretrained is False  # published teacher, student from scratch
    for spec in (config.teacher, config.student):
        source, _, arch = spec.partition(":")
        assert timm.is_model(arch) if source == "timm" else arch in torchvision.models.list_models(), spec
    resolve_hparams(method_class(config.method), config.options)  # the options are the method's
    if name == "imagenet-deit-tiny":
        assert (config.optimizer, config.schedule, config.warmup_epochs, config.label_smoothing) == ("adamw", "cosine", 5, 0.1)


def test_log_wandb_sends_every_epoch_scalar_to_a_run_tied_to_the_folder(tmp_path, monkeypatch):
    """A stand-in `wandb` module records what kd sends (the real one needs an account or offline files)."""
    import importlib.machinery
    import sys
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class Session:
        def log(self, values, step):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls["init"].append(kw) or Session()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    api.run(build_config({**BASE, "log": ["wandb"]}, {"out": str(run)}))
    (init,) = calls["init"]
    assert init["dir"] == str(run) and init["resume"] == "allow" and init["config"]["log"] == ["wandb"]
    assert "mode" not in init  # WANDB_MODE (e.g. offline) decides, as the user set it
    epochs = [(step, values) for step, values in calls["log"] if "val/top1" in values]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in epochs] == [4, 8]
    assert [v["val/top1"] for _, v in epochs] == pytest.approx([m["val_top1"] for m in lines])
    steps = [step for step, _ in calls["log"]]
    assert steps == sorted(steps) and calls["finish"] == 1  # W&B needs a step that never decreases
