"""End to end through the `kd` entry point: train -> distill -> eval -> compare, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kdcli import api
from kdcli.config import build_config, load_preset
from kdcli.models import create_model
from kdcli.teachers import save_model
from tests.conftest import MEASURED_FIELDS, TINY_DATA, assert_clean_error, write_malicious_pth

COMMON = ["--data", TINY_DATA, "--epochs", "2", "--batch-size", "32", "--device", "cpu"]


@pytest.fixture
def teacher(kd, tmp_path):
    """A resnet8 teacher trained on the tiny data and registered in the (per-test) store."""
    result = kd("train", "resnet8", *COMMON, "--out", tmp_path / "teacher", "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def test_train_distill_eval_compare(kd, tmp_path, teacher):
    assert teacher["command"] == "train" and Path(teacher["registered_as"]).is_file()
    assert (tmp_path / "teacher" / "model.safetensors").is_file()

    result = kd("distill", "--teacher", "resnet8", "--student", "resnet8", "--method", "kd",
                *COMMON, "--out", tmp_path / "kd", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)  # --json: exactly one JSON object on stdout
    run = tmp_path / "kd"
    assert summary["method"] == "kd" and summary["teacher"] == "resnet8"
    assert 0 <= summary["top1"] <= 100 and summary["teacher_top1"] is not None
    assert summary["best_top1"] >= summary["top1"]
    assert json.loads((run / "summary.json").read_text()) == summary

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert {"train_ce", "train_kd", "val_top1", "val_top5", "lr", "agreement"} <= set(lines[0])
    assert "epoch   2/2" in result.stderr  # progress goes to stderr

    # The student loads strictly into the zoo model and carries its metadata.
    with safe_open(str(run / "student.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    assert meta["arch"] == "resnet8" and meta["num_classes"] == "4" and meta["dataset"] == TINY_DATA
    assert meta["method"] == "kd" and float(meta["top1"]) == pytest.approx(summary["top1"], abs=1e-3)
    create_model("resnet8", num_classes=4).load_state_dict(state, strict=True)
    config = (run / "config.toml").read_text()
    assert 'method = "kd"' in config and "[options]" in config

    result = kd("eval", run / "student.safetensors", "--json", "--device", "cpu")
    assert result.code == 0, result.stderr
    evaluated = json.loads(result.stdout)
    assert evaluated["top1"] == pytest.approx(summary["top1"], abs=1e-6)

    result = kd("compare", tmp_path, "--json")
    assert result.code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert {r["method"] for r in rows} == {"kd", "none"}

    result = kd("compare", tmp_path)  # the human table
    assert result.code == 0 and "kd compare" in result.stdout


def test_distill_from_teacher_file_and_rerun_refusal(kd, tmp_path, teacher):
    out = tmp_path / "run"
    args = ["distill", "--teacher", teacher["weights"], "--student", "resnet8", "--method", "none",
            *COMMON, "--epochs", "1", "--out", out]
    assert kd(*args).code == 0
    before = (out / "summary.json").read_text()
    assert_clean_error(kd(*args), "already holds a run")
    assert (out / "summary.json").read_text() == before  # nothing lost
    assert kd(*args, "--overwrite").code == 0


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    """Stop after epoch 1 of 3 (as a crash would), resume, and match a straight run exactly."""
    layers = {"command": "distill", "student": "resnet8", "method": "none", "data": TINY_DATA,
              "epochs": 3, "batch_size": 32, "device": "cpu", "seed": 7}
    straight = api.run(build_config(layers, {"out": str(tmp_path / "straight")}))

    class Crash(Exception):
        pass

    class StopAfterFirstEpoch:
        def start(self, *a): ...
        def step(self, *a): ...
        def finish(self): ...
        def epoch_end(self, metrics):
            if metrics["epoch"] == 1:
                raise Crash

    with pytest.raises(Crash):
        api.run(build_config(layers, {"out": str(tmp_path / "resumed")}), reporter=StopAfterFirstEpoch())
    resumed = api.resume(tmp_path / "resumed")
    assert resumed["top1"] == straight["top1"]

    def load(run):
        with safe_open(str(tmp_path / run / "student.safetensors"), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}

    a, b = load("straight"), load("resumed")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)

    def metrics(run):
        return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_FIELDS}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert metrics("straight") == metrics("resumed")


def test_resume_through_the_cli(kd, tmp_path):
    out = tmp_path / "run"
    assert kd("train", "resnet8", *COMMON, "--epochs", "1", "--out", out).code == 0
    result = kd("train", "--resume", out, "--json")
    assert result.code == 0, result.stderr
    assert "already done" in result.stderr
    assert_clean_error(kd("train", "--resume", tmp_path / "nothing"), "not a kd run folder")


def test_quickstart_preset_and_flag_precedence():
    config = build_config(load_preset("quickstart"), {"epochs": 2})
    assert config.data == "digits" and config.epochs == 2


# ---- bad input: one error line, a hint, exit 2, no traceback --------------------------------

def test_unknown_names(kd, tmp_path):
    assert_clean_error(kd("train", "resnet21", *COMMON), "unknown model 'resnet21'")
    assert_clean_error(kd("distill", "--teacher", "resnet8", "--method", "kdd", *COMMON), "unknown method 'kdd'")
    assert_clean_error(kd("train", "resnet8", "--data", "cifar1000"), "unknown dataset")
    assert_clean_error(kd("train", "resnet8", "--preset", "quikstart"), "unknown preset")
    assert_clean_error(kd("distill", "--teacher", "resnet8", "--set", "TT=3", *COMMON), "unknown option")
    assert_clean_error(kd("list", "modles"), "unknown list")
    assert_clean_error(kd("train", "resnet8", "--epochs", "-1"), "--epochs")
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_teacher(kd, tmp_path):
    assert_clean_error(kd("distill", "--teacher", tmp_path / "nope.safetensors", *COMMON), "does not exist")
    result = kd("distill", "--teacher", "resnet20", *COMMON)
    assert_clean_error(result, "no trained resnet20")
    assert "kd train resnet20" in result.stderr


def test_corrupt_and_truncated_teacher(kd, tmp_path, teacher):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    assert_clean_error(kd("distill", "--teacher", garbage, *COMMON), "garbage.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(teacher["weights"]).read_bytes()[:-1000])
    assert_clean_error(kd("distill", "--teacher", truncated, *COMMON), "truncated.safetensors")
    junk_pth = tmp_path / "resnet8_vanilla" / "ckpt.pth"
    junk_pth.parent.mkdir()
    junk_pth.write_bytes(b"\x00\x01junk")
    assert_clean_error(kd("distill", "--teacher", junk_pth, *COMMON), "refused")


def test_teacher_class_count_must_match_the_data(kd, tmp_path, teacher):
    result = kd("distill", "--teacher", teacher["weights"], "--data", "synthetic:classes=5,n=100,size=16",
                "--epochs", "1", "--device", "cpu")
    assert_clean_error(result, "predicts 4 classes but the data has 5")


def test_missing_cifar_files(kd, tmp_path):
    result = kd("distill", "--teacher", "resnet8", "--data", "cifar100", "--data-dir", tmp_path / "empty")
    assert_clean_error(result)
    assert "--download" in result.stderr


def test_repdistiller_pth_teacher(kd, tmp_path):
    """A RepDistiller-layout checkpoint: {'model': state_dict, ...} in <arch>_vanilla/, module. prefix."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=4)
    folder = tmp_path / "resnet8_vanilla"
    folder.mkdir()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 240, "model": state, "best_acc": 50.0}, folder / "ckpt_epoch_240.pth")
    result = kd("distill", "--teacher", folder / "ckpt_epoch_240.pth", "--student", "resnet8", *COMMON,
                "--epochs", "1", "--out", tmp_path / "run", "--json")
    assert result.code == 0, result.stderr
    # Outside an <arch>_vanilla folder the architecture must be named.
    loose = tmp_path / "teacher.pth"
    torch.save(model.state_dict(), loose)
    assert_clean_error(kd("distill", "--teacher", loose, *COMMON), "cannot tell the architecture")
    assert_clean_error(kd("distill", "--teacher", loose, "--teacher-arch", "resnet20", *COMMON), "does not match")
    result = kd("distill", "--teacher", loose, "--teacher-arch", "resnet8", *COMMON, "--epochs", "1",
                "--out", tmp_path / "run2")
    assert result.code == 0, result.stderr


def test_malicious_pickle_is_refused_without_running(kd, tmp_path):
    evil, marker = write_malicious_pth(tmp_path)
    assert_clean_error(kd("distill", "--teacher", evil, *COMMON), "refused")
    assert not marker.exists()


def test_real_entry_point_has_no_traceback(tmp_path):
    """The installed console script path: exit code and stderr as a shell script sees them."""
    proc = subprocess.run([sys.executable, "-m", "kdcli", "train", "resnet999", "--data", TINY_DATA],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown model 'resnet999'")
    assert "Traceback" not in proc.stderr


def test_list_commands(kd):
    for what in ("models", "methods", "datasets", "presets", "teachers"):
        result = kd("list", what)
        assert result.code == 0, result.stderr
    assert "resnet32x4" in kd("list", "models").stdout
    assert "Hinton" in kd("list", "methods").stdout
    assert "digits" in kd("list", "datasets").stdout
    assert "quickstart" in kd("list", "presets").stdout


def test_presets_ship_in_the_wheel(tmp_path):
    """A non-editable install must carry presets/ as kdcli/presets."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, root],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    import zipfile

    (wheel,) = tmp_path.glob("kdcli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kdcli/presets/quickstart.toml" in names and "kdcli/presets/cifar100.toml" in names
