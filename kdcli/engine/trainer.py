"""The one fit loop behind `kd train` and `kd distill`.

The loop knows methods only through the `Method` base class: per batch it runs the frozen teacher
under no_grad, the student, asks the method for its weighted loss terms and minimises their sum with
one optimizer over the student and the method's own trainable parameters. Evaluation, metrics,
checkpoints and progress happen once per epoch. Losses are accumulated on the device and read back
only every `log_every` steps, so the step itself never waits for the host.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdcli import __version__
from kdcli.batch import Batch
from kdcli.engine.checkpoint import load_state, rng_state, save_state, set_rng_state
from kdcli.engine.evaluate import Evaluation, evaluate
from kdcli.engine.rundir import RunDir
from kdcli.engine.schedule import multistep_lr
from kdcli.errors import KdError
from kdcli.methods.base import Method, Needs
from kdcli.models.features import Outputs, forward_outputs


class Reporter(Protocol):
    def start(self, epochs: int, steps: int, first_epoch: int) -> None: ...
    def step(self, epoch: int, step: int, loss: float) -> None: ...
    def epoch_end(self, metrics: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


@dataclass
class Schedule:
    """Optimisation settings the loop needs (a slice of RunConfig)."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    milestones: list[int]
    lr_decay: float
    log_every: int = 20


def run_network(model: nn.Module, batch: Batch, needs: Needs) -> Outputs:
    """The network's Outputs on the batch (and its views, stacked after it).

    Logits only when the method needs nothing more (cheaper). Views run in the same pass when
    `needs.joint_views`, else in their own pass (separate BatchNorm statistics) and are concatenated.
    """
    if batch.views is None:
        return _forward(model, batch.x, needs)
    if needs.joint_views:
        return _forward(model, torch.cat([batch.x, batch.views]), needs)
    plain, views = _forward(model, batch.x, needs), _forward(model, batch.views, needs)
    return Outputs(
        torch.cat([plain.logits, views.logits]),
        [torch.cat(pair) for pair in zip(plain.features, views.features)],
        None if plain.embedding is None else torch.cat([plain.embedding, views.embedding]),
    )


def _forward(model: nn.Module, x: Tensor, needs: Needs) -> Outputs:
    if needs.features or needs.embedding:
        return forward_outputs(model, x, preact=needs.preact)
    return Outputs(model(x), [], None)


class Trainer:
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        method: Method,
        train_loader,
        val_loader,
        schedule: Schedule,
        run: RunDir,
        reporter: Reporter,
        save_weights,
    ):
        self.student = student
        self.teacher = teacher if method.needs.teacher else None
        self.method = method
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.schedule = schedule
        self.run = run
        self.reporter = reporter
        self.save_weights = save_weights  # callable(path, top1): writes the student's weights file
        params = list(student.parameters()) + method.trainable_parameters()
        self.optimizer = torch.optim.SGD(
            params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay
        )
        self.best_top1 = -1.0
        self.best_epoch = 0
        self.teacher_eval: Evaluation | None = None
        if self.teacher is not None:
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        first_epoch = self._restore() + 1 if resume else 1
        if self.teacher is not None:
            self.teacher_eval = evaluate(self.teacher, self.val_loader)
        self.reporter.start(self.schedule.epochs, len(self.train_loader), first_epoch)
        metrics: dict[str, Any] = {}
        try:
            for epoch in range(first_epoch, self.schedule.epochs + 1):
                metrics = self._epoch(epoch)
        finally:
            self.reporter.finish()
        return metrics

    def _epoch(self, epoch: int) -> dict[str, Any]:
        s = self.schedule
        lr = multistep_lr(s.lr, epoch, s.milestones, s.lr_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.method.on_epoch_start(epoch, s.epochs)
        started = time.perf_counter()
        train = self._train_epoch(epoch)
        train_time = time.perf_counter() - started
        val = evaluate(self.student, self.val_loader)
        if val.top1 > self.best_top1:
            self.best_top1, self.best_epoch = val.top1, epoch
            self.save_weights(self.run.best, val.top1)
        metrics = {
            "epoch": epoch,
            "lr": lr,
            **train,
            **self.method.epoch_metrics(),
            "val_top1": val.top1,
            "val_top5": val.top5,
            "val_loss": val.loss,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "epoch_time_s": time.perf_counter() - started,
            "images_per_s": train["train_samples"] / train_time if train_time > 0 else 0.0,
        }
        if self.teacher_eval is not None:
            metrics["agreement"] = val.agreement(self.teacher_eval.predictions)
        self.run.append_metrics(metrics)
        self._save_checkpoint(epoch)
        self.reporter.epoch_end(metrics)
        return metrics

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        self.student.train()
        self.method.train()
        self.train_loader.set_epoch(epoch)
        steps = len(self.train_loader)
        sums: dict[str, Tensor] = {}
        window: dict[str, Tensor] = {}
        correct = None
        samples = 0
        for step, batch in enumerate(self.train_loader, start=1):
            terms, logits = self._step(batch)
            for name, value in terms.items():
                value = value.detach().float()
                sums[name] = sums[name] + value if name in sums else value
                window[name] = window[name] + value if name in window else value
            hits = (logits.detach().argmax(dim=1) == batch.y).sum()
            correct = hits if correct is None else correct + hits
            samples += batch.y.numel()
            if step % self.schedule.log_every == 0 or step == steps:
                host = {name: value.item() for name, value in window.items()}
                if not all(math.isfinite(v) for v in host.values()):
                    self._diverged(epoch, step, host)
                self.reporter.step(epoch, step, sum(host.values()) / max(1, self._window_len(step)))
                window = {}
        means = {f"train_{name}": value.item() / steps for name, value in sums.items()}
        return {
            "train_loss": sum(means.values()),
            **means,
            "train_top1": 100.0 * correct.item() / samples if samples else 0.0,
            "train_samples": samples,
        }

    def _window_len(self, step: int) -> int:
        every = self.schedule.log_every
        return step % every or every

    def _step(self, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
        needs = self.method.needs
        t_out = None
        if self.teacher is not None:
            with torch.no_grad():
                t_out = run_network(self.teacher, batch, needs)
        s_out = run_network(self.student, batch, needs)
        terms = self.method(s_out, t_out, batch)
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return terms, s_out.logits[: batch.y.numel()]

    def _diverged(self, epoch: int, step: int, terms: dict[str, float]) -> None:
        described = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
        raise KdError(
            f"training diverged: the loss became non-finite by step {step} of epoch {epoch} ({described})",
            f"lower --lr or the method's weights (--set ...); the last good checkpoint is kept in {self.run.checkpoints}",
            exit_code=1,
        )

    # ---- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self, epoch: int) -> None:
        state = {
            "kdcli_version": __version__,
            "epoch": epoch,
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method_optimizers": {k: o.state_dict() for k, o in self.method.own_optimizers().items()},
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "rng": rng_state(),
        }
        save_state(self.run.last, state)

    def _restore(self) -> int:
        """Load the last checkpoint; returns the epoch it completed."""
        if not self.run.last.exists():
            raise KdError(f"{self.run.path} has no checkpoint to resume from", "start a fresh run instead of --resume")
        state = load_state(self.run.last)
        if state.get("kdcli_version") != __version__:
            raise KdError(
                f"{self.run.path} was written by kd {state.get('kdcli_version')}, this is kd {__version__}",
                "resume it with the kd version that started it, or start a fresh run",
            )
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, optimizer in self.method.own_optimizers().items():
            optimizer.load_state_dict(state["method_optimizers"][name])
        self.best_top1, self.best_epoch = state["best_top1"], state["best_epoch"]
        set_rng_state(state["rng"])
        self.run.truncate_metrics(state["epoch"])
        return int(state["epoch"])
