"""The model zoo: RepDistiller layout and numerics, registry, and the Outputs adapters.

`data/models_repdistiller_layout.json` was generated once from RepDistiller's own model
definitions (num_classes=100): state_dict layouts, parameter counts, per-tensor sums of a
seed-0 init, feature shapes, and outputs under deterministic weights (`fill_deterministic`).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from kdcli.errors import KdError
from kdcli.models import classifier_of, create_model, default_lr, forward_outputs, list_models

REFERENCE = json.loads((Path(__file__).parent / "data" / "models_repdistiller_layout.json").read_text())
MODELS = REFERENCE["models"]
NAMES = list(MODELS)


def fill_deterministic(model: nn.Module) -> None:
    """Overwrite every float tensor with a fixed, shape-derived wave (same recipe as the fixture)."""
    with torch.no_grad():
        for i, (key, t) in enumerate(model.state_dict().items()):
            if not t.is_floating_point():
                continue
            wave = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.731 + i).view(t.shape)
            if key.endswith("running_var"):
                value = 1.0 + 0.5 * wave.abs()
            elif key.endswith("running_mean"):
                value = 0.1 * wave
            elif t.dim() == 1 and key.endswith("weight"):
                value = 1.0 + 0.2 * wave
            elif t.dim() == 1:
                value = 0.1 * wave
            else:
                value = wave * (1.7 / (t.numel() // t.shape[0]) ** 0.5)
            t.copy_(value.to(t.dtype))


def probe_input(size: int = 32) -> torch.Tensor:
    return torch.sin(torch.arange(2 * 3 * size * size, dtype=torch.float32) * 0.013).view(2, 3, size, size)


def shapes(tensors) -> list[list[int]]:
    return [list(t.shape) for t in tensors]


def abs_means(tensors) -> list[float]:
    return [t.abs().mean().item() for t in tensors]


def test_zoo_names_are_repdistillers_in_its_order():
    assert list_models() == NAMES
    assert len(NAMES) == 22


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_and_init_match_reference(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=100)
    state = model.state_dict()
    ref = MODELS[name]
    assert [[k, list(v.shape)] for k, v in state.items()] == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    # Same init scheme, draw for draw: the seed-0 weights equal the reference's.
    sums = [v.double().abs().sum().item() for v in state.values()]
    assert sums == pytest.approx(ref["init_seed0_abs_sum"], rel=1e-5, abs=1e-6)


def test_published_parameter_counts():
    published_millions = {"resnet20": 0.28, "resnet110": 1.74, "resnet32x4": 7.43, "wrn_40_2": 2.26,
                          "resnet8x4": 1.23, "vgg13": 9.46, "ResNet50": 23.71}
    for name, millions in published_millions.items():
        count = sum(p.numel() for p in create_model(name).parameters())
        assert count == MODELS[name]["num_params"]
        assert round(count / 1e6, 2) == millions, name
    assert MODELS["resnet20"]["num_params"] == 278_324
    assert MODELS["resnet110"]["num_params"] == 1_736_564
    assert MODELS["resnet32x4"]["num_params"] == 7_433_860
    assert MODELS["wrn_40_2"]["num_params"] == 2_255_156


@pytest.mark.parametrize("name", NAMES)
def test_reference_checkpoint_loads_strict(name):
    """A state_dict with the reference's keys and shapes (what its teacher files hold) loads strictly."""
    model = create_model(name, num_classes=100)
    reference_state = {
        key: torch.zeros(shape, dtype=torch.long if key.endswith("num_batches_tracked") else torch.float32)
        for key, shape in MODELS[name]["state_dict"]
    }
    model.load_state_dict(reference_state, strict=True)


@pytest.mark.parametrize("name", ["resnet20", "wrn_40_2", "MobileNetV2", "ShuffleV2"])
def test_own_weights_round_trip_through_safetensors(name):
    source = create_model(name, num_classes=10)
    fill_deterministic(source)
    target = create_model(name, num_classes=10)
    target.load_state_dict(st_load(st_save(source.state_dict())), strict=True)
    for (key, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_reference(name):
    """Same weights, same input: features, pre-activation features, embedding and logits equal the reference's."""
    ref = MODELS[name]
    model = create_model(name, num_classes=100)
    fill_deterministic(model)
    model.eval()
    x = probe_input()
    with torch.no_grad():
        out = forward_outputs(model, x)
        pre = forward_outputs(model, x, preact=True)
        logits = model(x)

    assert shapes(out.features) == ref["features"]
    assert shapes(pre.features) == ref["preact_features"]
    assert list(out.embedding.shape) == ref["embedding"]
    assert out.logits.shape == (2, 100)
    assert torch.equal(out.logits, logits)
    assert torch.equal(pre.logits, logits)
    assert torch.allclose(model.get_classifier()(out.embedding), logits)

    probe = ref["probe"]
    scale = probe["logits_abs_mean"]
    assert abs_means(out.features) == pytest.approx(probe["feature_abs_means"], rel=1e-4)
    assert abs_means(pre.features) == pytest.approx(probe["preact_feature_abs_means"], rel=1e-4)
    assert out.embedding.abs().mean().item() == pytest.approx(probe["embedding_abs_mean"], rel=1e-4)
    assert out.logits.abs().mean().item() == pytest.approx(scale, rel=1e-4)
    assert out.logits[0, :8].tolist() == pytest.approx(probe["logits_first"], rel=1e-4, abs=1e-5 * scale)


@pytest.mark.parametrize("name", ["resnet20", "ResNet50", "ShuffleV1"])
def test_preact_features_are_the_last_blocks_sums_before_relu(name):
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        post = forward_outputs(model, x).features
        pre = forward_outputs(model, x, preact=True).features
    assert torch.equal(pre[0], post[0])  # the stem is post-ReLU either way
    for p, q in zip(pre[1:], post[1:]):
        assert p.min() < 0
        assert torch.equal(torch.relu(p), q)


def test_wrn_preact_is_the_next_bn_and_leaves_running_stats_alone():
    model = create_model("wrn_16_2", num_classes=10).train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    plain = forward_outputs(model, x)
    after_plain = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(initial)
    pre = forward_outputs(model, x, preact=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, after_plain[key]), key
    bn = model.block2.layer[0].bn1
    expected = nn.functional.batch_norm(plain.features[1], None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    assert torch.allclose(pre.features[1], expected, atol=1e-5)
    assert torch.equal(pre.features[0], plain.features[0])


@pytest.mark.parametrize("name", ["resnet20", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_other_input_sizes_pool_adaptively(name):
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        out = forward_outputs(model, torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 10)
    assert torch.allclose(model.get_classifier()(out.embedding), out.logits)
    if name == "vgg8":
        assert out.features[-1].shape == (2, 512, 4, 4)  # the reference's extra pool for 64-pixel inputs


def test_train_mode_backward_reaches_every_parameter():
    model = create_model("ShuffleV2", num_classes=10).train()
    out = forward_outputs(model, torch.randn(4, 3, 32, 32))
    (out.logits.sum() + out.features[-1].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_classifier_of_finds_each_familys_head():
    heads = {"resnet8": "fc", "ResNet50": "linear", "wrn_16_1": "fc", "vgg8": "classifier",
             "MobileNetV2": "classifier.0", "ShuffleV1": "linear", "ShuffleV2": "linear"}
    for name, path in heads.items():
        model = create_model(name, num_classes=7)
        head = classifier_of(model)
        assert head is model.get_submodule(path) and head.out_features == 7


def test_forward_outputs_sees_through_data_parallel():
    model = create_model("resnet8", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        wrapped = forward_outputs(nn.DataParallel(model), x)
        plain = forward_outputs(model, x)
    assert len(wrapped.features) == 4
    assert torch.equal(wrapped.logits, plain.logits)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KdError) as err:
        create_model("resnet21")
    assert "unknown model 'resnet21'" in err.value.message
    assert "did you mean" in err.value.hint and "'resnet20'" in err.value.hint
    with pytest.raises(KdError) as err:
        create_model("resnet50")
    assert "'ResNet50'" in err.value.hint


def test_bad_requests_are_kd_errors():
    for call in (
        lambda: create_model("hf:resnet18"),
        lambda: create_model("resnet20", num_classes=0),
        lambda: create_model("resnet20", pretrained=True),
        lambda: create_model("resnet20", drop_rate=0.1),
    ):
        with pytest.raises(KdError) as err:
            call()
        assert err.value.hint


def test_default_lr_follows_the_cifar_protocol():
    assert [default_lr(n) for n in ("MobileNetV2", "ShuffleV1", "ShuffleV2")] == [0.01] * 3
    assert default_lr("resnet8x4") == default_lr("wrn_16_2") == default_lr("timm:resnet18") == 0.05


@pytest.mark.parametrize("name", ["timm:resnet18", "tv:resnet18"])
def test_timm_and_torchvision_backbones(name):
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        out = forward_outputs(model, x)
    assert logits.shape == (2, 10)
    assert torch.allclose(out.logits, logits)
    assert len(out.features) == 5 and out.features[-1].shape[:2] == (2, 512)  # stem + 4 stages (tests/test_backbones.py covers more)
    assert out.embedding.shape == (2, 512)
    assert torch.allclose(classifier_of(model)(out.embedding), logits, atol=1e-5)


@pytest.mark.parametrize("name, suggestion", [("timm:resnet181", "resnet18"), ("tv:resnet181", "resnet18"),
                                              ("timm:nonsense", None)])
def test_unknown_timm_and_torchvision_names(name, suggestion):
    with pytest.raises(KdError) as err:
        create_model(name)
    assert "unknown" in err.value.message and name.split(":")[1] in err.value.message
    assert "list_models" in err.value.hint
    if suggestion:
        assert f"'{suggestion}'" in err.value.hint


def test_pretrained_download_failure_is_a_kd_error(monkeypatch):
    import timm
    import torchvision

    def offline(*args, **kwargs):
        raise URLError("network unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    for name in ("timm:resnet18", "tv:resnet18"):
        with pytest.raises(KdError) as err:
            create_model(name, num_classes=10, pretrained=True)
        assert "pretrained weights" in err.value.message and "cache" in err.value.hint


def test_pretrained_torchvision_gets_a_fresh_head_for_other_class_counts(monkeypatch):
    import torchvision

    build = torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", lambda arch, weights, **kw: build(arch, weights=None))
    model = create_model("tv:resnet18", num_classes=10, pretrained=True)
    assert classifier_of(model) is model.fc and model.fc.out_features == 10
    assert create_model("tv:resnet18", num_classes=1000, pretrained=True).fc.out_features == 1000
