"""Reliability (issue 7): exact resume after SIGKILL, Ctrl-C, divergence, and bad input that writes nothing.

The kill and interrupt tests drive real `python -m kdcli` processes and send them real signals. Every
interrupted run is compared with an uninterrupted run of the same command (started once per module,
in the background): same student weights within 1e-6 and the same metrics.jsonl but for the fields that
measure the machine (time, throughput, memory).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from kdcli import __version__, api
from kdcli.cli import main
from kdcli.config import build_config
from kdcli.engine.checkpoint import load_state, save_state
from kdcli.methods.base import _REGISTRY, Method, Needs, register
from kdcli.models import create_model
from kdcli.teachers import save_model
from tests.conftest import MEASURED_FIELDS, TINY_DATA, _Silent, assert_clean_error, exit_code

# 1600 training images in 50 steps of 32: an epoch lasts about a second on one core, long enough to
# interrupt in its middle.
MEDIUM_DATA = "synthetic:classes=4,n=2000,size=16"
COMMON = ["--data", TINY_DATA, "--epochs", "1", "--batch-size", "32", "--device", "cpu"]
rng = random.Random()  # the kill points are random; a failure message carries them


# ---- helpers ----------------------------------------------------------------------------------

def env(home: Path) -> dict[str, str]:
    return {**os.environ, "KD_HOME": str(home), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}


def start(args: list, log: Path, cwd: Path) -> subprocess.Popen:
    """`python -m kdcli ARGS` in the background, stdout and stderr into `log`."""
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "kdcli", *map(str, args)], stdout=handle,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env(cwd))


def finish(args: list, log: Path, cwd: Path, timeout: float = 150) -> str:
    """Run `python -m kdcli ARGS` to its end; it must succeed. Returns its output."""
    proc = start(args, log, cwd)
    assert proc.wait(timeout=timeout) == 0, log.read_text()
    return log.read_text()


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) too early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()}"
        time.sleep(0.005)


def metric_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def kill(proc: subprocess.Popen, log: Path, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == -sig, f"the run finished before the kill:\n{log.read_text()}"


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_FIELDS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path, note: str = "") -> None:
    """Same student weights (1e-6) and metrics as the uninterrupted reference run."""
    got, expected = load_file(run / "student.safetensors"), load_file(reference / "student.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(got[key].double(), expected[key].double(), rtol=0, atol=1e-6), (key, note)
    assert metrics(run) == metrics(reference), note


def distill_args(teacher: Path, method: str, data: str, epochs: int, seed: int, *extra: str) -> list:
    return ["distill", "--teacher", teacher, "--student", "resnet8", "--method", method, *extra, "--data", data,
            "--epochs", str(epochs), "--batch-size", "32", "--device", "cpu", "--seed", str(seed)]


# ---- shared runs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A kd weights file of an (untrained) resnet8 for 4 classes: enough to distill from, deterministically."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_model(path, create_model("resnet8", num_classes=4), arch="resnet8", num_classes=4, dataset="synthetic")
    return path


def crd_args(teacher: Path) -> list:  # a memory bank: CRD with 16 negatives; seed 0, as `kd compare --seeds 1` runs it
    return distill_args(teacher, "crd", TINY_DATA, 3, 0, "--set", "K=16")


def kd_args(teacher: Path) -> list:
    return distill_args(teacher, "kd", MEDIUM_DATA, 2, 3)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_file):
    """`straight(name)`: the folder of the uninterrupted run `name` ("crd" or "kd"), trained once.

    In this process through the CLI, on one thread like the `OMP_NUM_THREADS=1` processes: bit-identical to them.
    """
    root = tmp_path_factory.mktemp("straight")
    commands = {"crd": crd_args(teacher_file), "kd": kd_args(teacher_file)}

    def get(name: str) -> Path:
        out = root / name
        if not out.exists():
            torch.set_num_threads(1)
            assert run_cli([*commands[name], "--out", out]) == 0
        return out

    return get


def run_cli(args: list) -> int:
    """`kd ARGS` in this process (the `kd` fixture, for module-scoped fixtures): the exit code."""
    saved = sys.argv
    sys.argv = ["kd", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        return exit_code(exc)
    finally:
        sys.argv = saved
    return 0


# ---- 1. SIGKILL, then resume: the same run ----------------------------------------------------

def test_sigkill_after_the_first_checkpoint_then_resume_is_exact_with_a_memory_bank(tmp_path, teacher_file, straight):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start([*crd_args(teacher_file), "--out", out], log, tmp_path)
    wait_for((out / "checkpoints" / "last.safetensors").exists, proc, log)
    kill(proc, log)
    assert not (out / "summary.json").exists()

    output = finish(["distill", "--resume", out], tmp_path / "resume.log", tmp_path)
    assert "resumed at epoch" in output
    assert_same_run(out, straight("crd"))


def test_sigkill_at_random_points_then_resume_is_exact(kd, tmp_path, teacher_file, straight):
    """Killed mid-epoch 1 (no checkpoint yet: resume starts over), resumed, killed mid-epoch 2, resumed."""
    out = tmp_path / "run"
    delays = [rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4)]
    note = f"kill delays {delays}"

    log = tmp_path / "run.log"
    proc = start([*kd_args(teacher_file), "--out", out], log, tmp_path)
    wait_for(lambda: "2 epochs x 50 steps" in log.read_text(), proc, log)  # training has started
    time.sleep(delays[0])
    kill(proc, log)
    assert not (out / "checkpoints" / "last.safetensors").exists(), note  # died inside epoch 1

    log = tmp_path / "resume1.log"
    proc = start(["distill", "--resume", out], log, tmp_path)
    wait_for(lambda: metric_lines(out) == 1, proc, log)  # epoch 1 done, its checkpoint follows at once
    time.sleep(delays[1])
    kill(proc, log)
    assert "no checkpoint yet: starting the run from its first epoch" in log.read_text()
    assert load_state(out / "checkpoints" / "last.safetensors")["epoch"] == 1, note

    result = kd("distill", "--resume", out)  # the last one in this process: the same CLI, one start-up less
    assert result.code == 0, result.stderr
    assert "resumed at epoch 2" in result.stderr, note
    assert_same_run(out, straight("kd"), note)


def test_sigkilled_compare_reuses_finished_runs_and_resumes_the_killed_one(kd, tmp_path, teacher_file, straight):
    out = tmp_path / "cmp"
    args = ["compare", "--teacher", teacher_file, "--student", "resnet8", "--methods", "none,crd", "--set", "K=16",
            "--seeds", "1", "--data", TINY_DATA, "--epochs", "3", "--batch-size", "32", "--device", "cpu", "--out", out]
    log = tmp_path / "first.log"
    proc = start(args, log, tmp_path)
    wait_for((out / "crd-seed0" / "checkpoints" / "last.safetensors").exists, proc, log)
    kill(proc, log)
    finished = (out / "none-seed0" / "summary.json").stat().st_mtime_ns
    assert not (out / "crd-seed0" / "summary.json").exists()

    result = kd(*args, "--json")
    assert result.code == 0, result.stderr
    assert "(1 done already)" in result.stderr and "crd-seed0 (resuming)" in result.stderr
    assert (out / "none-seed0" / "summary.json").stat().st_mtime_ns == finished  # reused, not retrained
    assert_same_run(out / "crd-seed0", straight("crd"))  # the same run as `kd distill --method crd --seed 0`
    assert {row["method"] for row in json.loads((out / "compare.json").read_text())["rows"]} == {"none", "crd"}


# ---- 2. Ctrl-C ----------------------------------------------------------------------------------

def test_sigint_saves_a_mid_epoch_checkpoint_and_resume_is_exact(kd, tmp_path, teacher_file, straight):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start([*kd_args(teacher_file), "--out", out], log, tmp_path)
    wait_for(lambda: "2 epochs x 50 steps" in log.read_text(), proc, log)
    time.sleep(0.3)  # inside epoch 1
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()
    output = log.read_text()
    assert "Traceback" not in output
    assert "SIGINT: stopping after the current step" in output
    assert "error: interrupted at step" in output and f"hint: resume with: kd distill --resume {out}" in output
    state = load_state(out / "checkpoints" / "last.safetensors")
    assert state["partial"] is not None and state["partial"]["epoch"] == state["epoch"] + 1  # mid-epoch
    assert not (out / "summary.json").exists()

    result = kd("distill", "--resume", out)
    assert result.code == 0, result.stderr
    assert_same_run(out, straight("kd"))


def test_a_second_sigint_stops_at_once_and_the_checkpoint_stays_loadable(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    # Steps of 256 images (~0.15 s each), so that the second signal lands inside the step the first lets finish.
    args = ["train", "resnet8", "--data", MEDIUM_DATA, "--epochs", "4", "--batch-size", "256", "--device", "cpu",
            "--out", out]
    proc = start(args, log, tmp_path)
    wait_for(lambda: metric_lines(out) == 1, proc, log)
    time.sleep(0.2)  # past epoch 1's checkpoint, inside epoch 2
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # right after (the kernel may merge the two: then it is one clean stop)
    assert proc.wait(timeout=60) == 130, log.read_text()
    output = log.read_text()
    assert "Traceback" not in output and "error: interrupted" in output
    # Stopped at once, by state: epoch 2 never finished (no second metrics line, no epoch-2 checkpoint).
    assert metric_lines(out) == 1
    state = load_state(out / "checkpoints" / "last.safetensors")  # whichever checkpoint is there loads
    assert state["epoch"] == 1
    assert not (out / "summary.json").exists()
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # no half-written file


def test_ctrl_c_pressed_again_and_again_while_kd_shuts_down_prints_no_traceback(tmp_path):
    """The first SIGINT starts a clean stop; a stream of further ones covers the second or so of saving,
    printing and interpreter shutdown (threads joined): none of them may surface as a traceback."""
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start(["train", "resnet8", "--data", MEDIUM_DATA, "--epochs", "3", "--batch-size", "64", "--device", "cpu",
                  "--out", out], log, tmp_path)
    wait_for(lambda: "3 epochs x 25 steps" in log.read_text(), proc, log)  # the header, not the recipe block
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT: stopping" in log.read_text(), proc, log)
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.002)
    output = log.read_text()
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert "error: interrupted" in output


class _SecondSignalInsideAStep(_Silent):
    """Sends SIGINT twice while epoch 2 runs: the second arrives before the step the first lets finish ends."""

    def step(self, epoch, step, images, loss=None):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def test_a_second_sigint_raises_at_once_in_process(tmp_path):
    out = tmp_path / "run"
    config = build_config({"command": "train", "student": "resnet8", "method": "none", "data": TINY_DATA,
                           "epochs": 3, "batch_size": 32, "device": "cpu", "out": str(out)})
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        api.run(config, reporter=_SecondSignalInsideAStep())
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    state = load_state(out / "checkpoints" / "last.safetensors")
    assert state["epoch"] == 1 and state["partial"] is None  # epoch 1's checkpoint, untouched
    assert [m["epoch"] for m in metrics(out)] == [1]
    assert api.resume(out, reporter=_Silent())["epochs"] == 3  # and it resumes


# ---- 3. Divergence ------------------------------------------------------------------------------

class _NanFromEpoch2(Method):
    """Test only: a finite extra term in epoch 1, NaN from epoch 2 on (`interrupt`: also press Ctrl-C then)."""

    title = "NaN from epoch 2 (test)"
    needs = Needs(teacher=False)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0, "interrupt": False}

    def distill(self, s, t, batch):
        if self.epoch < 2:
            return {"blowup": 0.0 * s.logits.mean()}
        if self.hp["interrupt"] and not getattr(self, "_interrupted", False):
            self._interrupted = True
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C before the next loss check
        return {"blowup": float("nan") * s.logits.mean()}


@pytest.fixture
def nan_method():
    name = "test-nan-from-epoch-2"
    register(name)(_NanFromEpoch2)
    yield name
    _REGISTRY.pop(name, None)


def _assert_diverged_with_epoch_1_kept(result, out: Path) -> None:
    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert "training diverged" in error and "of epoch 2" in error and "step " in error
    assert "blowup=nan" in error and "ce=" in error  # names the loss terms
    assert any(line.startswith("hint: ") and "--lr" in line for line in result.stderr.splitlines())
    state = load_state(out / "checkpoints" / "last.safetensors")  # the last good checkpoint, intact
    assert state["epoch"] == 1 and state["partial"] is None
    assert all(torch.isfinite(v).all() for v in state["student"].values())
    assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoints" / "best.safetensors").values())
    assert [m["epoch"] for m in metrics(out)] == [1]
    assert not (out / "student.safetensors").exists() and not (out / "summary.json").exists()


def test_divergence_exits_1_naming_step_and_terms_and_keeps_the_last_good_checkpoint(kd, tmp_path, nan_method):
    out = tmp_path / "run"
    result = kd("distill", "--student", "resnet8", "--method", nan_method, *COMMON, "--epochs", "3", "--out", out)
    _assert_diverged_with_epoch_1_kept(result, out)
    assert "step 4 of epoch 2" in result.stderr  # 128 samples / 32: checked at the epoch's last step


def test_ctrl_c_after_a_divergence_saves_no_diverged_checkpoint(kd, tmp_path, nan_method):
    out = tmp_path / "run"
    result = kd("distill", "--student", "resnet8", "--method", nan_method, "--set", "interrupt=true", *COMMON,
                "--epochs", "3", "--out", out)
    _assert_diverged_with_epoch_1_kept(result, out)


# ---- 4. Bad input: exit 2, `error:` + `hint:`, no traceback, nothing written -----------------------
# Already in tests/test_cli.py (messages): test_unknown_names, test_missing_teacher,
# test_corrupt_and_truncated_teacher, test_teacher_class_count_must_match_the_data, test_missing_cifar_files,
# test_repdistiller_pth_teacher (arch mismatch), test_distill_from_teacher_file_and_rerun_refusal (a folder
# holding a run), test_malicious_pickle_is_refused_without_running; library level in test_config.py
# (invalid numbers, preset syntax and keys) and test_data.py (image folders, CIFAR). The table below adds
# the did-you-mean hints, the rows missing there, and for every row that nothing was written.

def _images(root: Path, train=("cat", "dog"), val=("cat", "dog"), per_class=2) -> Path:
    generator = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = generator.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _row_args(row: str, tmp: Path, teacher: Path) -> tuple[list, tuple[str, ...]]:
    """The `kd` arguments of a bad-input row (--out added by the test) and what the error/hint must say."""
    base = ["distill", "--teacher", teacher, "--student", "resnet8"]
    distill = [*base, *COMMON]
    other_data = [*base, "--epochs", "1", "--device", "cpu", "--data"]  # + the data spec
    if row == "unknown model":
        return ["distill", "--teacher", teacher, "--student", "resnet21", *COMMON], ("unknown model 'resnet21'", "did you mean", "'resnet20'")
    if row == "unknown method":
        return [*distill, "--method", "kdd"], ("unknown method 'kdd'", "did you mean", "'kd'")
    if row == "unknown dataset":
        return ["distill", "--teacher", teacher, "--data", "cifar1000"], ("unknown dataset 'cifar1000'", "'cifar100'")
    if row == "unknown synthetic option":
        return ["distill", "--teacher", teacher, "--data", "synthetic:clases=4"], ("unknown synthetic option", "'classes'")
    if row == "unknown preset":
        return [*distill, "--preset", "quikstart"], ("unknown preset 'quikstart'", "'quickstart'")
    if row == "unknown option key":
        return [*distill, "--method", "kd", "--set", "TT=3"], ("unknown option", "'TT'", "did you mean 'T'")
    if row == "teacher missing":
        return [*distill[:2], tmp / "nope.safetensors", *distill[3:]], ("does not exist",)
    if row == "teacher corrupt":
        (tmp / "garbage.safetensors").write_bytes(b"not a safetensors file")
        return [*distill[:2], tmp / "garbage.safetensors", *distill[3:]], ("garbage.safetensors",)
    if row == "teacher truncated":
        (tmp / "cut.safetensors").write_bytes(teacher.read_bytes()[:-1000])
        return [*distill[:2], tmp / "cut.safetensors", *distill[3:]], ("cut.safetensors",)
    if row == "teacher safetensors not from kd":
        save_file({"w": torch.ones(2)}, str(tmp / "foreign.safetensors"))
        return [*distill[:2], tmp / "foreign.safetensors", *distill[3:]], ("not written by kd",)
    if row == "teacher not a weights file":
        (tmp / "notes.txt").write_text("hello")
        return [*distill[:2], tmp / "notes.txt", "--teacher-arch", "resnet8", *distill[3:]], ("refused",)
    if row == "teacher is a run folder":
        (tmp / "trun").mkdir()
        (tmp / "trun" / "student.safetensors").write_bytes(teacher.read_bytes())
        return [*distill[:2], tmp / "trun", *distill[3:]], ("is a folder, not a weights file", "trun/student.safetensors")
    if row == "teacher arch mismatch":
        return [*distill, "--teacher-arch", "resnet20"], ("does not match architecture 'resnet20'",)
    if row == "teacher class count":
        return ["distill", "--teacher", teacher, "--data", "synthetic:classes=5,n=100,size=16", "--device", "cpu"], ("predicts 4 classes but the data has 5",)
    if row == "student is a weights file":
        return ["distill", "--teacher", teacher, "--student", teacher, *COMMON], ("is a weights file", "--student resnet20")
    if row == "missing CIFAR files offline":
        return [*other_data, "cifar100", "--data-dir", tmp / "empty"], ("cifar100 not found", "--download")
    if row == "image folder is a file":
        return [*other_data, f"imagefolder:{teacher}"], ("does not exist",)
    if row == "class only in train":
        return [*other_data, f"imagefolder:{_images(tmp / 'img', val=('cat',))}"], ("only in train: dog",)
    if row == "class folder without images":
        root = _images(tmp / "img")
        (root / "val" / "owl").mkdir()
        (root / "train" / "owl").mkdir()
        return [*other_data, f"imagefolder:{root}"], ("no usable images",)
    if row == "unreadable image":
        root = _images(tmp / "img")
        (root / "val" / "cat" / "broken.png").write_bytes(b"\x89PNG junk")
        # kd train (the folder has 2 classes, the teacher 4); the broken file is read in the dry run, before --out
        return ["train", "resnet8", *other_data[5:], f"imagefolder:{root}", "--workers", "1"], ("cannot read image", "broken.png")
    if row == "negative epochs":
        return [*distill, "--epochs", "-3"], ("--epochs -3",)
    if row == "zero batch size":
        return [*distill, "--batch-size", "0"], ("--batch-size 0",)
    if row == "zero lr":
        return [*distill, "--lr", "0"], ("--lr 0",)
    if row == "negative lr":
        return [*distill, "--lr", "-0.1"], ("--lr -0.1",)
    if row == "preset syntax error":
        (tmp / "bad.toml").write_text("epochs = = 3\n")
        return [*distill, "--preset", tmp / "bad.toml"], ("not valid TOML",)
    if row == "preset unknown key":
        (tmp / "typo.toml").write_text("epoch = 3\n")
        return [*distill, "--preset", tmp / "typo.toml"], ("unknown key 'epoch'", "'epochs'")
    raise AssertionError(row)


BAD_INPUT_ROWS = [
    "unknown model", "unknown method", "unknown dataset", "unknown synthetic option", "unknown preset",
    "unknown option key", "teacher missing", "teacher corrupt", "teacher truncated",
    "teacher safetensors not from kd", "teacher not a weights file", "teacher is a run folder",
    "teacher arch mismatch", "teacher class count", "student is a weights file", "missing CIFAR files offline",
    "image folder is a file", "class only in train", "class folder without images", "unreadable image",
    "negative epochs", "zero batch size", "zero lr", "negative lr", "preset syntax error", "preset unknown key",
]


@pytest.mark.parametrize("row", BAD_INPUT_ROWS)
def test_bad_input_is_refused_before_anything_is_written(kd, tmp_path, monkeypatch, teacher_file, row):
    monkeypatch.chdir(tmp_path)  # a default run folder would land in runs/ here
    args, fragments = _row_args(row, tmp_path, teacher_file)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    result = kd(*args, "--out", out)
    assert_clean_error(result)
    said = result.stderr
    for fragment in fragments:
        assert fragment in said, (fragment, said)
    assert not out.exists() and not (tmp_path / "runs").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_folder_holding_the_teacher_is_refused(kd, tmp_path, teacher_file):
    # A folder of weights that is no run yet: the run would mix its files with the teacher's.
    folder = tmp_path / "teachers"
    folder.mkdir()
    (folder / "t.safetensors").write_bytes(teacher_file.read_bytes())
    before = _tree(folder)
    result = kd("distill", "--teacher", folder / "t.safetensors", "--student", "resnet8", *COMMON, "--out", folder)
    assert_clean_error(result, "holds the teacher's weights")
    assert _tree(folder) == before
    # A finished run distilled further: --overwrite would replace the very student.safetensors it reads.
    run = tmp_path / "run"
    assert kd("distill", "--teacher", teacher_file, "--student", "resnet8", *COMMON, "--out", run).code == 0
    before = _tree(run)
    result = kd("distill", "--teacher", run / "student.safetensors", "--student", "resnet8", *COMMON,
                "--out", run, "--overwrite")
    assert_clean_error(result, "holds the teacher's weights")
    assert _tree(run) == before


def test_out_folder_refusals_leave_it_unchanged(kd, tmp_path, teacher_file):
    # Another run's folder (its config.toml) is refused without --overwrite or --resume.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.toml").write_text('command = "train"\nstudent = "resnet20"\n')
    (other / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = _tree(other)
    result = kd("distill", "--teacher", teacher_file, "--student", "resnet8", *COMMON, "--out", other)
    assert_clean_error(result, "already holds a run")
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    assert _tree(other) == before
    # Unwritable: a path below a regular file (tests run as root, so permissions would not stop it).
    result = kd("distill", "--teacher", teacher_file, "--student", "resnet8", *COMMON, "--out", teacher_file / "run")
    assert_clean_error(result, "cannot write to")
    assert teacher_file.is_file()


@pytest.fixture
def finished_run(tmp_path) -> Path:
    out = tmp_path / "run"
    api.run(build_config({"command": "train", "student": "resnet8", "method": "none", "data": TINY_DATA,
                          "epochs": 1, "batch_size": 32, "device": "cpu", "out": str(out)}), reporter=_Silent())
    (out / "summary.json").unlink()  # as if stopped after its checkpoint
    return out


def test_resume_refuses_another_kd_version(kd, finished_run):
    last = finished_run / "checkpoints" / "last.safetensors"
    state = load_state(last)
    save_state(last, {**state, "kdcli_version": "0.0.1"})
    before = _tree(finished_run)
    result = kd("train", "--resume", finished_run)
    assert_clean_error(result, "written by kd 0.0.1", f"this is kd {__version__}")
    assert _tree(finished_run) == before


def test_resume_refuses_a_changed_config(kd, finished_run):
    config = finished_run / "config.toml"
    config.write_text(config.read_text().replace("epochs = 1", "epochs = 2"))
    before = _tree(finished_run)
    assert_clean_error(kd("train", "--resume", finished_run), "config.toml changed")
    assert _tree(finished_run) == before


def test_resume_refuses_flags_it_would_ignore(kd, finished_run):
    before = _tree(finished_run)
    result = kd("train", "--resume", finished_run, "--epochs", "5", "--lr", "0.1")
    assert_clean_error(result, "--epochs, --lr cannot be combined")
    assert _tree(finished_run) == before
    assert_clean_error(kd("train", "resnet20", "--resume", finished_run), "MODEL cannot be combined")


def test_unreadable_training_image_stops_cleanly_and_the_run_continues_once_fixed(kd, tmp_path):
    root = _images(tmp_path / "img")
    broken = root / "train" / "dog" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "run"
    args = ["train", "resnet8", "--data", f"imagefolder:{root}", "--epochs", "1", "--device", "cpu", "--workers", "0"]
    result = kd(*args, "--out", out)
    assert_clean_error(result, "cannot read image", "broken.jpg")
    assert "--resume" in result.stderr
    assert not (out / "checkpoints" / "last.safetensors").exists()  # it failed in the first steps
    broken.unlink()
    result = kd("train", "--resume", out, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["epochs"] == 1


def test_a_resume_checkpoint_given_as_teacher_says_what_it_is(kd, finished_run):
    result = kd("distill", "--teacher", finished_run / "checkpoints" / "last.safetensors", "--student", "resnet8",
                *COMMON, "--out", finished_run.parent / "out")
    assert_clean_error(result, "resume checkpoint")  # says what the file is ...
    assert "not written by kd" not in result.stderr  # ... not that it is foreign
    assert "student.safetensors" in result.stderr.split("hint:")[1]


def test_safetensors_header_dtypes_are_checked_before_loading(kd, tmp_path):
    """An integer tensor where the model has a float weight is refused from the header alone."""
    from kdcli.teachers import FORMAT

    state = {k: v.contiguous() for k, v in create_model("resnet8", num_classes=4).state_dict().items()}
    state["fc.weight"] = state["fc.weight"].to(torch.int32)
    bad = tmp_path / "typed.safetensors"
    save_file(state, str(bad), metadata={"format": FORMAT, "arch": "resnet8", "num_classes": "4"})
    assert_clean_error(kd("distill", "--teacher", bad, *COMMON, "--out", tmp_path / "out"), "mis-typed")
    assert not (tmp_path / "out").exists()
