"""Issue 16: the Python API, plug-in architectures and data, --val-split, kd export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import kdcli
from kdcli import plugins
from kdcli.data import build_data
from kdcli.errors import KdError
from kdcli.teachers import load_model_file, read_metadata, save_model
from tests.conftest import assert_clean_error, MEASURED_FIELDS, TINY_DATA, _Silent
from tests.plugin_models import FlatNet, StageNet, ToyImages

FAST = dict(device="cpu", workers=0, batch_size=32, precision="fp32")


def toy(augment=False):
    return ToyImages(True, augment=augment), ToyImages(False)


def metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in MEASURED_FIELDS} for line in lines]


@pytest.fixture(scope="module")
def api_teacher(tmp_path_factory):
    """A custom nn.Module teacher trained through kdcli.train on a custom Dataset."""
    torch.manual_seed(0)
    model = StageNet(4, width=8)
    out = tmp_path_factory.mktemp("api") / "teacher"
    summary = kdcli.train(model, toy(), epochs=2, out=out, **FAST)
    return model, summary


def test_api_train_on_a_custom_dataset_writes_the_cli_run_folder(api_teacher):
    model, summary = api_teacher
    run = Path(summary["run_dir"])
    assert {"config.toml", "metrics.jsonl", "summary.json", "model.safetensors", "checkpoints"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["student"] == "tests.plugin_models:StageNet" and summary["data"] == "custom" and summary["num_classes"] == 4
    assert "registered_as" not in summary  # objects on objects are not put in the teacher store
    meta = read_metadata(run / "model.safetensors")
    assert meta["arch"] == "tests.plugin_models:StageNet" and meta["input_shape"] == "3,16,16"
    # mean/std measured on the training split (float images in 0..1), recorded in the weights
    images = ToyImages(True).images.double()
    expected_mean = images.mean(dim=(0, 2, 3))
    expected_std = images.permute(1, 0, 2, 3).flatten(1).std(dim=1, unbiased=False)
    assert [float(v) for v in meta["mean"].split(",")] == pytest.approx(expected_mean.tolist(), abs=1e-4)
    assert [float(v) for v in meta["std"].split(",")] == pytest.approx(expected_std.tolist(), abs=1e-4)
    # the object was trained in place: it is the saved network
    saved, _ = load_model_file(run / "model.safetensors", arch=meta["arch"])  # the user's code, named again
    for key, value in model.state_dict().items():
        assert torch.equal(value.cpu(), saved.state_dict()[key])


@pytest.mark.parametrize("method", ["kd", "at"])
def test_api_distills_a_custom_teacher_into_a_custom_student(api_teacher, tmp_path, method):
    teacher, _ = api_teacher
    torch.manual_seed(1)
    student = StageNet(4, width=4)
    before = [p.detach().clone() for p in student.parameters()]
    summary = kdcli.distill(teacher, student, toy(augment=True), method=method, epochs=2, out=tmp_path / "run", T=2, **FAST)
    assert summary["method"] == method and summary["epochs"] == 2 and summary["teacher"] == "tests.plugin_models:StageNet"
    assert summary["teacher_top1"] is not None and 0 <= summary["top1"] <= 100
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # trained in place
    config = (tmp_path / "run" / "config.toml").read_text()
    assert f'method = "{method}"' in config and "T = 2" in config
    assert kdcli.evaluate(student, toy())["top1"] == pytest.approx(summary["top1"])
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules()) == 3  # folding worked on a copy


def test_api_takes_dataloaders_and_weights_paths(api_teacher, tmp_path):
    _, trained = api_teacher
    train, val = toy()
    loaders = (DataLoader(train, batch_size=16, shuffle=True), DataLoader(val, batch_size=16))
    summary = kdcli.distill(trained["weights"], "tests.plugin_models:factory", loaders, epochs=1, out=tmp_path / "run",
                            device="cpu", workers=0, precision="fp32", teacher_arch=read_metadata(Path(trained["weights"]))["arch"])
    assert 'batch_size = 16' in (tmp_path / "run" / "config.toml").read_text()
    assert read_metadata(Path(summary["weights"]))["arch"] == "tests.plugin_models:factory"


class _StopAtEpoch2(_Silent):
    def step(self, epoch, step, images, loss=None):
        if epoch == 2:
            raise RuntimeError("stopped")


def test_api_resume_continues_exactly(api_teacher, tmp_path):
    teacher, _ = api_teacher

    def student():
        torch.manual_seed(2)
        return StageNet(4, width=4)

    straight = kdcli.distill(teacher, student(), toy(augment=True), epochs=3, out=tmp_path / "straight", **FAST)
    with pytest.raises(RuntimeError, match="stopped"):
        kdcli.distill(teacher, student(), toy(augment=True), epochs=3, out=tmp_path / "cut", reporter=_StopAtEpoch2(), **FAST)
    assert len(metrics(tmp_path / "cut")) == 1
    resumed = kdcli.distill(teacher, student(), toy(augment=True), out=tmp_path / "cut", resume=True, **FAST)
    assert resumed["epochs"] == 3
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "straight")
    assert resumed["top1"] == straight["top1"]


def test_api_refuses_a_feature_method_on_a_network_without_stages(api_teacher, tmp_path):
    teacher, _ = api_teacher
    with pytest.raises(KdError, match="needs stage feature maps.*student FlatNet"):
        kdcli.distill(teacher, FlatNet(4), toy(), method="at", epochs=1, out=tmp_path / "run", **FAST)
    assert not (tmp_path / "run").exists()
    assert kdcli.distill(teacher, FlatNet(4), toy(), method="kd", epochs=1, out=tmp_path / "kd", **FAST)["top1"] >= 0


def test_api_bad_inputs_are_kd_errors(tmp_path):
    with pytest.raises(KdError, match="data is a int"):
        kdcli.train(StageNet(4), 3, epochs=1, out=tmp_path / "a")
    with pytest.raises(KdError, match="student is a float"):
        kdcli.distill("x", 1.5, TINY_DATA, epochs=1, out=tmp_path / "b")
    with pytest.raises(KdError, match="labels run from"):
        kdcli.train(StageNet(4), toy(), epochs=1, out=tmp_path / "c", num_classes=2)


# ---- the command line ----------------------------------------------------------------------


def test_cli_plugin_teacher_and_student_round_trip(kd, tmp_path):
    """kd train/distill/eval with `pkg.module:factory` networks and a `pkg.module:factory` dataset."""
    teacher = tmp_path / "teacher"
    result = kd("train", "tests.plugin_models:teacher_factory", "--data", "tests.plugin_models:data", "--epochs", "2",
                "--device", "cpu", "--workers", "0", "--out", teacher, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["registered_as"]  # a name on named data: in the store, found by name below
    for method in ("kd", "at"):
        out = tmp_path / method
        result = kd("distill", "--teacher", "tests.plugin_models:teacher_factory", "--student", "tests.plugin_models:factory",
                    "-m", method, "--data", "tests.plugin_models:data", "--epochs", "1", "--device", "cpu",
                    "--workers", "0", "--out", out, "--json")
        assert result.code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["student"] == "tests.plugin_models:factory" and summary["teacher_top1"] is not None
        evaluated = kd("eval", out / "student.safetensors", "--arch", "tests.plugin_models:factory", "--no-timing",
                       "--workers", "0", "--json")
        assert evaluated.code == 0, evaluated.stderr
        assert json.loads(evaluated.stdout)["top1"] == pytest.approx(summary["top1"])


def test_cli_file_spec_is_recorded_absolute(kd, tmp_path, monkeypatch):
    source = Path(__file__).with_name("plugin_models.py")
    (tmp_path / "nets.py").write_text("from tests.plugin_models import factory\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(source.parent.parent))
    result = kd("train", "nets.py:factory", "--data", TINY_DATA, "--epochs", "1", "--device", "cpu", "--out", "run", "--json")
    assert result.code == 0, result.stderr
    assert read_metadata(tmp_path / "run" / "model.safetensors")["arch"] == f"{tmp_path / 'nets.py'}:factory"
    assert "registered_as" not in json.loads(result.stdout)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.plugin_models:broken_factory", "failed while calling it with num_classes=4 at plugin_models.py:"),
        ("tests.plugin_models:not_a_model", "returned str, not a torch nn.Module"),
        ("tests.plugin_models:missing", "has no 'missing'"),
        ("nosuchpkg.models:make", "no module named 'nosuchpkg'"),
        ("BADFILE:make", "there is no file"),
        ("BROKENFILE:make", "failed while importing at broken.py:2: RuntimeError: boom"),
    ],
)
def test_bad_factory_specs_exit_2_with_the_exception_line(kd, tmp_path, spec, message):
    (tmp_path / "broken.py").write_text("import os\nraise RuntimeError('boom')\n")
    spec = spec.replace("BADFILE", str(tmp_path / "none.py")).replace("BROKENFILE", str(tmp_path / "broken.py"))
    result = kd("train", spec, "--data", TINY_DATA, "--epochs", "1", "--device", "cpu", "--out", tmp_path / "run")
    assert result.code == 2
    assert message in result.stderr and "hint:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_data_factory_exits_2(kd, tmp_path):
    result = kd("train", "resnet8", "--data", "tests.plugin_models:bad_data", "--epochs", "1", "--out", tmp_path / "run")
    assert result.code == 2 and "not (train, val) or (train, val, num_classes)" in result.stderr


def test_teacher_arch_plugin_reads_a_pth_teacher(kd, tmp_path):
    torch.manual_seed(0)
    net = StageNet(4, width=8)
    torch.save({"model": net.state_dict()}, tmp_path / "teacher.pth")
    model, meta = load_model_file(tmp_path / "teacher.pth", arch="tests.plugin_models:teacher_factory")
    assert meta["arch"] == "tests.plugin_models:teacher_factory" and meta["num_classes"] == "4"
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), net.eval()(x))


def test_plugin_spec_recognition():
    assert plugins.is_plugin_spec("pkg.mod:make") and plugins.is_plugin_spec("a/b/nets.py:make")
    for name in ("timm:resnet18", "tv:resnet18", "resnet20", "imagefolder:/data", "synthetic:classes=4", "pkg:make"):
        assert not plugins.is_plugin_spec(name), name


# ---- image folders with --val-split --------------------------------------------------------


def _image_folder(root: Path, per_class: int = 10) -> None:
    from PIL import Image

    for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 12), tuple(max(0, v - 9 * i) for v in colour)).save(folder / f"{i}.png")


def test_val_split_holds_out_a_fixed_fraction_of_each_class(tmp_path):
    _image_folder(tmp_path)
    bundle = build_data(f"imagefolder:{tmp_path}", val_split=0.2, image_size=8)
    train, val = bundle.train.dataset, bundle.val.dataset
    assert len(train) == 16 and len(val) == 4 and sorted(val.targets) == [0, 0, 1, 1]
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    again = build_data(f"imagefolder:{tmp_path}", val_split=0.2, image_size=8)
    assert again.val.dataset.samples == val.samples  # a function of the files, not of a seed
    with pytest.raises(KdError, match="--val-split does not apply"):
        build_data(TINY_DATA, val_split=0.2)
    with pytest.raises(KdError, match="--val-split 1.5 is invalid"):
        build_data(f"imagefolder:{tmp_path}", val_split=1.5)


def test_cli_val_split_trains_on_a_folder_without_val(kd, tmp_path):
    _image_folder(tmp_path / "imgs")
    result = kd("train", "resnet8", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--val-split", "0.2", "--epochs", "1",
                "--device", "cpu", "--workers", "0", "--batch-size", "8", "--out", tmp_path / "run", "--json")
    assert result.code == 0, result.stderr
    assert "val_split = 0.2" in (tmp_path / "run" / "config.toml").read_text()
    missing = kd("train", "resnet14", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--epochs", "1", "--out", tmp_path / "r2")
    assert missing.code == 2 and "--val-split" in missing.stderr


def test_a_weights_file_never_chooses_the_code_kd_imports(kd, tmp_path, monkeypatch):
    """A plug-in architecture named only in a file's metadata is refused; named again by the user, it loads."""
    marker = tmp_path / "imported"
    (tmp_path / "nets.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nfrom tests.plugin_models import factory\n"
    )
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    spec = f"{tmp_path / 'nets.py'}:factory"
    assert kd("train", spec, "--data", TINY_DATA, "--epochs", "1", "--device", "cpu", "--out", tmp_path / "run").code == 0
    marker.unlink()
    for name in [n for n in sys.modules if n.startswith("kdcli_user_")]:
        del sys.modules[name]  # as in a new kd process: nothing of nets.py is loaded
    weights = tmp_path / "run" / "model.safetensors"
    for args in (["eval", weights, "--no-timing"], ["export", weights], ["distill", "--teacher", weights, "--student",
                                                                          "resnet8", "--data", TINY_DATA, "--out", tmp_path / "d"]):
        assert_clean_error(kd(*args), "plug-in architecture", spec)
        assert not marker.exists()  # refused before anything was imported
    result = kd("eval", weights, "--arch", spec, "--no-timing", "--json")
    assert result.code == 0, result.stderr
    assert marker.exists()


PLUGIN_ARCH = ["--arch", "tests.plugin_models:factory"]


# ---- kd export -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    torch.manual_seed(0)
    kdcli.train("tests.plugin_models:factory", toy(), epochs=1, out=out, **FAST)
    return out


def test_export_torchscript_matches_pytorch_and_records_normalisation(kd, student_run, tmp_path):
    from kdcli.export import read_torchscript_metadata

    result = kd("export", student_run, *PLUGIN_ARCH, "--out", tmp_path / "net.pt", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checked_with"] == "torch.jit" and report["max_abs_diff"] <= 1e-5
    meta = read_torchscript_metadata(tmp_path / "net.pt")
    weights_meta = read_metadata(student_run / "model.safetensors")
    assert meta["mean"] == weights_meta["mean"] and meta["std"] == weights_meta["std"] and meta["input_shape"] == "3,16,16"
    # the file alone reproduces the network, at a batch size the trace never saw
    model, _ = load_model_file(student_run / "model.safetensors", arch="tests.plugin_models:factory")
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert (torch.jit.load(str(tmp_path / "net.pt"))(x) - model.eval()(x)).abs().max() <= 1e-5


def test_export_onnx_matches_pytorch(kd, student_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result = kd("export", student_run, *PLUGIN_ARCH, "--format", "onnx", "--out", tmp_path / "net.onnx", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checked_with"] == "onnxruntime" and report["max_abs_diff"] <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "net.onnx")).metadata_props}
    assert props["mean"] == read_metadata(student_run / "model.safetensors")["mean"] and props["output"].startswith("logits")
    fixed = kd("export", student_run, *PLUGIN_ARCH, "--format", "onnx", "--batch-size", "4", "--out", tmp_path / "b4.onnx", "--json")
    assert fixed.code == 0, fixed.stderr


def test_export_refuses_what_cannot_be_exported(kd, tmp_path):
    weights = tmp_path / "dict.safetensors"
    save_model(weights, plugins.build_model("tests.plugin_models:dict_factory", 4), arch="tests.plugin_models:dict_factory",
               num_classes=4, input_shape="3,16,16", mean="0.5,0.5,0.5", std="0.25,0.25,0.25")
    result = kd("export", weights, "--arch", "tests.plugin_models:dict_factory")
    assert result.code == 2 and "cannot be exported to torchscript" in result.stderr and "Traceback" not in result.stderr
    assert kd("export", tmp_path / "nothing").code == 2
    assert "use onnx or torchscript" in kd("export", weights, "--format", "tflite").stderr


def test_cli_resume_of_a_python_object_run_says_to_resume_from_python(kd, student_run):
    result = kd("train", "--resume", student_run)
    assert result.code == 2 and "resume it from Python" in result.stderr


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise ValueError("disk on fire")


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(3, 8, 8), 0


def test_bad_user_data_and_settings_are_clean_errors(tmp_path):
    train, val = toy()
    with pytest.raises(KdError, match="reading train sample 0.*ValueError: disk on fire"):
        kdcli.train("tests.plugin_models:factory", (_Broken(), val), epochs=1, out=tmp_path / "a", **FAST)
    with pytest.raises(KdError, match="not a map-style torch Dataset"):
        kdcli.train("tests.plugin_models:factory", (_Stream(), val), epochs=1, out=tmp_path / "b", **FAST)
    with pytest.raises(KdError, match="--device"):
        kdcli.evaluate(StageNet(4), (train, val), device="gpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
