"""`kd distill --teacher resnet110 --student resnet20 --method mlkd` runs the CIFAR-100 protocol when the data is there."""

from __future__ import annotations

import json
import tomllib

import torchvision

from kdcli.models import create_model
from kdcli.teachers import teacher_path
from kdcli.teachers import save_model
from tests.test_data import write_fake_cifar100


def test_paper_command_runs_the_cifar100_protocol(kd, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_fake_cifar100(tmp_path / "data", n_train=32, n_test=8)
    # Our fake files are not the real ones: skip torchvision's checksum, nothing else.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setenv("KD_DATA", str(tmp_path / "data"))
    teacher = teacher_path("resnet110", "cifar100")
    teacher.parent.mkdir(parents=True)
    save_model(teacher, create_model("resnet110", num_classes=100), arch="resnet110", num_classes=100, dataset="cifar100")

    # The paper command, only shortened to one epoch of the 32-image stand-in for CIFAR-100.
    result = kd("distill", "--teacher", "resnet110", "--student", "resnet20", "--method", "mlkd",
                "--epochs", "1", "--device", "cpu", "--out", tmp_path / "run", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["data"] == "cifar100" and summary["num_classes"] == 100
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["batch_size"] == 64 and config["momentum"] == 0.9 and config["weight_decay"] == 5e-4
    assert config["lr_decay"] == 0.1 and "lr" not in config  # lr: 0.05 for resnet20, from the protocol
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["lr"] == 0.05 and {"train_corr", "train_supcon", "train_align"} <= set(line)
