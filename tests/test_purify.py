"""ITKD's purification option: the entropy-ranked mixup plan and the engine's temporary image edit."""

from __future__ import annotations

import json

import pytest
import torch

from kdcli import api
from kdcli.config import build_config
from kdcli.engine.image_edits import edited_images
from kdcli.errors import KdError
from kdcli.methods.purify import Purifier
from kdcli.models import create_model
from kdcli.teachers import save_model
from tests.conftest import Crash, CrashAfterFirstEpoch, MEASURED_FIELDS, TINY_DATA


def _recorded(n=20, every=2):
    purifier = Purifier(n, every=every)
    # logits whose entropy grows with the sample index: sample i has entropy rank n-1-i (descending)
    logits = torch.stack([torch.tensor([0.0, -10.0 + 0.5 * i]) for i in range(n)])
    purifier.record(logits, torch.arange(n))
    return purifier, logits


def test_plan_pairs_the_10_20_and_80_90_percent_entropy_bands_in_rank_order():
    purifier, _ = _recorded()
    assert purifier.edits(1) is None  # only every `every` epochs
    targets, sources, rho = purifier.edits(2)
    ranked = list(range(19, -1, -1))  # highest entropy first
    assert sources.tolist() == ranked[2:4] and targets.tolist() == ranked[16:18]
    assert rho.tolist() == pytest.approx([1.0, 0.7])
    assert float(purifier.entropy.abs().sum()) == 0.0  # a fresh window after each plan


def test_plan_is_kept_for_a_resumed_epoch():
    purifier, logits = _recorded()
    first = [t.clone() for t in purifier.edits(2)]
    purifier.record(-logits, torch.arange(20))  # entropies seen later in epoch 2 (before a stop)
    again = purifier.edits(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    state = purifier.state_dict()
    copy = Purifier(20, every=2)
    copy.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(first, copy.edits(2)))


class _Loader:
    def __init__(self):
        self.images = torch.arange(4 * 3, dtype=torch.uint8).reshape(4, 3, 1, 1) * 20


def test_edit_mixes_uint8_images_and_restores_them():
    loader = _Loader()
    before = loader.images.clone()
    edit = (torch.tensor([0, 1]), torch.tensor([3, 2]), torch.tensor([1.0, 0.7]))
    with edited_images(loader, edit):
        assert torch.equal(loader.images[0], before[3])  # rho 1: the high-entropy image itself
        expected = (0.7 * before[2].float() + 0.3 * before[1].float()).round().to(torch.uint8)
        assert torch.equal(loader.images[1], expected)
        assert torch.equal(loader.images[2:], before[2:])
    assert torch.equal(loader.images, before)


def test_edit_needs_in_memory_images():
    with pytest.raises(KdError, match="in memory"):
        with edited_images(object(), (torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))):
            pass


def test_itkd_with_purification_runs_and_resumes_exactly(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_model(teacher, create_model("resnet8", num_classes=4), arch="resnet8", num_classes=4, dataset="synthetic")
    layers = {"command": "distill", "teacher": str(teacher), "student": "resnet8", "method": "itkd", "data": TINY_DATA,
              "options": {"purify": "true", "purify_every": "2", "warmup": "1", "rl_every": "1"},
              "epochs": 2, "batch_size": 32, "device": "cpu", "seed": 1}
    straight = api.run(build_config(layers, {"out": str(tmp_path / "straight")}))

    with pytest.raises(Crash):
        api.run(build_config(layers, {"out": str(tmp_path / "resumed")}), reporter=CrashAfterFirstEpoch())
    assert api.resume(tmp_path / "resumed")["top1"] == straight["top1"]

    def metrics(run):
        return [{k: v for k, v in json.loads(x).items() if k not in MEASURED_FIELDS}
                for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert metrics("straight") == metrics("resumed")
