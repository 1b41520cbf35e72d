"""What a person sees: Rich progress on stderr, result tables on stdout."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


class ConsoleReporter:
    """Per-step progress bar in a terminal, plus one line per epoch (the only output in a log file)."""

    def __init__(self, title: str, console: Console = stderr):
        self.title = escape(title)  # "[kd]" in "resnet56 -> resnet20 [kd]" is text, not Rich markup
        self.console = console
        self.progress: Progress | None = None
        self.task = None
        self.epochs = 0

    def start(self, epochs: int, steps: int, first_epoch: int) -> None:
        self.epochs = epochs
        if first_epoch > epochs:
            self.console.print(f"[bold]{self.title}[/]: all {epochs} epochs already done")
            return
        resumed = f", resumed at epoch {first_epoch}" if first_epoch > 1 else ""
        self.console.print(f"[bold]{self.title}[/]: {epochs} epochs x {steps} steps{resumed}")
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=steps, epoch=first_epoch, epochs=epochs, loss="-")

    def step(self, epoch: int, step: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, epoch=epoch, loss=f"{loss:.4f}")

    def epoch_end(self, m: dict[str, Any]) -> None:
        agreement = f"  agree {m['agreement']:.1f}" if "agreement" in m else ""
        self.console.print(
            f"epoch {m['epoch']:>3}/{self.epochs}  lr {m['lr']:.4g}  loss {m['train_loss']:.4f}  "
            f"train {m['train_top1']:.2f}  val {m['val_top1']:.2f} (best {m['best_top1']:.2f}){agreement}  "
            f"{m['images_per_s']:.0f} img/s  {m['epoch_time_s']:.1f}s",
            soft_wrap=True,
        )
        if self.progress is not None:
            self.progress.reset(self.task, completed=0, epoch=min(m["epoch"] + 1, self.epochs))

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class SilentReporter:
    """No output: other ranks of a data-parallel run, and library callers that want none."""

    def start(self, epochs: int, steps: int, first_epoch: int) -> None: ...
    def step(self, epoch: int, step: int, loss: float) -> None: ...
    def epoch_end(self, metrics: dict[str, Any]) -> None: ...
    def note(self, text: str) -> None: ...
    def finish(self) -> None: ...


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_fields(title: str, rows: list[tuple[str, Any]], console: Console = stdout) -> None:
    """A two-column name/value table; rows whose value is None are left out."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in rows:
        if value is not None:
            table.add_row(name, fmt(value))
    console.print(table)


def print_summary(summary: dict[str, Any], console: Console = stdout) -> None:
    """The table at the end of `kd train` / `kd distill`."""
    rows = [
        ("teacher", summary.get("teacher")),
        ("student", summary.get("student")),
        ("method", summary.get("method")),
        ("data", summary.get("data")),
        ("epochs", summary.get("epochs")),
        ("top-1 last / best (%)", f"{fmt(summary['top1'])} / {fmt(summary['best_top1'])} (epoch {summary['best_epoch']})"),
        ("top-5 last (%)", summary["top5"]),
        ("teacher top-1 (%)", summary.get("teacher_top1")),
        ("teacher agreement (%)", summary.get("agreement")),
        ("student params", f"{summary['student_params']:,}"),
        ("method params", f"{summary['method_params']:,}"),
        ("time / epoch (s)", summary.get("time_per_epoch_s")),
        ("train images/s", fmt(summary.get("images_per_s"), 0)),
        ("weights", summary.get("weights")),
    ]
    print_fields(f"kd {summary['command']}: {summary['run_dir']}", rows, console)


def print_json(payload: dict[str, Any]) -> None:
    """Exactly one JSON object on stdout (for scripts)."""
    print(json.dumps(payload, indent=2, default=str))


def print_rows(title: str, columns: list[str], rows: list[list[Any]], console: Console = stdout) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)
