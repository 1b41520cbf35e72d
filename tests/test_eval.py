"""`kd eval`: accuracy, calibration, agreement and cost of kd, RepDistiller and pretrained networks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from kdcli.batch import Batch
from kdcli.data import build_data
from kdcli.engine.evaluate import evaluate, expected_calibration_error
from kdcli.models import create_model
from kdcli.profiling import Spread, count_macs, latency_ms, throughput
from tests.conftest import TINY_DATA, assert_clean_error, write_malicious_pth

# fp32: the default "auto" may train in bf16 on the CPU; eval runs in fp32.
COMMON = ["--data", TINY_DATA, "--batch-size", "32", "--device", "cpu", "--precision", "fp32"]


def _repdistiller_checkpoint(folder: Path, arch: str = "resnet8", seed: int = 0) -> tuple[Path, nn.Module]:
    """RepDistiller's layout: {'model': state_dict, ...} under <arch>_vanilla/, keys with DataParallel's prefix."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=4)
    path = folder / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 240, "model": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_acc": 1.0}, path)
    return path, model.eval()


def _by_hand(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the tiny data's validation split, normalised as the dataset's loaders do."""
    bundle = build_data(TINY_DATA)
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)
    x = (bundle.val.images.float() / 255 - mean) / std
    with torch.no_grad():
        return model(x), bundle.val.labels


def test_eval_repdistiller_pth(kd, tmp_path):
    path, model = _repdistiller_checkpoint(tmp_path)
    result = kd("eval", path, "--data", TINY_DATA, "--device", "cpu", "--json")
    assert result.code == 0, result.stderr
    got = json.loads(result.stdout)  # one JSON object
    logits, labels = _by_hand(model)
    assert got["arch"] == "resnet8" and got["samples"] == len(labels)
    assert got["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item(), abs=1e-9)
    assert got["nll"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)
    confidence, prediction = logits.softmax(1).max(1)
    assert got["ece"] == pytest.approx(expected_calibration_error(confidence, prediction == labels), abs=1e-4)
    assert got["params"] == sum(p.numel() for p in model.parameters())
    assert got["macs"] == count_macs(model, (3, 16, 16)) > 0 and got["input_size"] == [3, 16, 16]
    assert got["latency_ms"] > 0 and got["throughput"] > 0 and got["throughput_batch"] == 256
    q1, q3 = got["latency_ms_iqr"]
    assert q1 <= got["latency_ms"] <= q3 and got["latency_ms_runs"] >= 1
    assert got["threads"] == torch.get_num_threads() and got["precision"] == "fp32"
    assert got["device"] == "cpu"
    # Outside an <arch>_vanilla folder the architecture must be named.
    loose = tmp_path / "loose.pth"
    torch.save(model.state_dict(), loose)
    assert_clean_error(kd("eval", loose, "--data", TINY_DATA, "--no-timing"), "cannot tell the architecture")
    assert kd("eval", loose, "--arch", "resnet8", "--data", TINY_DATA, "--no-timing", "--device", "cpu").code == 0
    assert_clean_error(kd("eval", path, "--no-timing"), "no dataset")


def test_eval_kd_student_with_teacher_agreement(kd, tmp_path):
    assert kd("train", "resnet8", *COMMON, "--epochs", "1", "--out", tmp_path / "teacher").code == 0
    result = kd("distill", "--teacher", "resnet8", "--student", "resnet8", "--method", "kd", *COMMON,
                "--epochs", "1", "--seed", "1", "--out", tmp_path / "kd", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    student = tmp_path / "kd" / "student.safetensors"

    result = kd("eval", student, "--teacher", "resnet8", "--device", "cpu", "--no-timing", "--json")
    assert result.code == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["data"] == TINY_DATA  # from the file's metadata
    assert got["top1"] == pytest.approx(summary["top1"], abs=1e-9)
    assert got["teacher_top1"] == pytest.approx(summary["teacher_top1"], abs=1e-9)
    assert got["agreement"] == pytest.approx(summary["agreement"], abs=1e-9)
    assert got["latency_ms"] is None and got["throughput"] is None  # --no-timing

    # The same teacher as a file, and as a RepDistiller .pth of itself: the same agreement.
    teacher_file = tmp_path / "teacher" / "model.safetensors"
    by_file = json.loads(kd("eval", student, "--teacher", teacher_file, "--no-timing", "--device", "cpu", "--json").stdout)
    assert by_file["agreement"] == got["agreement"]
    own = json.loads(kd("eval", student, "--teacher", student, "--no-timing", "--device", "cpu", "--json").stdout)
    assert own["agreement"] == 100.0

    table = kd("eval", student, "--teacher", "resnet8", "--device", "cpu")
    assert table.code == 0, table.stderr
    for label in ("top-1 (%)", "ECE (%, 15 bins)", "agreement with teacher (%)", "MACs (1 image)", "latency, batch 1 (ms)",
                  "throughput, batch 256 (img/s)"):
        assert label in table.stdout, table.stdout


def test_ece_equals_a_hand_computation():
    # Softmax probabilities with known top-1 confidences; the class-0 column is the prediction.
    rows = [  # (probabilities, label)
        ([0.90, 0.05, 0.05], 0),  # bin (13/15, 14/15]: confidence 0.90, right
        ([0.92, 0.04, 0.04], 1),  # same bin: 0.92, wrong
        ([0.70, 0.20, 0.10], 0),  # bin (10/15, 11/15]: 0.70, right
        ([0.50, 0.30, 0.20], 2),  # bin (7/15, 8/15]: 0.50, wrong
        ([0.40, 0.35, 0.25], 0),  # bin (5/15, 6/15]: 0.40, right
    ]
    probs = torch.tensor([p for p, _ in rows])
    labels = torch.tensor([y for _, y in rows])
    # |B|/N * |acc(B) - conf(B)| per bin
    by_hand = 2 / 5 * abs(0.5 - 0.91) + 1 / 5 * abs(1 - 0.70) + 1 / 5 * abs(0 - 0.50) + 1 / 5 * abs(1 - 0.40)
    assert expected_calibration_error(probs.max(1).values, probs.argmax(1) == labels) == pytest.approx(100 * by_hand, abs=1e-4)

    class Fixed(nn.Module):
        def forward(self, x):
            return probs.log()[: len(x)]

    batch = Batch(torch.zeros(5, 3, 2, 2), labels, torch.arange(5))
    result = evaluate(Fixed(), [batch])
    assert result.ece == pytest.approx(100 * by_hand, abs=1e-4)
    assert result.top1 == pytest.approx(60.0) and result.loss == pytest.approx(-probs.log()[range(5), labels].mean().item(), rel=1e-5)
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == 0.0


def test_macs_of_a_small_network_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    # conv: each of the 8 x 16 x 16 outputs takes 3 x 3 x 3 multiply-accumulates; linear: 2048 x 10
    assert count_macs(net, (3, 16, 16)) == 8 * 16 * 16 * 27 + 2048 * 10
    assert count_macs(nn.Linear(10, 5), (10,)) == 50
    assert net.training  # the mode is restored


def test_timing_reports_a_spread_of_positive_numbers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 8, 8))
    latency = latency_ms(net, (3, 8, 8), repeats=3, warmup=1)
    assert 0 < latency.q1 <= latency.median <= latency.q3 and latency.runs >= 1
    rate, batch = throughput(net, (3, 8, 8), batch=16, repeats=2)
    assert 0 < rate.q1 <= rate.median <= rate.q3 and batch == 16


def test_spread_is_median_and_interquartile_range():
    spread = Spread.of([4.0, 1.0, 3.0, 2.0, 100.0])  # one outlier: the median and IQR ignore it
    assert (spread.median, spread.q1, spread.q3, spread.runs) == (3.0, 2.0, 4.0, 5)
    rate = spread.inverse(8.0)  # seconds -> images/s at batch 8: the slow quartile becomes the low rate
    assert (rate.median, rate.q1, rate.q3) == (8.0 / 3.0, 2.0, 4.0)
    assert Spread.of([0.5]) == Spread(0.5, 0.5, 0.5, 1)


def test_malicious_pickle_is_refused_without_running(kd, tmp_path):
    evil, marker = write_malicious_pth(tmp_path)
    assert_clean_error(kd("eval", evil, "--data", TINY_DATA), "refused")
    good, _ = _repdistiller_checkpoint(tmp_path / "ok")
    assert_clean_error(kd("eval", good, "--teacher", evil, "--data", TINY_DATA), "refused")
    assert not marker.exists()


def test_pretrained_offline_is_a_clean_error_fast(kd, monkeypatch, tmp_path):
    import huggingface_hub

    from kdcli.models import registry

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **kw: None)  # nothing cached
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(registry, "_reachable", lambda url: False)  # offline
    imagenet_like = "synthetic:classes=1000,n=5000,size=8"
    started = time.perf_counter()
    result = kd("eval", "timm:resnet18", "--pretrained", "--data", imagenet_like, "--no-timing")
    assert_clean_error(result, "pretrained weights of 'timm:resnet18'", "cannot be reached")
    assert time.perf_counter() - started < 15  # not huggingface_hub's ~50 s of retries

    from urllib.error import URLError

    def unreachable(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    assert_clean_error(kd("eval", "tv:resnet18", "--pretrained", "--data", imagenet_like, "--no-timing"), "pretrained weights")
    # The class count is checked before anything is downloaded.
    assert_clean_error(kd("eval", "tv:resnet18", "--pretrained", "--data", TINY_DATA), "predicts 1000 classes but the data has 4")
    assert_clean_error(kd("eval", "tv:resnet18", "--data", TINY_DATA), "no trained tv:resnet18")


def test_pretrained_eval_uses_the_weights_normalisation(kd, monkeypatch, tmp_path):
    """A cached torchvision file: loaded without network, inputs normalised with its ImageNet mean/std."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(0)
    model = create_model("tv:mobilenet_v3_small", num_classes=1000).eval()
    torch.save(model.state_dict(), tmp_path / "checkpoints" / "mobilenet_v3_small-047dcff4.pth")
    data = "synthetic:classes=1000,n=5000,size=8"
    result = kd("eval", "tv:mobilenet_v3_small", "--pretrained", "--data", data, "--no-timing", "--device", "cpu", "--json")
    assert result.code == 0, result.stderr
    got = json.loads(result.stdout)
    bundle = build_data(data)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((bundle.val.images.float() / 255 - mean) / std)
    assert got["top1"] == pytest.approx(100 * (logits.argmax(1) == bundle.val.labels).double().mean().item(), abs=1e-9)
    assert got["arch"] == "tv:mobilenet_v3_small" and got["input_size"] == [3, 8, 8]
