"""The run folder (public layout): config.toml, metrics.jsonl, summary.json, weights, checkpoints/."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from kdcli.engine.checkpoint import atomic_write
from kdcli.errors import KdError


LOCK_NAME = ".kd.lock"
# What kd writes in a run folder (and so what --overwrite may remove); checkpoints/ holds only CHECKPOINT_FILES.
RUN_FILES = (
    "config.toml", "metrics.jsonl", "summary.json", "summary.csv", "student.safetensors", "model.safetensors",
    "student_ema.safetensors", "model_ema.safetensors", LOCK_NAME,
)
# Folders the loggers own (--log tensorboard, --log wandb), replaced whole by --overwrite.
LOG_FOLDERS = ("tensorboard", "wandb")
CHECKPOINT_FILES = ("last.safetensors", "best.safetensors")


def _leftover(name: str) -> bool:
    """A temporary file of `atomic_write` left by a kill (`.NAME.XXXX.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp")


class RunDir:
    """One run's folder. One writer at a time: `lock()` holds an exclusive flock on `.kd.lock` for the
    life of the run (the kernel drops it when the process ends, however it ends)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.toml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"
        self.last = self.checkpoints / "last.safetensors"
        self.best = self.checkpoints / "best.safetensors"
        self._lock: int | None = None

    def create(self, config_text: str, overwrite: bool = False) -> None:
        """Make a fresh run folder and lock it; refuse to mix two runs in one folder unless told to
        overwrite, and overwrite only a folder that holds nothing but what kd writes."""
        if self.path.exists() and not self.path.is_dir():
            raise KdError(f"--out {self.path} is a file", "pass a folder path with --out")
        holds_run = self.config.exists()
        if holds_run and not overwrite:
            raise KdError(
                f"{self.path} already holds a run",
                f"continue it with --resume {self.path}, pass --overwrite to replace it, or choose another --out",
            )
        if not holds_run and not overwrite and self._kd_files():
            parts = ", ".join(p.name for p in self._kd_files())
            raise KdError(
                f"{self.path} holds parts of a run ({parts}) but no config.toml",
                "pass --overwrite to replace them, or choose another --out",
            )
        foreign = self.foreign_files()
        if foreign and (overwrite or self._kd_files()):
            shown = ", ".join(str(p.relative_to(self.path)) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise KdError(
                f"--out {self.path} holds files kd did not write ({shown}); kd will not "
                f"{'delete or mix with' if overwrite else 'mix a run with'} them",
                "choose an empty or new --out folder, or move those files away first",
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".kd-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise KdError(f"cannot write to {self.path} ({exc.strerror})", "choose a writable --out folder") from None
        self.lock()
        if overwrite:
            for stale in self._kd_files():
                if stale.name == LOCK_NAME:
                    continue
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
        atomic_write(self.config, lambda tmp: Path(tmp).write_text(config_text))

    def _kd_files(self) -> list[Path]:
        """The files and folders of a run present here (what --overwrite replaces)."""
        owned = (*(self.path / n for n in (*RUN_FILES, *LOG_FOLDERS)), self.checkpoints)
        return [p for p in owned if p.exists() and p.name != LOCK_NAME]

    def foreign_files(self) -> list[Path]:
        """Everything in the folder that kd does not write; a config.toml that is no kd config counts too."""
        if not self.path.is_dir():
            return []
        owned = (*RUN_FILES, *LOG_FOLDERS, "checkpoints")
        foreign = [p for p in sorted(self.path.iterdir()) if p.name not in owned and not _leftover(p.name)]
        if self.checkpoints.exists():
            inside = sorted(self.checkpoints.iterdir()) if self.checkpoints.is_dir() else [self.checkpoints]
            foreign += [p for p in inside if p.name not in CHECKPOINT_FILES and not _leftover(p.name)]
        if self.config.is_file() and not _is_kd_config(self.config):
            foreign.append(self.config)
        return foreign

    def lock(self) -> None:
        """Take the run folder's exclusive lock, or refuse: another kd process is writing this run."""
        if self._lock is not None:
            return
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except (FileNotFoundError, NotADirectoryError):
            raise KdError(f"{self.path} is not a kd run folder", "pass the --out folder of an earlier run") from None
        except OSError as exc:
            raise KdError(f"cannot write to {self.path} ({exc.strerror})", "choose a writable --out folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise KdError(
                f"another kd process is running the run in {self.path}",
                "wait for it to finish (or stop it), then `--resume` this folder; one run folder has one writer",
            ) from None
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        lines = []
        for raw in self.metrics.read_bytes().splitlines():
            try:
                lines.append(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                break  # a line cut short by a kill (or damaged): everything after it is stale too
        return lines

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop lines written after the checkpoint we resume from (a kill between the two writes)."""
        kept = [line for line in self.read_metrics() if line["epoch"] <= last_epoch]
        text = "".join(json.dumps(line) + "\n" for line in kept)
        atomic_write(self.metrics, lambda tmp: Path(tmp).write_text(text))

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(self.summary, lambda tmp: Path(tmp).write_text(text))


def _is_kd_config(path: Path) -> bool:
    """Whether `path` reads as a kd config.toml (another tool's config.toml is not kd's to delete)."""
    from kdcli.config import read_config_file

    try:
        return "command" in read_config_file(path)
    except KdError:
        return False
