"""timm and torchvision backbones: the Outputs adapter, pretrained weights, and runs with zoo methods.

Models run at small inputs (16-32 px, 4 classes) so that everything stays fast on a CPU.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from safetensors import safe_open
from torch import nn

from kdcli import api
from kdcli.api import shapes_of
from kdcli.config import build_config
from kdcli.errors import KdError
from kdcli.methods import method_class
from kdcli.models import classifier_of, create_model, forward_outputs
from kdcli.models import registry
from kdcli.models.features import feature_modules
from tests.conftest import TINY_DATA, _Silent, assert_clean_error

BACKBONES = {  # name -> (stage modules, embedding width)
    "timm:resnet18": (["act1", "layer1", "layer2", "layer3", "layer4"], 512),
    "tv:resnet18": (["relu", "layer1.1", "layer2.1", "layer3.1", "layer4.1"], 512),
    "tv:mobilenet_v3_small": (["features.0", "features.1", "features.3", "features.8", "features.12"], 1024),
}


def _x(size=32, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_adapter_outputs(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4).eval()
    x = _x()
    modules, width = BACKBONES[name]
    assert feature_modules(model) == modules
    with torch.no_grad():
        expected = model(x)
        out = forward_outputs(model, x)
    assert torch.equal(out.logits, expected)  # the very forward pass of model(x)
    assert out.embedding.shape == (2, width)
    assert torch.allclose(classifier_of(model)(out.embedding), out.logits, atol=1e-5)
    assert len(out.features) == 5 and all(f.ndim == 4 and f.shape[0] == 2 for f in out.features)
    sides = [f.shape[-1] for f in out.features]
    assert sides == sorted(sides, reverse=True) and sides[0] == 16  # stem (stride 2) first, then the stages
    # Nothing is recorded by plain forward calls (evaluation keeps no activations alive).
    with torch.no_grad():
        model(x)
    assert model._kdcli_taps.features == [] and model._kdcli_taps.embedding is None


def test_timm_features_are_its_feature_api():
    model = create_model("timm:resnet18", num_classes=4).eval()
    x = _x()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        out = forward_outputs(model, x)
    assert len(intermediates) == len(out.features)
    assert all(torch.equal(a, b) for a, b in zip(intermediates, out.features))
    assert torch.equal(out.logits, model.forward_head(final))


def test_torchvision_features_are_its_stage_nodes():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = create_model("tv:resnet18", num_classes=4).eval()
    x = _x()
    with torch.no_grad():
        nodes = create_feature_extractor(model, ["relu", "layer1", "layer2", "layer3", "layer4"])(x)
        out = forward_outputs(model, x)
    assert all(torch.equal(a, b) for a, b in zip(nodes.values(), out.features))


def test_train_mode_gradients_and_copies():
    model = create_model("tv:mobilenet_v3_small", num_classes=4).train()
    out = forward_outputs(model, _x(n=4))
    # Head dropout is active: the embedding is what the classifier saw, so logits = classifier(embedding).
    assert torch.allclose(classifier_of(model)(out.embedding), out.logits, atol=1e-5)
    (out.logits.sum() + out.features[1].mean() + out.embedding.mean()).backward()
    assert model.features[0][0].weight.grad is not None
    twin = copy.deepcopy(model).eval()
    assert twin._kdcli_taps is not model._kdcli_taps
    assert len(forward_outputs(twin, _x()).features) == 5
    assert len(forward_outputs(nn.DataParallel(twin), _x()).features) == 5


def test_a_model_without_feature_maps_is_refused_by_feature_methods():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    out = forward_outputs(model, torch.randn(2, 3, 8, 8))
    assert out.features == [] and out.embedding.shape == (2, 192)
    shapes = shapes_of(model, torch.randn(2, 3, 8, 8))
    for method in ("sp", "fitnet", "at"):
        with pytest.raises(KdError) as err:
            method_class(method)(shapes, shapes, num_samples=10)
        assert "feature" in err.value.message and err.value.hint


def test_pretrained_weights_load_from_the_cache_without_network(monkeypatch, tmp_path):
    """Cached weights are used as they are; the network is never asked."""
    import huggingface_hub
    from urllib.error import URLError

    from safetensors.torch import save_file

    def no_network(*args, **kwargs):
        raise URLError("no network in this test")

    monkeypatch.setattr(registry, "_reachable", lambda url: pytest.fail("the network was probed"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    # torchvision: the file torch.hub would have downloaded
    reference = create_model("tv:resnet18", num_classes=1000)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    model = create_model("tv:resnet18", num_classes=1000, pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    # timm: the file in the Hugging Face cache
    reference = create_model("timm:resnet18", num_classes=1000)
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache",
        lambda repo, filename, **kw: str(tmp_path / "model.safetensors") if filename == "model.safetensors" else None,
    )
    model = create_model("timm:resnet18", num_classes=10, pretrained=True)  # a fresh 10-class head
    assert torch.equal(model.conv1.weight, reference.conv1.weight) and model.fc.out_features == 10


def test_pretrained_offline_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **kw: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(registry, "_reachable", lambda url: False)
    started = time.perf_counter()
    with pytest.raises(KdError) as err:
        create_model("timm:resnet18", num_classes=10, pretrained=True)
    assert time.perf_counter() - started < 5
    assert "pretrained weights" in err.value.message and "cannot be reached" in err.value.message
    assert "cache" in err.value.hint
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdError, match="HF_HUB_OFFLINE"):
        create_model("timm:resnet18", num_classes=10, pretrained=True)


def test_pretrained_input_config():
    timm_cfg = registry.pretrained_input("timm:vit_tiny_patch16_224")
    assert (timm_cfg.size, timm_cfg.mean, timm_cfg.num_classes) == (224, (0.5, 0.5, 0.5), 1000)
    tv_cfg = registry.pretrained_input("tv:mobilenet_v3_small")
    assert (tv_cfg.size, tv_cfg.mean, tv_cfg.std) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert registry.pretrained_input("resnet8") is None


# ---- end to end through api.run ---------------------------------------------------------------

# fp32: "auto" picks bf16 autocast on CPUs with AVX512-BF16, where these from-scratch runs at lr 0.05
# occasionally diverge within the first epoch.
COMMON = {"data": TINY_DATA, "epochs": 1, "batch_size": 32, "device": "cpu", "seed": 0, "precision": "fp32"}


def _train(name: str, out) -> dict:
    return api.run(build_config({"command": "train", "student": name, "method": "none", **COMMON, "out": str(out)}),
                   reporter=_Silent())


def _distill(teacher: str, student: str, method: str, out, **options) -> dict:
    return api.run(build_config({
        "command": "distill", "teacher": teacher, "student": student, "method": method,
        "options": {k: str(v) for k, v in options.items()}, **COMMON, "out": str(out),
    }), reporter=_Silent())


@pytest.mark.parametrize("teacher, student, method", [
    ("timm:resnet18", "tv:mobilenet_v3_small", "kd"),
    ("timm:resnet18", "tv:mobilenet_v3_small", "fitnet"),
    ("tv:resnet18", "timm:mobilenetv3_small_100", "sp"),
])
def test_heterogeneous_pair_end_to_end(tmp_path, kd, teacher, student, method):
    trained = _train(teacher, tmp_path / "teacher")  # registered in the (per-test) teacher store
    assert trained["registered_as"].endswith(f"{teacher}.safetensors")
    summary = _distill(teacher, student, method, tmp_path / "run")
    assert summary["teacher"] == teacher and summary["teacher_top1"] is not None
    assert 0 <= summary["top1"] <= 100 and summary["agreement"] is not None
    if method == "fitnet":
        assert summary["method_params"] > 0  # the ConvReg regressor built from the dry run's shapes
    with safe_open(summary["weights"], framework="pt") as handle:
        meta = handle.metadata()
    assert meta["arch"] == student and meta["mean"] and meta["std"]
    result = kd("eval", summary["weights"], "--teacher", teacher, "--no-timing", "--device", "cpu", "--json")
    assert result.code == 0, result.stderr
    evaluated = json.loads(result.stdout)
    assert evaluated["top1"] == pytest.approx(summary["top1"], abs=1e-6)
    assert evaluated["agreement"] == pytest.approx(summary["agreement"], abs=1e-6)


def test_pretrained_student_uses_the_weights_input_config(tmp_path, monkeypatch):
    """`--pretrained`: the student starts from cached published weights, inputs normalised as they expect."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    reference = create_model("tv:mobilenet_v3_small", num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "mobilenet_v3_small-047dcff4.pth")
    config = build_config({"command": "train", "student": "tv:mobilenet_v3_small", "method": "none", "pretrained": True,
                           **COMMON, "epochs": 1, "out": str(tmp_path / "run")})
    summary = api.run(config, reporter=_Silent())
    with safe_open(summary["weights"], framework="pt") as handle:
        meta = handle.metadata()
    assert meta["mean"] == "0.485,0.456,0.406" and meta["std"] == "0.229,0.224,0.225"
    assert "pretrained = true" in (tmp_path / "run" / "config.toml").read_text()


def test_pretrained_teacher_must_predict_the_datas_classes(kd):
    result = kd("distill", "--teacher", "tv:resnet18", "--pretrained", "--student", "resnet8",
                "--data", TINY_DATA, "--epochs", "1", "--device", "cpu")
    assert_clean_error(result, "predicts 1000 classes but the data has 4")
    result = kd("distill", "--teacher", "tv:resnet18", "--student", "resnet8", "--data", TINY_DATA, "--device", "cpu")
    assert_clean_error(result, "no trained tv:resnet18")
    assert "--pretrained" in result.stderr


def test_unknown_timm_weight_tag_and_non_classifier_tv_models_are_clean_errors(kd, tmp_path):
    result = kd("train", "timm:resnet18.nosuchtag", "--pretrained", "--data", TINY_DATA, "--epochs", "1",
                "--device", "cpu", "--out", str(tmp_path / "a"))
    assert_clean_error(result, "timm:resnet18.nosuchtag", "Invalid pretrained tag")
    assert "list_pretrained('resnet18*')" in result.stderr
    for model in ("tv:fcn_resnet50", "tv:raft_small"):  # segmentation, optical flow: no classifier
        result = kd("train", model, "--pretrained", "--data", TINY_DATA, "--epochs", "1", "--device", "cpu",
                    "--out", str(tmp_path / "b"))
        assert_clean_error(result, model.partition(":")[2])
