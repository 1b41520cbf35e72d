"""The logs people already read: summary.csv (always), TensorBoard and Weights & Biases (`--log`).

`RunLogs` is a reporter (the trainer's `Reporter` protocol), so the trainer does not know it exists:
it hears the loss at the existing log interval (already on the host) and every metric at epoch end,
never inside a step. Scalars are every numeric metric of the epoch's metrics.jsonl line (each loss
term, lr, train/val top-1/top-5, agreement, img/s, EMA and method metrics), tagged `train/ce`,
`val/top1`, ...; the x axis is the number of training batches seen, so that epoch and interval
points share it (W&B needs one increasing step).
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any, Callable

from kdcli.engine.checkpoint import atomic_write
from kdcli.engine.rundir import RunDir
from kdcli.errors import KdError

_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard (or kdcli[tensorboard])"),
             "wandb": ("wandb", "pip install wandb (or kdcli[wandb])")}


def check_loggers(names: list[str]) -> None:
    """Refuse a `--log` whose package is not installed, before the run starts."""
    import importlib.util

    for name in names:
        package, install = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise KdError(f"--log {name} needs the {package} package, which is not installed", install)


def tag(name: str) -> str:
    """metrics.jsonl key -> logger tag: train_ce -> train/ce, val_ema_top1 -> val/ema_top1, lr -> lr."""
    for prefix in ("train_", "val_"):
        if name.startswith(prefix):
            return prefix[:-1] + "/" + name[len(prefix):]
    return name


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {tag(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}


def write_summary_csv(run: RunDir) -> None:
    """summary.csv: one row per epoch of metrics.jsonl (rewritten whole, so a resume never duplicates rows)."""
    rows = run.read_metrics()
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run.path / "summary.csv", lambda tmp: Path(tmp).write_text(text.getvalue()))


class RunLogs:
    """summary.csv and the `--log` writers of one run (rank 0 only)."""

    def __init__(self, run: RunDir, loggers: list[str], config: dict[str, Any], batches_per_epoch: int,
                 lr_at: Callable[[int, int], float]):
        self.run, self.loggers, self.config = run, loggers, config
        self.batches = batches_per_epoch
        self.lr_at = lr_at  # (epoch, 1-based batch) -> the lr that batch trained with
        self.writers: list[Any] = []

    def start(self, epochs: int, steps: int, first_epoch: int) -> None:
        if first_epoch > epochs:
            return
        seen = (first_epoch - 1) * self.batches
        for name in self.loggers:
            self.writers.append(_tensorboard(self.run, seen) if name == "tensorboard" else _wandb(self.run, self.config))

    def step(self, epoch: int, step: int, images: int, loss: float | None = None) -> None:
        if loss is not None and self.writers:
            self._write({"train/loss_interval": loss, "lr_step": self.lr_at(epoch, step)},
                        (epoch - 1) * self.batches + step)

    def epoch_end(self, metrics: dict[str, Any]) -> None:
        write_summary_csv(self.run)
        self._write(scalars(metrics) | {"epoch": float(metrics["epoch"])}, metrics["epoch"] * self.batches)

    def _write(self, values: dict[str, float], step: int) -> None:
        for writer in self.writers:
            writer.write(values, step)

    def finish(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def write(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _tensorboard(run: RunDir, seen: int) -> _TensorBoard:
    from torch.utils.tensorboard import SummaryWriter

    # A resumed run drops the points a killed run wrote after its checkpoint (purge_step).
    return _TensorBoard(SummaryWriter(log_dir=str(run.path / "tensorboard"), purge_step=seen or None))


class _Wandb:
    def __init__(self, session):
        self.session = session

    def write(self, values: dict[str, float], step: int) -> None:
        self.session.log(values, step=step)

    def close(self) -> None:
        self.session.finish()


def _wandb(run: RunDir, config: dict[str, Any]) -> _Wandb:
    """A W&B run tied to the run folder (resumed with it); WANDB_MODE=offline and the other WANDB_* settings apply."""
    import wandb

    run_id = hashlib.sha256(str(run.path.resolve()).encode()).hexdigest()[:16]
    session = wandb.init(project="kdcli", name=run.path.name, id=run_id, resume="allow", dir=str(run.path), config=config)
    return _Wandb(session)


class Tee:
    """Several reporters as one: the console and the logs hear the same events."""

    def __init__(self, *reporters):
        self.reporters = reporters

    def __getattr__(self, name: str):
        targets = [getattr(r, name) for r in self.reporters if hasattr(r, name)]
        if not targets:
            raise AttributeError(name)

        def call(*args, **kwargs):
            for target in targets:
                target(*args, **kwargs)

        return call
