"""Shared fixtures: an isolated teacher store, a `kd` runner that goes through the real entry point."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kdcli.cli import main

# Tiny, fast, learnable data for end-to-end tests.
TINY_DATA = "synthetic:classes=4,n=160,size=16"

# metrics.jsonl fields that measure the machine, not the training: excluded when runs are compared.
MEASURED_FIELDS = {"epoch_time_s", "images_per_s", "peak_memory_mb"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Every test gets its own teacher store and never touches ~/.cache; 1 thread keeps CPU tests fair."""
    monkeypatch.setenv("KD_HOME", str(tmp_path_factory.mktemp("kd_home")))
    torch.set_num_threads(1)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def exit_code(exc: SystemExit) -> int:
    """The process exit status a SystemExit stands for (None: 0, a message: 1)."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


@pytest.fixture
def kd(capsys, monkeypatch):
    """Run `kd ARGS...` in-process through kdcli.cli.main (error handling and exit codes included)."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["kd", *map(str, args)])
        code = 0
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            main()
        except SystemExit as exc:
            code = exit_code(exc)
        finally:
            for sig, handler in handlers.items():  # a stopped run leaves signals ignored, as a process on its way out
                signal.signal(sig, handler)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


class _Payload:
    """Unpickling this runs Path.write_text: a stand-in for a checkpoint that carries code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def write_malicious_pth(folder: Path) -> tuple[Path, Path]:
    """A RepDistiller-looking `.pth` whose unpickling would create a marker file: (checkpoint, marker)."""
    import pickle

    evil = folder / "resnet8_vanilla" / "ckpt.pth"
    evil.parent.mkdir(parents=True)
    marker = folder / "payload-ran"
    with open(evil, "wb") as handle:
        pickle.dump({"model": _Payload(str(marker))}, handle)
    return evil, marker


def assert_clean_error(result: Result, *fragments: str) -> None:
    """A user-facing failure: exit 2, one `error:` line naming the problem, a hint, no traceback."""
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert any(line.startswith("hint: ") for line in lines), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


DIGITS_TEACHER_ARCH = "resnet20"


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> str:
    """A resnet20 trained on the bundled digits for a few epochs, once per test session: weights path."""
    from kdcli import api
    from kdcli.config import build_config

    out = tmp_path_factory.mktemp("digits_teacher")
    torch.set_num_threads(1)
    # Session fixtures run before the per-test store exists: give this one its own, never ~/.cache.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KD_HOME", str(tmp_path_factory.mktemp("digits_teacher_home")))
        summary = api.run(build_config({
            "command": "train", "student": DIGITS_TEACHER_ARCH, "method": "none", "data": "digits",
            "epochs": 4, "batch_size": 64, "lr": 0.05, "device": "cpu", "seed": 0, "out": str(out),
        }), reporter=_Silent())
    assert summary["top1"] > 60, summary  # a real teacher: far above the 10 % of chance
    return summary["weights"]


class _Silent:
    def start(self, *args): ...
    def step(self, *args): ...
    def epoch_end(self, metrics): ...
    def finish(self): ...


class Crash(Exception):
    """What CrashAfterFirstEpoch raises: a run that dies right after its first epoch was saved."""


class CrashAfterFirstEpoch(_Silent):
    def epoch_end(self, metrics):
        raise Crash


# Top-1 (%) a short digits run must beat to count as having learned: chance is 10 %, and the
# 3-epoch runs below reach 60-75 % with every method (1-epoch runs are too noisy to judge: BatchNorm
# running statistics lag the weights after ~20 steps at lr 0.05).
LEARNED_TOP1 = 40.0


@pytest.fixture
def distill_digits(digits_teacher, tmp_path):
    """Distill the session's digits teacher into a resnet8 with METHOD for a short real run: summary."""
    from kdcli import api
    from kdcli.config import build_config

    def run(method: str, epochs: int = 3, student: str = "resnet8", lr: float = 0.05, precision: str = "auto", **options) -> dict:
        return api.run(build_config({
            "command": "distill", "teacher": digits_teacher, "student": student, "method": method,
            "options": {k: str(v) for k, v in options.items()}, "data": "digits", "epochs": epochs,
            "batch_size": 32, "lr": lr, "device": "cpu", "seed": 0, "precision": precision,
            "out": str(tmp_path / f"{method}-run"),
        }), reporter=_Silent())

    return run
