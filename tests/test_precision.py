"""--precision: resolution, the autocast context, and the fp32 classifier under bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import LEARNED_TOP1
from kdcli.engine import precision
from kdcli.engine.precision import autocast, classifier_in_fp32, resolve_precision
from kdcli.errors import KdError
from kdcli.models import classifier_of, create_model

CPU = torch.device("cpu")


def test_resolve_precision(monkeypatch):
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    for fast, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "has_fast_bf16", lambda device: fast)
        assert resolve_precision("auto", CPU) == expected
    with pytest.raises(KdError, match="--precision 'fp16' is invalid"):
        resolve_precision("fp16", CPU)


def test_autocast_context_is_bf16_or_nothing():
    x, w = torch.randn(2, 3), torch.randn(3, 3)
    with autocast(CPU, "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert (x @ w).dtype == torch.float32


@pytest.mark.parametrize("arch", ["resnet8", "timm:resnet10t", "tv:mobilenet_v3_small"])
def test_classifier_in_fp32_gives_fp32_logits_and_keeps_the_weights(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10)
    keys = list(model.state_dict())
    head = classifier_of(model)
    inputs = {}
    head.register_forward_pre_hook(lambda module, args: inputs.update(x=args[0]))
    classifier_in_fp32(model)
    classifier_in_fp32(model)  # twice is the same as once
    assert list(model.state_dict()) == keys and isinstance(head, nn.Linear) and classifier_of(model) is head
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.float32
    features = inputs["x"]
    assert features.dtype == torch.bfloat16  # the body still ran in bf16
    expected = F.linear(features.float(), head.weight, head.bias)  # fp32 arithmetic on those features
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    logits.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    body = [p for name, p in model.named_parameters() if p is not head.weight and p is not head.bias]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in body)


def test_classifier_in_fp32_leaves_models_without_a_linear_head_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    classifier_in_fp32(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.AdaptiveAvgPool2d, nn.Flatten]


def test_bf16_distillation_learns(distill_digits):
    """A real bf16 run end to end (the classifiers in fp32, the rest under autocast)."""
    summary = distill_digits("kd", precision="bf16")
    assert summary["precision"] == "bf16" and summary["top1"] > LEARNED_TOP1


@pytest.mark.slow
def test_compiled_bf16_training_runs_and_saves_plain_weights(kd, tmp_path):
    """--compile (torch.compile of student and teacher) with bf16 autocast: trains and saves the plain modules' weights."""
    import json

    out = tmp_path / "teacher"
    common = ["--data", "synthetic:classes=4,n=160,size=16", "--batch-size", "32", "--device", "cpu", "--precision", "bf16", "--compile"]
    result = kd("train", "resnet8", *common, "--epochs", "1", "--out", str(out), "--json")
    assert result.code == 0, result.stderr
    run = tmp_path / "student"
    teacher = json.loads(result.stdout)["weights"]
    result = kd("distill", "--teacher", teacher, "--student", "resnet8", "--method", "kd",
                *common, "--epochs", "2", "--out", str(run), "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["precision"] == "bf16" and summary["epochs"] == 2
    from safetensors.torch import load_file

    assert not any("_orig_mod" in key for key in load_file(summary["weights"]))
