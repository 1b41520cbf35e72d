"""The resolved recipe of a run in a few lines, printed at its start so that a log file alone tells what ran."""

from __future__ import annotations

from typing import Any

from kdcli.config import RunConfig


def _num(value: float) -> str:
    return f"{value:g}"


def plural(count: float, noun: str) -> str:
    return f"{_num(count)} {noun}" if count == 1 else f"{_num(count)} {noun}{'es' if noun.endswith('s') else 's'}"


def optimizer_line(config: RunConfig, lr: float) -> str:
    if config.optimizer in ("sgd", "dot"):
        text = f"{config.optimizer} lr {_num(lr)}, momentum {_num(config.momentum)}, weight decay {_num(config.weight_decay)}"
        if config.optimizer == "dot":
            text += f", delta {_num(config.dot_delta)}"
    else:
        text = f"{config.optimizer} lr {_num(lr)}, weight decay {_num(config.weight_decay)} (not on norms and biases)"
    if config.clip_grad is not None:
        text += f", clip grad norm {_num(config.clip_grad)}"
    return text


def schedule_line(config: RunConfig, steps_per_epoch: int) -> str:
    kind = {
        "multistep": f"multistep x{_num(config.lr_decay)} at epochs {'/'.join(map(str, config.milestone_epochs()))}",
        "step": f"step x{_num(config.lr_decay)} every {config.step_size} epochs",
        "cosine": f"cosine to {_num(config.min_lr)} (per step)",
        "constant": "constant",
    }[config.schedule]
    warm = f", linear warm-up {plural(config.warmup_epochs, 'epoch')}" if config.warmup_epochs else ""
    return f"{kind}{warm}; {plural(config.epochs, 'epoch')} x {plural(steps_per_epoch, 'optimizer step')}"


def recipe_rows(
    config: RunConfig, *, train_size: int, val_size: int, num_classes: int, input_size: tuple[int, int],
    lr: float, steps_per_epoch: int, hparams: dict[str, Any], device: str, precision: str, processes: int,
) -> list[tuple[str, str]]:
    """(name, value) lines: data, batch, optimizer, schedule, loss, EMA, hardware, logs."""
    effective = config.batch_size * config.accumulate * processes
    batch = f"{config.batch_size}"
    if config.accumulate > 1 or processes > 1:
        batch += f" x {config.accumulate} accumulated x {plural(processes, 'process')} = {effective} per optimizer step"
    loss = ", ".join(f"{k}={v}" for k, v in hparams.items()) if config.command == "distill" else "cross-entropy"
    if config.label_smoothing:
        loss += f"; label smoothing {_num(config.label_smoothing)}"
    rows = [
        ("data", f"{config.data}: {train_size} train / {val_size} val, {num_classes} classes, "
                 f"{input_size[0]}x{input_size[1]}"),
        ("batch", batch),
        ("optimizer", optimizer_line(config, lr)),
        ("schedule", schedule_line(config, steps_per_epoch)),
        ("method" if config.command == "distill" else "loss", f"{config.method}: {loss}" if config.command == "distill" else loss),
    ]
    if config.ema is not None:
        rows.append(("ema", f"decay {_num(config.ema)} (evaluated and saved beside the student)"))
    rows.append(("device", f"{device}, {precision}, {plural(processes, 'process')}"
                             f"{', compiled' if config.compile else ''}, seed {config.seed}"))
    rows.append(("logs", ", ".join(["metrics.jsonl", "summary.csv", *config.log])))
    return rows
