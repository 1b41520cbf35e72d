"""What a person sees: Rich progress on stderr, result tables on stdout."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# A pipe or a log file has no width: lines there are never wrapped, tables are as wide as their content.
LOG_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    """A console that wraps to the terminal when it is one, and never wraps in a pipe or a file."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console


stderr = make_console(stderr=True)
stdout = make_console()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class ConsoleReporter:
    """A live progress bar in a terminal, plus one line per epoch (the only output in a log file).

    The bar advances every step (the step number and image count are host values: no device sync);
    the loss shown is the mean of the last log interval, refreshed when the trainer reads it.
    """

    def __init__(self, title: str, console: Console = stderr):
        self.title = escape(title)  # "[kd]" in "resnet56 -> resnet20 [kd]" is text, not Rich markup
        self.console = console
        self.progress: Progress | None = None
        self.task = None
        self.epochs = 0
        self.epoch_started = 0.0
        self.images = 0

    def start(self, epochs: int, steps: int, first_epoch: int) -> None:
        self.epochs = epochs
        if first_epoch > epochs:
            self.console.print(f"[bold]{self.title}[/]: all {plural(epochs, 'epoch')} already done", soft_wrap=True)
            return
        resumed = f", resumed at epoch {first_epoch}" if first_epoch > 1 else ""
        self.console.print(
            f"[bold]{self.title}[/]: {plural(epochs, 'epoch')} x {plural(steps, 'step')}{resumed}", soft_wrap=True
        )
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} img/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=steps, **self._fields(first_epoch))
        self._new_epoch()

    def _fields(self, epoch: int, loss: str = "-", rate: str = "-") -> dict[str, Any]:
        # Progress.reset/update replace or merge these: always pass all of them.
        return {"epoch": epoch, "epochs": self.epochs, "loss": loss, "rate": rate}

    def _new_epoch(self) -> None:
        self.epoch_started = time.perf_counter()
        self.images = 0

    def step(self, epoch: int, step: int, images: int, loss: float | None = None) -> None:
        """Step `step` of `epoch` is done, `images` more were seen; `loss` is given at log steps only."""
        self.images += images
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.epoch_started
        fields: dict[str, Any] = {"epoch": epoch, "rate": f"{self.images / elapsed:.0f}" if elapsed > 0 else "-"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        # Redraw at once when the loss changes; between log steps the bar's own 10 Hz refresh shows the step.
        self.progress.update(self.task, completed=step, refresh=loss is not None, **fields)

    def epoch_end(self, m: dict[str, Any]) -> None:
        agreement = f"  agree {m['agreement']:.1f}" if "agreement" in m else ""
        self.console.print(
            f"epoch {m['epoch']:>3}/{self.epochs}  lr {m['lr']:.4g}  loss {m['train_loss']:.4f}  "
            f"train {m['train_top1']:.2f}  val {m['val_top1']:.2f} (best {m['best_top1']:.2f}){agreement}  "
            f"{m['images_per_s']:.0f} img/s  {m['epoch_time_s']:.1f}s",
            soft_wrap=True,
        )
        if self.progress is not None:
            self.progress.reset(self.task, completed=0, **self._fields(min(m["epoch"] + 1, self.epochs)))
        self._new_epoch()

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class SilentReporter:
    """No output: other ranks of a data-parallel run, and library callers that want none."""

    def start(self, epochs: int, steps: int, first_epoch: int) -> None: ...
    def step(self, epoch: int, step: int, images: int, loss: float | None = None) -> None: ...
    def epoch_end(self, metrics: dict[str, Any]) -> None: ...
    def note(self, text: str) -> None: ...
    def finish(self) -> None: ...


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def si(count: int) -> str:
    """1.23 M: a count with an SI prefix."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)


def duration(seconds: float) -> str:
    """12.3s, 4m 05s, 2h 03m: a wall time a person reads at a glance."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


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
        ("wall time", duration(summary["time_s"]) if summary.get("time_s") is not None else None),
        ("time / epoch, median (s)", summary.get("time_per_epoch_s")),
        ("train images/s, median", fmt(summary.get("images_per_s"), 0)),
        ("weights", summary.get("weights")),
    ]
    print_fields(f"kd {summary['command']}: {summary['run_dir']}", rows, console)


def print_json(payload: Any) -> None:
    """Exactly one JSON value on stdout (for scripts)."""
    print(json.dumps(payload, indent=2, default=str))


def print_rows(title: str, columns: list[str], rows: list[list[Any]], console: Console = stdout) -> None:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, no_wrap=i == 0)  # names are never squeezed; other cells may wrap
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)
