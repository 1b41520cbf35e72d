"""Bad input and faults (issue 18): every row exits with `error:` + `hint:` and writes nothing.

The tables grow as the README's troubleshooting table does: add a row for every new kind of bad
input. A row is (name, builder); the builder makes whatever files the case needs under `tmp` and
returns the `kd` arguments and the fragments the error line must contain. The test snapshots the
folder after the builder ran and checks nothing changed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdcli import api
from kdcli.config import build_config, read_config_file, to_toml
from kdcli.engine.checkpoint import load_state, save_state
from kdcli.engine.rundir import LOCK_NAME, RunDir
from kdcli.errors import KdError, is_disk_full
from kdcli.methods import list_methods
from kdcli.methods.base import _REGISTRY, RANGES, Method, Needs, hparam_ranges, register
from kdcli.models import create_model
from kdcli.teachers import save_model
from tests.conftest import TINY_DATA, _Silent, assert_clean_error

COMMON = ["--data", TINY_DATA, "--epochs", "1", "--batch-size", "32", "--device", "cpu"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_model(path, create_model("resnet8", num_classes=4), arch="resnet8", num_classes=4, dataset=TINY_DATA)
    return path


def _weights(tmp: Path, name: str, **metadata) -> Path:
    """A resnet8 (4 classes) kd weights file with `metadata` over the usual fields."""
    path = tmp / name
    fields = {"arch": "resnet8", "num_classes": 4, "dataset": TINY_DATA, **metadata}
    save_model(path, create_model("resnet8", num_classes=4), **fields)
    return path


def _preset(tmp: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _foreign_folder(tmp: Path) -> Path:
    """Someone else's folder: a config.toml kd did not write, and checkpoints of another tool."""
    folder = tmp / "theirs"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.toml").write_text('[model]\nlayers = 3\n')
    (folder / "checkpoints" / "ckpt_epoch_240.pth").write_bytes(b"precious")
    return folder


def _kd_run_with_extra_file(tmp: Path) -> Path:
    folder = tmp / "kdrun"
    folder.mkdir()
    (folder / "config.toml").write_text('command = "train"\nstudent = "resnet20"\n')
    (folder / "notes.txt").write_text("my notes")
    return folder


def _parts_of_a_run(tmp: Path) -> Path:
    folder = tmp / "parts"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return folder


def _summary_not_utf8(tmp: Path) -> Path:
    folder = tmp / "finished"
    folder.mkdir()
    (folder / "summary.json").write_bytes(b'{"student": "\xff"}')
    return folder


# (name, builder(tmp, teacher) -> (args without --out, fragments of the error line))
FLAG_ROWS = {
    "seed beyond 64 bits": lambda tmp, t: (["train", "resnet8", *COMMON, "--seed", str(2**70)], ("--seed",)),
    "negative seed": lambda tmp, t: (["train", "resnet8", *COMMON, "--seed", "-1"], ("--seed -1",)),
    "huge epochs": lambda tmp, t: (["train", "resnet8", *COMMON, "--epochs", str(10**30)], ("--epochs",)),
    "huge batch size": lambda tmp, t: (["train", "resnet8", *COMMON, "--batch-size", str(10**12)], ("--batch-size",)),
    "negative workers": lambda tmp, t: (["train", "resnet8", *COMMON, "--workers", "-1"], ("--workers -1",)),
    "lr inf": lambda tmp, t: (["train", "resnet8", *COMMON, "--lr", "inf"], ("--lr inf",)),
    "lr nan": lambda tmp, t: (["train", "resnet8", *COMMON, "--lr", "nan"], ("--lr nan",)),
    "T nan": lambda tmp, t: (["distill", "--teacher", t, "--student", "resnet8", *COMMON, "--set", "T=nan"], ("T=nan",)),
    "T zero": lambda tmp, t: (["distill", "--teacher", t, "--student", "resnet8", *COMMON, "--set", "T=0"], ("T=0",)),
    "T inf": lambda tmp, t: (["distill", "--teacher", t, "--student", "resnet8", *COMMON, "--set", "T=inf"], ("T=inf",)),
    "negative loss weight": lambda tmp, t: (["distill", "--teacher", t, "--student", "resnet8", *COMMON, "--set", "kd=-1"], ("kd=-1",)),
    "crd zero negatives": lambda tmp, t: (["distill", "--teacher", t, "--student", "resnet8", "--method", "crd", *COMMON,
                                          "--set", "K=0"], ("K=0",)),
    "crd momentum above 1": lambda tmp, t: (["distill", "--teacher", t, "--student", "resnet8", "--method", "crd", *COMMON,
                                            "--set", "momentum=2"], ("momentum=2",)),
    "huge synthetic n": lambda tmp, t: (["train", "resnet8", "--data", "synthetic:n=1000000000000", "--device", "cpu"], ("too large",)),
    "synthetic size x n too big": lambda tmp, t: (["train", "resnet8", "--data", "synthetic:n=1000000,size=512", "--device", "cpu"],
                                                  ("2 GiB",)),
    "synthetic non-ascii digit": lambda tmp, t: (["train", "resnet8", "--data", "synthetic:n=\u00b2", "--device", "cpu"],
                                                 ("needs an integer",)),
    "synthetic 5000 digits": lambda tmp, t: (["train", "resnet8", "--data", "synthetic:n=" + "9" * 5000, "--device", "cpu"],
                                             ("needs an integer",)),
    "preset bool for int": lambda tmp, t: (["train", "resnet8", *COMMON[:2], "--preset", _preset(tmp, "epochs = true\n")],
                                           ("epochs = true is invalid",)),
    "preset float for int": lambda tmp, t: (["train", "resnet8", *COMMON[:2], "--preset", _preset(tmp, "epochs = 2.5\n")],
                                            ("epochs = 2.5",)),
    "preset string for int": lambda tmp, t: (["train", "resnet8", "--preset", _preset(tmp, 'batch_size = "32"\n')],
                                             ("batch_size = '32'",)),
    "preset string for float": lambda tmp, t: (["train", "resnet8", "--preset", _preset(tmp, 'lr = "fast"\n')], ("lr = 'fast'",)),
    "preset int for bool": lambda tmp, t: (["train", "resnet8", "--preset", _preset(tmp, "compile = 1\n")], ("compile = 1",)),
    "preset huge int": lambda tmp, t: (["train", "resnet8", "--preset", _preset(tmp, "seed = 9223372036854775807\nworkers = 100000\n")],
                                       ("workers = 100000",)),
    "preset milestone 0": lambda tmp, t: (["train", "resnet8", "--preset", _preset(tmp, "milestones = [0, 3]\n")], ("milestones",)),
    "preset options not a table": lambda tmp, t: (["distill", "--teacher", t, "--preset", _preset(tmp, "options = 3\n")], ("options = 3",)),
    "preset option of the wrong type": lambda tmp, t: (["distill", "--teacher", t, "--student", "resnet8", *COMMON,
                                                        "--preset", _preset(tmp, "[options]\nT = true\n")], ("T=True",)),
    "preset wrong device": lambda tmp, t: (["train", "resnet8", "--preset", _preset(tmp, 'device = "tpu"\n')], ("device = 'tpu'",)),
    "preset not UTF-8": lambda tmp, t: (["train", "resnet8", "--preset", _preset(tmp, b"epochs = 3 # \xff\xfe caf\xe9\n")],
                                        ("not UTF-8",)),
    "preset is a folder": lambda tmp, t: (["train", "resnet8", "--preset", (tmp / "dir.toml").mkdir() or tmp / "dir.toml"],
                                          ("is a folder",)),
    "teacher num_classes not a number": lambda tmp, t: (["distill", "--teacher", _weights(tmp, "nc.safetensors", num_classes="four"),
                                                         "--student", "resnet8", *COMMON], ("num_classes='four'",)),
    "teacher num_classes negative": lambda tmp, t: (["distill", "--teacher", _weights(tmp, "neg.safetensors", num_classes="-4"),
                                                     "--student", "resnet8", *COMMON], ("num_classes='-4'",)),
    "teacher num_classes missing": lambda tmp, t: (["distill", "--teacher", _weights(tmp, "none.safetensors", num_classes=None),
                                                    "--student", "resnet8", *COMMON], ("num_classes=''",)),
    "eval mean of 2 values": lambda tmp, t: (["eval", _weights(tmp, "m.safetensors", mean="0.5,0.5", std="0.2,0.2,0.2"), *COMMON[:2],
                                              "--device", "cpu", "--no-timing"], ("mean='0.5,0.5'",)),
    "eval std of zero": lambda tmp, t: (["eval", _weights(tmp, "s.safetensors", mean="0.5,0.5,0.5", std="0,0,0"), *COMMON[:2],
                                         "--device", "cpu", "--no-timing"], ("std='0,0,0'",)),
    "eval mean nan": lambda tmp, t: (["eval", _weights(tmp, "n.safetensors", mean="nan,0,0", std="1,1,1"), *COMMON[:2],
                                      "--device", "cpu", "--no-timing"], ("mean='nan,0,0'",)),
    "eval negative workers": lambda tmp, t: (["eval", t, *COMMON[:2], "--workers", "-2", "--no-timing"], ("--workers -2",)),
    "eval zero batch size": lambda tmp, t: (["eval", t, *COMMON[:2], "--batch-size", "0", "--no-timing"], ("--batch-size 0",)),
    "overwrite a folder kd did not write": lambda tmp, t: (["train", "resnet8", *COMMON, "--overwrite", "--out", _foreign_folder(tmp)],
                                                           ("did not write",)),
    "overwrite a kd run with someone's file in it": lambda tmp, t: (["train", "resnet8", *COMMON, "--overwrite",
                                                                      "--out", _kd_run_with_extra_file(tmp)], ("notes.txt",)),
    "device index not a number": lambda tmp, t: (["train", "resnet8", *COMMON[:-2], "--device", "cuda:abc"], ("--device 'cuda:abc'",)),
    "eval device index not a number": lambda tmp, t: (["eval", t, *COMMON[:2], "--device", "cuda:x", "--no-timing"], ("--device",)),
    "compare seeds count beyond reason": lambda tmp, t: (["compare", "--student", "resnet8", *COMMON, "--seeds", "1000000000"],
                                                         ("--seeds",)),
    "compare seed beyond 64 bits": lambda tmp, t: (["compare", "--student", "resnet8", *COMMON, "--seeds", "0," + "9" * 30],
                                                   ("--seeds",)),
    "compare epochs zero": lambda tmp, t: (["compare", "--student", "resnet8", *COMMON[:2], "--epochs", "0"], ("--epochs 0",)),
    "out path not UTF-8": lambda tmp, t: (["train", "resnet8", *COMMON, "--out", os.fsdecode(bytes(tmp) + b"/bad\xff")],
                                          ("--out", "\\udcff")),
    "set value not UTF-8": lambda tmp, t: (["distill", "--teacher", t, "--student", "resnet8", *COMMON, "--set",
                                            "grad_loss=" + os.fsdecode(b"\xff"), "--method", "crcd"], ("--set",)),
    "compare summary not UTF-8": lambda tmp, t: (["compare", _summary_not_utf8(tmp)], ("cannot read",)),
    "out holds parts of a run": lambda tmp, t: (["train", "resnet8", *COMMON, "--out", _parts_of_a_run(tmp)],
                                                ("holds parts of a run",)),
}


@pytest.mark.parametrize("row", FLAG_ROWS)
def test_bad_input_row(kd, tmp_path, monkeypatch, teacher_file, row):
    monkeypatch.chdir(tmp_path)  # a default run folder would land in runs/ here
    args, fragments = FLAG_ROWS[row](tmp_path, teacher_file)
    if "--out" not in args:
        args = [*args, "--out", tmp_path / "out"] if args[0] != "eval" else args
    before = _tree(tmp_path)
    result = kd(*args)
    assert_clean_error(result, *fragments)
    assert _tree(tmp_path) == before
    assert not (tmp_path / "runs").exists()


def test_kd_home_that_is_a_file_is_refused_before_training(kd, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("KD_HOME", str(home))
    result = kd("train", "resnet8", *COMMON, "--out", tmp_path / "out")
    assert_clean_error(result, "KD_HOME", str(home))
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("KD_HOME", str(home / "below"))  # a folder below a file: the same
    assert_clean_error(kd("train", "resnet8", *COMMON, "--out", tmp_path / "out"), "KD_HOME")


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# ---- method ranges ----------------------------------------------------------------------------

def test_every_method_declares_ranges_only_for_its_options_and_they_admit_its_defaults():
    for name, cls in list_methods().items():
        ranges = hparam_ranges(cls)
        assert set(ranges) <= set(cls.defaults), name
        assert set(ranges.values()) <= set(RANGES), name
        for key, kind in ranges.items():
            default = cls.defaults[key]
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert RANGES[kind][0](default), (name, key, default)


# ---- the run folder: resume inputs, locks, overwrite ------------------------------------------

@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "run"
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:  # its own teacher store, never ~/.cache
        patch.setenv("KD_HOME", str(tmp_path_factory.mktemp("pristine_home")))
        api.run(build_config({"command": "train", "student": "resnet8", "method": "none", "data": TINY_DATA,
                              "epochs": 1, "batch_size": 32, "device": "cpu", "out": str(out)}), reporter=_Silent())
    return out


@pytest.fixture
def run_copy(tmp_path, pristine_run) -> Path:
    """A finished 1-epoch run whose summary.json is gone (as if stopped after its checkpoint)."""
    out = tmp_path / "run"
    shutil.copytree(pristine_run, out)
    (out / "summary.json").unlink()
    return out


def _edit_config(run: Path, old: str, new: str) -> None:
    config = run / "config.toml"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))


def _edit_state(run: Path, **changes) -> None:
    last = run / "checkpoints" / "last.safetensors"
    state = load_state(last)
    for key, value in changes.items():
        if value is _DROP:
            state.pop(key)
        else:
            state[key] = value
    save_state(last, state)


_DROP = object()
RESUME_ROWS = {
    "config.toml epochs is a bool": (lambda run: _edit_config(run, "epochs = 1", "epochs = true"), ("epochs = true",)),
    "config.toml seed is a float": (lambda run: _edit_config(run, "seed = 0", "seed = 0.5"), ("seed = 0.5",)),
    "config.toml lr is a string": (lambda run: _edit_config(run, "epochs = 1", 'epochs = 1\nlr = "high"'), ("lr = 'high'",)),
    "config.toml not UTF-8": (lambda run: (run / "config.toml").write_bytes(b"\xff" + (run / "config.toml").read_bytes()),
                              ("not UTF-8",)),
    "checkpoint epoch negative": (lambda run: _edit_state(run, epoch=-1), ("inconsistent", "epoch -1")),
    "checkpoint epoch past the run": (lambda run: _edit_state(run, epoch=10**9), ("inconsistent",)),
    "checkpoint epoch a string": (lambda run: _edit_state(run, epoch="1"), ("inconsistent",)),
    "checkpoint without student": (lambda run: _edit_state(run, student=_DROP), ("no student",)),
    "checkpoint student of another shape": (lambda run: _edit_state(run, student={"fc.weight": torch.zeros(3, 3)}),
                                            ("does not fit this run",)),
    "checkpoint optimizer forged": (lambda run: _edit_state(run, optimizer={"state": {}, "param_groups": [{"params": [0]}]}),
                                    ("does not fit this run",)),
    "checkpoint rng forged": (lambda run: _edit_state(run, ranks=[{"rng": {"torch": torch.zeros(3)}}]), ("RNG",)),
    "checkpoint without per-process states": (lambda run: _edit_state(run, ranks=[]), ("per-process states",)),
    "checkpoint partial out of step": (lambda run: _edit_state(run, partial={"epoch": 7}), ("mid-epoch",)),
    "checkpoint partial without sums": (lambda run: _edit_state(run, partial={"epoch": 2}), ("no running sums",)),
    "checkpoint sums forged": (lambda run: _edit_state(run, partial={"epoch": 2}, ranks=[
        {"rng": {"torch": torch.get_rng_state()}, "sums": {"terms": 3}, "method": None}]), ("does not fit this run",)),
    "checkpoint header not JSON": (lambda run: _forge_header(run, "{not json"), ("unreadable",)),
    "checkpoint header names a missing tensor": (lambda run: _forge_header(run, json.dumps({"__tensor__": "nope"})), ("unreadable",)),
    "checkpoint header of the wrong shape": (lambda run: _forge_header(run, json.dumps({"__dict__": 5})), ("unreadable",)),
    "finished run with empty metrics": (lambda run: (run / "metrics.jsonl").write_text(""), ("metrics.jsonl is empty",)),
}


def _forge_header(run: Path, skeleton: str) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(run / "checkpoints" / "last.safetensors"),
              metadata={"kdcli.state": skeleton})


@pytest.mark.parametrize("row", RESUME_ROWS)
def test_bad_resume_input_row(kd, run_copy, row):
    damage, fragments = RESUME_ROWS[row]
    damage(run_copy)
    before = _tree(run_copy)
    result = kd("train", "--resume", run_copy)
    assert_clean_error(result, *fragments)
    assert _tree(run_copy) == before


def test_a_second_writer_on_a_run_folder_is_refused(kd, run_copy):
    before = _tree(run_copy)
    with open(run_copy / LOCK_NAME) as handle:  # another process holds the run (flock is per open file)
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert_clean_error(kd("train", "--resume", run_copy), "another kd process is running the run")
        assert_clean_error(kd("train", "resnet8", *COMMON, "--out", run_copy, "--overwrite"), "another kd process")
    assert _tree(run_copy) == before
    assert kd("train", "--resume", run_copy).code == 0  # released: it resumes


def test_two_processes_on_one_run_folder_one_is_refused(tmp_path, run_copy):
    """Two real `kd --resume` of one run: the second is refused (exit 2) while the first holds the folder
    (frozen with SIGSTOP, so that it surely does), and the metrics stay one run's."""
    _edit_config(run_copy, "epochs = 1", "epochs = 4")  # make the run longer ...
    _edit_state(run_copy, config=_fingerprint(run_copy))  # ... and its checkpoint agree with it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "kdcli", "train", "--resume", str(run_copy)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lock = run_copy / LOCK_NAME
        deadline = time.monotonic() + 120
        while not _locked(lock):  # the first holds the folder
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        assert _locked(lock), "the first run finished before it could be held"
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert "error: another kd process is running the run" in second.stderr and "Traceback" not in second.stderr
    assert [json.loads(line)["epoch"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def _fingerprint(run: Path) -> str:
    from kdcli.engine.trainer import config_fingerprint

    return config_fingerprint((run / "config.toml").read_text())


def _locked(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_overwrite_replaces_only_what_kd_wrote(kd, tmp_path, pristine_run):
    run = tmp_path / "run"
    shutil.copytree(pristine_run, run)
    result = kd("train", "resnet8", *COMMON, "--out", run, "--overwrite", "--seed", "1")
    assert result.code == 0, result.stderr
    assert 'seed = 1' in (run / "config.toml").read_text()
    assert {p.name for p in run.iterdir()} <= {"config.toml", "metrics.jsonl", "summary.json", "summary.csv",
                                               "model.safetensors", "checkpoints", LOCK_NAME}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # the old run's lines are gone


def test_foreign_files_survive_a_refused_overwrite(kd, tmp_path):
    folder = _foreign_folder(tmp_path)
    before = _tree(folder)
    assert_clean_error(kd("train", "resnet8", *COMMON, "--out", folder, "--overwrite"), "did not write")
    assert _tree(folder) == before


# ---- config.toml: a real TOML writer -----------------------------------------------------------

@pytest.mark.parametrize("text", ['a "quoted" \\ path', "line\nbreak", "tab\tand unicode \u00e9\u4e2d", "'single'", "#hash = 1"])
def test_config_toml_reads_back_any_string(tmp_path, text):
    config = build_config({"student": "resnet8", "out": text, "data_dir": text, "options": {"note": text}})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert build_config(read_config_file(path)) == config


def test_a_run_folder_with_a_newline_in_its_name_resumes(kd, tmp_path):
    out = tmp_path / "odd\nname"
    assert kd("train", "resnet8", *COMMON, "--out", out).code == 0
    (out / "summary.json").unlink()
    result = kd("train", "--resume", out, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["run_dir"] == str(out)


# ---- faults while running -----------------------------------------------------------------------

class _NanAtOnce(Method):
    title = "NaN from the first step (test)"
    needs = Needs(teacher=False)

    def distill(self, s, t, batch):
        return {"blowup": float("nan") * s.logits.mean()}


def test_divergence_in_the_first_epoch_points_at_no_missing_checkpoint(kd, tmp_path):
    register("test-nan-at-once")(_NanAtOnce)
    try:
        out = tmp_path / "run"
        result = kd("distill", "--student", "resnet8", "--method", "test-nan-at-once", *COMMON, "--out", out)
    finally:
        _REGISTRY.pop("test-nan-at-once", None)
    assert result.code == 1, result.stderr
    hint = next(line for line in result.stderr.splitlines() if line.startswith("hint: "))
    assert not (out / "checkpoints").exists()
    assert "checkpoints" not in hint and "before its first checkpoint" in hint


def test_a_full_disk_says_so_and_resume_continues_once_there_is_space(kd, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = RunDir.append_metrics

    def full(self, line):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics))

    monkeypatch.setattr(RunDir, "append_metrics", full)
    result = kd("train", "resnet8", *COMMON, "--epochs", "2", "--out", out)
    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert "disk is full" in error and "metrics.jsonl" in error
    assert f"--resume {out}" in result.stderr
    monkeypatch.setattr(RunDir, "append_metrics", real)  # space again
    result = kd("train", "--resume", out, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["epochs"] == 2


def test_a_full_disk_reported_by_safetensors_is_recognised():
    from safetensors import SafetensorError

    assert is_disk_full(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                            "message: \"No space left on device\" })"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


# ---- usage errors: kd's form, the did-you-mean kept ---------------------------------------------

USAGE_ROWS = {
    "misspelt option": (["distill", "--epoch", "3"], "no such option: --epoch", "did you mean --epochs?"),
    "misspelt flag": (["list", "--jsn"], "no such option: --jsn", "did you mean --json?"),
    "not an integer": (["distill", "--epochs", "abc"], "'--epochs'", "kd distill --help"),
    "not a number": (["train", "resnet8", "--lr", "fast"], "'--lr'", "kd train --help"),
    "misspelt command": (["distil"], "no such command 'distil'", "'distill'"),
    "missing argument": (["eval"], "missing argument", "kd eval --help"),
}


@pytest.mark.parametrize("row", USAGE_ROWS)
def test_usage_errors_are_in_kd_form(kd, row):
    args, error, hint = USAGE_ROWS[row]
    result = kd(*args)
    assert_clean_error(result, error)
    assert "╭" not in result.stderr and "Usage:" not in result.stderr  # no Typer box
    assert hint in next(line for line in result.stderr.splitlines() if line.startswith("hint: "))


def test_bad_input_is_refused_before_torch_is_imported(tmp_path):
    """Typos and bad values answer at once: flags, presets and a resumed config.toml are checked before
    torch, torchvision and timm are imported (a fresh interpreter, each case through the entry point)."""
    _preset(tmp_path, "epochs = true\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("epochs = 2.5\n")
    cases = [
        ["train", "resnet8", "--epochs", "0"], ["train", "resnet8", "--lr", "inf"], ["train", "resnet8", "--seed", str(2**64)],
        ["train", "resnet8", "--preset", str(tmp_path / "bad.toml")], ["distill", "--epoch", "3"],
        ["distill", "--epochs", "abc"], ["train", "--resume", str(run)], ["eval", "x.safetensors", "--workers", "-1"],
        ["compare", "--epochs", "0"], ["list", "nothing"],
    ]
    child = f"""
import json, sys
from kdcli.cli import main
codes = []
for args in {cases!r}:
    sys.argv = ["kd", *args]
    try:
        main()
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({{"codes": codes, "heavy": [m for m in ("torch", "torchvision", "timm") if m in sys.modules]}}))
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["codes"] == [2] * len(cases), done.stderr
    assert report["heavy"] == [], done.stderr
    assert done.stderr.count("error: ") == len(cases) and "Traceback" not in done.stderr
