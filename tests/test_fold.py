"""Folding a frozen teacher's BatchNorm into its convolutions: same outputs, fewer layers, safe refusals."""

import pytest
import torch
from torch import nn

from kdcli.models import create_model
from kdcli.models.features import forward_outputs
from kdcli.models.fold import fold_batchnorm


def _with_running_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a wrong fold shows."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def _count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


@pytest.mark.parametrize("arch", ["resnet8", "resnet8x4", "vgg8", "MobileNetV2", "tv:resnet18"])
def test_folded_copy_gives_the_same_outputs_without_batchnorm(arch):
    model = _with_running_stats(create_model(arch, num_classes=10))
    batchnorms = _count(model, nn.BatchNorm2d)
    folded, count = fold_batchnorm(model, torch.randn(4, 3, 32, 32), preact=True)
    assert count == batchnorms > 0 and _count(folded, nn.BatchNorm2d) == 0
    assert _count(model, nn.BatchNorm2d) == batchnorms  # the original is untouched
    x = torch.randn(6, 3, 32, 32)  # not the batch the fold was checked on
    for preact in (False, True):
        with torch.no_grad():
            a, b = forward_outputs(model, x, preact=preact), forward_outputs(folded, x, preact=preact)
        for u, v in zip([a.logits, *a.features], [b.logits, *b.features]):
            assert torch.allclose(u, v, rtol=1e-4, atol=1e-5 * float(u.abs().max()))


def test_fold_is_the_batchnorm_formula_on_one_layer():
    """conv(x; W, b) then BN = conv(x; W * g / sqrt(var + eps), (b - mean) * g / sqrt(var + eps) + beta)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3)).eval()
    net[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    net[1].running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    net[1].weight.data = torch.tensor([2.0, 1.0, -1.0])
    net[1].bias.data = torch.tensor([0.1, 0.2, 0.3])
    folded, count = fold_batchnorm(net, torch.randn(2, 2, 5, 5))
    assert count == 1 and isinstance(folded[1], nn.Identity)
    scale = torch.tensor([2.0, 1.0, -1.0]) / torch.sqrt(torch.tensor([4.0, 0.25, 1.0]) + 1e-5)
    assert torch.allclose(folded[0].weight, net[0].weight * scale.view(-1, 1, 1, 1), rtol=1e-6)
    expected_bias = (net[0].bias - torch.tensor([0.5, -1.0, 2.0])) * scale + torch.tensor([0.1, 0.2, 0.3])
    assert torch.allclose(folded[0].bias, expected_bias, rtol=1e-6)


def test_conv_without_bias_gets_one():
    net = _with_running_stats(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    folded, count = fold_batchnorm(net, torch.randn(2, 3, 32, 32))
    assert count == 1 and folded[0].bias is not None and not folded[0].bias.requires_grad
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(folded(x), net(x), rtol=1e-4, atol=1e-5)


class _ConvOutputReadTwice(nn.Module):
    """The conv's output feeds the BN and a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean(dim=(2, 3)))


def test_a_fold_that_changes_the_outputs_is_refused():
    net = _with_running_stats(_ConvOutputReadTwice())
    folded, count = fold_batchnorm(net, torch.randn(2, 3, 32, 32))
    assert count == 0 and folded is net and isinstance(net.bn, nn.BatchNorm2d)


def test_nothing_to_fold_in_preactivation_or_fused_norm_act_layers():
    wrn = _with_running_stats(create_model("wrn_16_2", num_classes=10))  # BN comes before each conv
    assert fold_batchnorm(wrn, torch.randn(2, 3, 32, 32)) == (wrn, 0)

    class NormAct(nn.BatchNorm2d):  # like timm's BatchNormAct2d: BN plus an activation
        def forward(self, x):
            return torch.relu(super().forward(x))

    net = _with_running_stats(nn.Sequential(nn.Conv2d(3, 4, 3), NormAct(4)))
    assert fold_batchnorm(net, torch.randn(2, 3, 32, 32)) == (net, 0)


def test_runs_train_with_the_folded_teacher():
    from kdcli import api
    from kdcli.config import build_config
    from kdcli.data import build_data
    from kdcli.methods import method_class

    config = build_config({"command": "distill", "teacher": "resnet8", "student": "resnet8", "method": "kd",
                           "data": "synthetic:classes=4,n=160,size=16", "device": "cpu"})
    bundle = build_data(config.data)
    teacher = _with_running_stats(create_model("resnet8", num_classes=4))
    _, used, *_ = api.build_training(config, method_class("kd"), bundle, teacher, torch.device("cpu"))
    assert _count(teacher, nn.BatchNorm2d) > 0 and _count(used, nn.BatchNorm2d) == 0


def test_distillation_evaluates_the_folded_teacher_as_the_original(kd, digits_teacher, tmp_path):
    """api.run folds the teacher: its top-1 in the summary equals `kd eval` of the unfolded weights."""
    import json

    run = kd("distill", "--teacher", digits_teacher, "--student", "resnet8", "--method", "kd", "--data", "digits",
             "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--out", str(tmp_path / "run"), "--json")
    assert run.code == 0, run.stderr
    evaluated = kd("eval", digits_teacher, "--data", "digits", "--device", "cpu", "--json")
    assert evaluated.code == 0, evaluated.stderr
    assert json.loads(run.stdout)["teacher_top1"] == pytest.approx(json.loads(evaluated.stdout)["top1"], abs=0.3)
