"""The run folder (public layout): config.toml, metrics.jsonl, summary.json, weights, checkpoints/."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from kdcli.engine.checkpoint import atomic_write
from kdcli.errors import KdError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.toml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"
        self.last = self.checkpoints / "last.safetensors"
        self.best = self.checkpoints / "best.safetensors"

    def create(self, config_text: str, overwrite: bool = False) -> None:
        """Make a fresh run folder; refuse to mix two runs in one folder unless told to overwrite."""
        if self.path.exists() and not self.path.is_dir():
            raise KdError(f"--out {self.path} is a file", "pass a folder path with --out")
        if self.config.exists() and not overwrite:
            raise KdError(
                f"{self.path} already holds a run",
                f"continue it with --resume {self.path}, pass --overwrite to replace it, or choose another --out",
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".kd-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise KdError(f"cannot write to {self.path} ({exc.strerror})", "choose a writable --out folder") from None
        if overwrite:
            for stale in (self.metrics, self.summary, self.checkpoints):
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
        atomic_write(self.config, lambda tmp: Path(tmp).write_text(config_text))

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        lines = []
        for text in self.metrics.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: everything after it is stale too
        return lines

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop lines written after the checkpoint we resume from (a kill between the two writes)."""
        kept = [line for line in self.read_metrics() if line["epoch"] <= last_epoch]
        text = "".join(json.dumps(line) + "\n" for line in kept)
        atomic_write(self.metrics, lambda tmp: Path(tmp).write_text(text))

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(self.summary, lambda tmp: Path(tmp).write_text(text))
