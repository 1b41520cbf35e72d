"""GPU-path settings that the CPU can check (issue 13): loader workers, per-epoch peak memory, backend
flags and --deterministic, the bf16 teacher copy, static shapes for capture."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kdcli import api
from kdcli.config import RunConfig, build_config, read_config_file, to_toml
from kdcli.data.loaders import default_num_workers, make_loader
from kdcli.data.registry import build_data
from kdcli.engine.memory import peak_memory_mb, reset_peak_memory
from tests.conftest import TINY_DATA, _Silent
from tests.test_data import write_image_folder


# ---- image-folder workers ------------------------------------------------------------------------

def test_image_folder_runs_use_the_per_core_worker_default(tmp_path, monkeypatch):
    cores = {0, 1, 2}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores, raising=False)
    assert default_num_workers() == 3
    cores.update(range(3, 20))
    assert default_num_workers() == 8  # at most 8
    assert RunConfig().workers is None and build_config({}).workers is None
    bundle = build_data(f"imagefolder:{write_image_folder(tmp_path)}", image_size=16)
    assert make_loader(bundle.train, bundle, 2, True, num_workers=RunConfig().workers).loader.num_workers == 8
    assert make_loader(bundle.train, bundle, 2, True, num_workers=0).loader.num_workers == 0  # --workers 0 kept
    assert "workers" not in to_toml(RunConfig())  # config.toml leaves it to the machine that resumes


# ---- peak memory ---------------------------------------------------------------------------------

def _touch(mib: int) -> None:
    block = torch.ones(mib * 2**20 // 4)  # resident: every page written
    del block


def test_peak_memory_resets(tmp_path):
    reset_peak_memory(torch.device("cpu"))
    _touch(300)
    high = peak_memory_mb(torch.device("cpu"))
    reset_peak_memory(torch.device("cpu"))
    assert peak_memory_mb(torch.device("cpu")) < high - 200


def test_epoch_peak_memory_excludes_what_ran_before_the_run(tmp_path):
    """An earlier run (e.g. of kd compare) or the teacher's evaluation must not count in an epoch's peak."""
    _touch(400)
    before = peak_memory_mb(torch.device("cpu"))
    out = tmp_path / "run"
    api.run(build_config({"command": "train", "student": "resnet8", "method": "none", "data": TINY_DATA,
                          "epochs": 1, "batch_size": 32, "device": "cpu", "out": str(out)}), reporter=_Silent())
    epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < epoch["peak_memory_mb"] < before - 200


# ---- backend flags -------------------------------------------------------------------------------

def _flags() -> tuple:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_fp32_turns_tf32_off_and_deterministic_asks_for_deterministic_kernels(monkeypatch):
    from kdcli.engine.backend import run_backend, strict_fp32

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as a user's script may leave them
    outside = _flags()
    with run_backend("fp32"):
        assert _flags() == (False, False, True, False, False, None)  # really fp32; benchmark: shapes are static
    assert _flags() == outside  # restored for library callers
    with run_backend("bf16"):
        assert _flags()[:3] == (False, True, True)  # bf16 convs may use TF32's fp32 accumulate path, matmuls not
    with run_backend("fp32", deterministic=True):
        assert _flags() == (False, False, False, True, True, ":4096:8")
    assert _flags() == outside
    with strict_fp32():
        assert _flags()[:2] == (False, False)
    assert _flags() == outside
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults


def test_deterministic_algorithms_a_caller_turned_on_stay_on(monkeypatch):
    """A script that turned deterministic algorithms on (say with warn_only) before calling kd keeps them."""
    from kdcli.engine.backend import run_backend

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with run_backend("fp32"):
            assert _flags()[2:] == (False, True, True, ":4096:8")  # no benchmark, deterministic cuDNN and algorithms
            assert torch.is_deterministic_algorithms_warn_only_enabled()
        with run_backend("fp32", deterministic=True):  # --deterministic itself is strict
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_deterministic_is_a_config_field_and_cli_flag_recorded_in_config_toml(kd, tmp_path):
    out = tmp_path / "run"
    result = kd("train", "resnet8", "--data", TINY_DATA, "--epochs", "1", "--batch-size", "32", "--device", "cpu",
                "--deterministic", "--out", str(out), "--json")
    assert result.code == 0, result.stderr
    assert read_config_file(out / "config.toml")["deterministic"] is True
    assert build_config(read_config_file(out / "config.toml")).deterministic is True
    assert RunConfig().deterministic is False
    assert not torch.are_deterministic_algorithms_enabled()  # the run's switches end with it


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return _teacher_path(tmp_path_factory.mktemp("teacher"))


def test_deterministic_distill_with_a_memory_bank_runs_and_repeats(tmp_path, teacher_file):
    """--deterministic raises for any op without a deterministic kernel: a crd run (index ops on the memory
    bank) must have none, and two runs give the same student."""
    from safetensors.torch import load_file

    def run(name):
        api.run(build_config({"command": "distill", "teacher": str(teacher_file), "student": "resnet8", "method": "crd",
                              "options": {"K": 16}, "data": TINY_DATA, "epochs": 1, "batch_size": 32, "device": "cpu",
                              "deterministic": True, "out": str(tmp_path / name)}), reporter=_Silent())
        return load_file(tmp_path / name / "student.safetensors")

    a, b = run("a"), run("b")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the frozen teacher in bf16 ------------------------------------------------------------------

@pytest.mark.parametrize("fold", [False, True])
def test_bf16_teacher_copy_matches_autocast_and_keeps_the_classifier_fp32(fold):
    from kdcli.engine.precision import classifier_in_fp32, frozen_bf16_copy
    from kdcli.models import create_model
    from kdcli.models.features import classifier_of, forward_outputs
    from kdcli.models.fold import fold_batchnorm

    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=4).eval()
    for m in teacher.modules():  # non-trivial running statistics, as a trained teacher has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 3, 16, 16)
    if fold:
        teacher, folded = fold_batchnorm(teacher, x)
        assert folded > 0
    classifier_in_fp32(teacher)
    copy = frozen_bf16_copy(teacher)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # the original is untouched
    head = classifier_of(copy)
    assert head.weight.dtype == torch.float32
    convs = [m for m in copy.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(m.weight.dtype == torch.float32 for m in copy.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = forward_outputs(teacher, x), forward_outputs(copy, x)
    assert got.logits.dtype == torch.float32
    for a, b in zip([want.logits, want.embedding, *want.features], [got.logits, got.embedding, *got.features]):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = a.float().abs().max()
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=2**-7 * float(scale) + 1e-6)  # bf16: 8 bits


def test_bf16_runs_step_the_bf16_teacher_and_evaluate_the_fp32_one(tmp_path, teacher_file):
    from kdcli.engine.trainer import Trainer

    captured = {}
    original = Trainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured["trainer"] = self

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "__init__", spy)
        api.run(build_config({"command": "distill", "teacher": str(teacher_file), "student": "resnet8", "method": "kd",
                              "data": TINY_DATA, "epochs": 1, "batch_size": 32, "device": "cpu", "precision": "bf16",
                              "out": str(tmp_path / "run")}), reporter=_Silent())
    trainer = captured["trainer"]
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.float32}
    stepped = {p.dtype for p in trainer.teacher_fn.parameters()}
    assert stepped == {torch.bfloat16, torch.float32}  # bf16 convs, the fp32 classifier
    assert all(not p.requires_grad for p in trainer.teacher_fn.parameters()) and not trainer.teacher_fn.training


def _teacher_path(tmp_path):
    from kdcli.models import create_model
    from kdcli.teachers import save_model

    path = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_model(path, create_model("resnet8", num_classes=4), arch="resnet8", num_classes=4, dataset="synthetic")
    return path


# ---- static shapes for --compile -----------------------------------------------------------------

RAGGED = {"data": TINY_DATA, "batch_size": 48, "eval_batch_size": 24}  # 128 train = 48+48+32, 32 val = 24+8


def _distill(teacher, out, **extra):
    return api.run(build_config({"command": "distill", "teacher": str(teacher), "student": "resnet8", "method": "crd",
                                 "options": {"K": 16}, "epochs": 2, "device": "cpu", "precision": "fp32",
                                 "out": str(out), **RAGGED, **extra}), reporter=_Silent())


def test_compiled_functions_see_one_shape_and_the_ragged_batches_stay_exact(tmp_path, teacher_file, monkeypatch):
    """With --compile every compiled function gets one batch size; the ragged last batches (train and
    validation) run uncompiled. Stand-in 'compiled' functions (the module itself, recording shapes) make
    the run comparable bit for bit with the plain one: same samples, losses, accuracies and weights."""
    from safetensors.torch import load_file
    from kdcli.engine import capture

    shapes: dict[str, set] = {}

    class Recording(torch.nn.Module):  # like torch.compile's wrapper: the module is `_orig_mod`
        def __init__(self, module):
            super().__init__()
            self._orig_mod, self.name = module, type(module).__name__

        def forward(self, x, *args, **kwargs):
            shapes.setdefault(self.name, set()).add(x.shape[0])
            return self._orig_mod(x, *args, **kwargs)

    plain = _distill(teacher_file, tmp_path / "plain")
    monkeypatch.setattr(capture, "compiled", lambda module, device: Recording(module))
    routed = _distill(teacher_file, tmp_path / "routed", compile=True)
    assert shapes == {"CifarResNet": {48}, "TeacherStep": {48}, "StudentEval": {24}}
    lines = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("plain", "routed")]
    for a, b in zip(*lines):
        assert a["train_samples"] == 128  # the ragged batch is trained on
        for key in ("train_loss", "train_crd", "train_top1", "val_top1", "val_loss", "val_top5"):
            assert a[key] == b[key], key
    assert plain["top1"] == routed["top1"]
    a, b = (load_file(tmp_path / run / "student.safetensors") for run in ("plain", "routed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compile_on_cpu_inductor_captures_each_role_once(tmp_path, teacher_file):
    """Real torch.compile (CPU inductor): teacher step, student step and student eval are one frame and
    one graph each over two epochs with ragged batches: no recompiles, no graph breaks, no fallback."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    summary = _distill(teacher_file, tmp_path / "run", compile=True)
    assert summary["epochs"] == 2
    assert dict(counters["frames"]) == {"total": 3, "ok": 3}
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"] and not counters["recompiles"]


def test_deterministic_pooling_avoids_the_kernel_cuda_cannot_run_deterministically():
    from kdcli.engine.backend import run_backend
    from kdcli.models.cifar._common import pool_flat

    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    plain = pool_flat(x)
    with run_backend("fp32", deterministic=True):
        pooled = pool_flat(x)
        assert pooled.grad_fn.next_functions[0][0].name() == "MeanBackward1"  # not AdaptiveAvgPool2DBackward (raises on CUDA)
    assert torch.allclose(plain, pooled, rtol=0, atol=1e-6)


# ---- adaptive pooling under --deterministic -------------------------------------------------------

@pytest.mark.parametrize("shape, size", [((7, 7), (3, 3)), ((8, 8), 4), ((5, 6), (2, 4)), ((4, 4), 1), ((6, 5), (None, 2)),
                                         ((3, 3), (5, 4))])
def test_deterministic_adaptive_pooling_equals_pytorchs_bins_in_value_and_gradient(shape, size):
    from kdcli.engine.backend import run_backend
    from kdcli.models.pooling import adaptive_avg_pool2d

    x = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn_like(torch.nn.functional.adaptive_avg_pool2d(x, size))
    expected = torch.nn.functional.adaptive_avg_pool2d(x, size)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    with run_backend("fp32", deterministic=True):
        got = adaptive_avg_pool2d(x, size)
        assert "AdaptiveAvgPool" not in got.grad_fn.name()  # no deterministic CUDA backward: it raises there
        (grad,) = torch.autograd.grad((got * weights).sum(), x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12) and torch.allclose(grad, expected_grad, rtol=0, atol=1e-12)
    assert adaptive_avg_pool2d(x, size).grad_fn.name() == expected.grad_fn.name()  # PyTorch's kernel otherwise


def test_a_deterministic_run_swaps_module_pools_and_keeps_the_weights_file(tmp_path):
    import torchvision

    import kdcli
    from kdcli.models.pooling import DeterministicAdaptiveAvgPool2d, make_pooling_deterministic
    from tests.plugin_models import StageNet, data

    net = torchvision.models.resnet18(num_classes=5).eval()
    keys, x = list(net.state_dict()), torch.randn(2, 3, 32, 32)
    before = net(x)
    assert make_pooling_deterministic(net) == 1 and isinstance(net.avgpool, DeterministicAdaptiveAvgPool2d)
    assert list(net.state_dict()) == keys and torch.allclose(net(x), before, atol=1e-6)

    student, (train, val, classes) = StageNet(num_classes=4), data()
    kdcli.train(student, data=(train, val), num_classes=classes, epochs=1, batch_size=16, device="cpu", deterministic=True, out=tmp_path / "run")
    assert isinstance(student.pool, DeterministicAdaptiveAvgPool2d)


def test_an_op_without_a_deterministic_kernel_is_a_clean_error(kd, tmp_path):
    from tests.conftest import assert_clean_error

    result = kd("train", "tests.plugin_models:cuda_only_pool_factory", "--data", TINY_DATA, "--epochs", "1",
                "--device", "cpu", "--deterministic", "--out", tmp_path / "run")
    assert_clean_error(result, "--deterministic: adaptive_avg_pool2d_backward_cuda has no deterministic kernel")
    assert "hint: drop --deterministic" in result.stderr
    assert kd("train", "tests.plugin_models:cuda_only_pool_factory", "--data", TINY_DATA, "--epochs", "1",
              "--device", "cpu", "--out", tmp_path / "plain").code == 0
