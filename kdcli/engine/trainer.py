"""The one fit loop behind `kd train` and `kd distill`.

The loop knows methods only through the `Method` base class: per batch it runs the frozen teacher
in inference mode, the student, asks the method for its weighted loss terms and minimises their sum with
one optimizer over the student and the method's own trainable parameters (kdcli.engine.optim: the
optimizer by name, and the gradient step with accumulation, clipping, the per-step lr and the EMA
update). Evaluation, metrics, checkpoints and progress happen once per epoch. Losses are accumulated on the device and read back
only every `log_every` steps, so the step itself never waits for the host.

Backend switches (TF32, cudnn.benchmark, --deterministic) hold for the duration of `fit`
(engine.backend). With --compile, compiled graphs see one batch shape; the ragged last batch runs
the uncompiled modules (engine.capture). Under bf16 the step's teacher is a bf16 copy of it.

Under torchrun the student (and the method's trainable heads) run in DistributedDataParallel,
each rank trains on its share of every global batch, training sums are all-reduced, evaluation runs
on every rank's identical model, and only rank 0 writes files.

A SIGINT/SIGTERM stops the loop after the current step with a mid-epoch checkpoint; resuming
replays the rest of that epoch exactly (the loader's order is a function of seed and epoch; every
rank's RNG streams, running sums and method running state are in the checkpoint, engine.resume_state).
Under DDP the ranks agree on stopping at log steps and at the end of an epoch.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdcli import __version__
from kdcli.batch import Batch
from kdcli.engine import backend, capture, distributed, resume_state
from kdcli.engine.checkpoint import load_resume_state, restoring, save_state
from kdcli.engine.evaluate import Evaluation, evaluate
from kdcli.engine.memory import peak_memory_mb, reset_peak_memory
from kdcli.engine.precision import autocast, classifier_in_fp32, frozen_bf16_copy
from kdcli.engine.resume_state import EpochSums
from kdcli.engine.rundir import RunDir
from kdcli.engine.ema import ModelEma
from kdcli.engine.optim import GradientStep, OptimizerSettings, build_optimizer
from kdcli.engine.schedule import LrSchedule
from kdcli.engine.signals import StopRequest
from kdcli.engine.dot import optimize
from kdcli.engine.image_edits import edited_images
from kdcli.engine.stages import Stages
from kdcli.engine.teacher_pass import teacher_mode, teacher_needs
from kdcli.errors import KdError
from kdcli.methods.base import Method, Needs
from kdcli.models.features import Outputs, forward_outputs
from kdcli.models.pooling import make_pooling_deterministic


class Reporter(Protocol):
    def start(self, epochs: int, steps: int, first_epoch: int) -> None: ...
    def step(self, epoch: int, step: int, images: int, loss: float | None = None) -> None: ...
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
    optimizer: str = "sgd"  # sgd | adamw | dot (kdcli.engine.optim)
    dot_delta: float = 0.075
    schedule: str = "multistep"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    step_size: int = 30
    clip_grad: float | None = None
    accumulate: int = 1
    ema: float | None = None

    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(self.optimizer, self.lr, self.momentum, self.weight_decay, dot_delta=self.dot_delta)

    def lr_schedule(self, batches_per_epoch: int) -> LrSchedule:
        return LrSchedule(
            self.schedule, self.lr, self.epochs, GradientStep.steps_per_epoch(batches_per_epoch, self.accumulate),
            self.milestones, self.lr_decay, self.step_size, self.warmup_epochs, self.min_lr,
        )


class Stopped(KdError):
    """The run stopped on a signal after writing a resumable checkpoint (exit code 130)."""


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


def _as_normal_tensors(out: Outputs) -> Outputs:
    """Copies of inference-mode outputs that autograd may save (a loss such as MSE against a teacher
    feature keeps that tensor for backward, which an inference tensor cannot be)."""
    return Outputs(
        out.logits.clone(),
        [f.clone() for f in out.features],
        None if out.embedding is None else out.embedding.clone(),
    )


def _forward(model: nn.Module, x: Tensor, needs: Needs) -> Outputs:
    if needs.features or needs.embedding:
        return forward_outputs(model, x, preact=needs.preact)
    return Outputs(model(x), [], None)


def config_fingerprint(config_text: str) -> str:
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


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
        device: torch.device = torch.device("cpu"),
        precision: str = "fp32",
        fingerprint: str = "",
        compile: bool = False,
        deterministic: bool = False,
        resume_command: str = "kd distill",
        world: distributed.World = distributed.World(),
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
        self.device = device
        self.precision = precision
        self.fingerprint = fingerprint  # of config.toml: a resume must continue the same run
        self.resume_command = resume_command
        self.world = world
        self.deterministic = deterministic
        if deterministic:
            make_pooling_deterministic(student)  # before DDP and compile see the student
        if self.teacher is not None:
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        if precision == "bf16":
            for model in (student, self.teacher):
                if model is not None:
                    classifier_in_fp32(model)
        # Compiled graphs run the forward passes; the plain modules own the weights that are saved.
        # Evaluation uses the unwrapped student: a DDP forward would wait for the other ranks.
        # `*_eager` run the ragged last batch, so compiled graphs keep one shape (engine.capture).
        self.student_eager = distributed.wrap(student, world, device)
        own = [p for o in method.own_optimizers().values() for group in o.param_groups for p in group["params"]]
        self.method_fn = distributed.wrap(method, world, device, heads=True, stepped_apart=own)
        # The step's teacher: under bf16 a copy with bf16 weights (cast once, not by autocast every step).
        stepped = frozen_bf16_copy(self.teacher) if precision == "bf16" and self.teacher is not None else self.teacher
        self.teacher_eager = stepped
        self.rows = capture.rows_of(train_loader)
        if compile:
            self.student_fn = capture.compiled(self.student_eager, device)
            self.eval_fn = capture.compiled(capture.StudentEval(student), device)
            self.teacher_fn = None if stepped is None else capture.compiled(capture.TeacherStep(stepped), device)
        else:
            self.student_fn, self.eval_fn, self.teacher_fn = self.student_eager, student, stepped
        # One optimizer and schedule for the student and the method's heads (kdcli.engine.optim).
        self.optimizer = build_optimizer(schedule.optimizer_settings(), student, method.trainable_parameters(), device)
        self.lr_schedule = schedule.lr_schedule(len(train_loader))
        self.ema = ModelEma(student, schedule.ema) if schedule.ema else None
        self.gradient_step = GradientStep(
            self.optimizer, self.lr_schedule, schedule.accumulate, schedule.clip_grad,
            after_step=(lambda: self.ema.update(self.student)) if self.ema is not None else None,
        )
        # init stage (if any), then main
        self.stages = Stages(method, student, schedule, self.optimizer, wrapped=(self.student_eager, self.method_fn))  # the DDP modules themselves
        self.active_optimizer = self.optimizer
        self.best_top1 = -1.0
        self.best_epoch = 0
        self.teacher_eval: Evaluation | None = None
        self.stop = StopRequest(self._note_stop)

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        with backend.run_backend(self.precision, self.deterministic):
            try:
                return self._fit(resume)
            except RuntimeError as exc:
                if self.deterministic and backend.NO_DETERMINISTIC_KERNEL in str(exc):
                    raise backend.no_deterministic_kernel(exc) from None
                raise

    def _fit(self, resume: bool) -> dict[str, Any]:
        completed, partial = self._restore() if resume else (0, None)
        if self.teacher is not None:
            self.teacher_eval = evaluate(self.teacher, self.val_loader)  # fp32, as kd eval measures it
        metrics: dict[str, Any] = {}
        try:
            with self.stop:  # before the header line: once it is printed, Ctrl-C saves a checkpoint
                self.reporter.start(self.stages.total, len(self.train_loader), completed + 1)
                for epoch in range(completed + 1, self.stages.total + 1):
                    metrics = self._epoch(epoch, partial)
                    partial = None
                    # A stop that came with the epoch's last steps (or, under DDP, after its last log step)
                    if epoch < self.stages.total and self._stop_agreed(True):
                        raise self._stopped(f"interrupted after epoch {epoch}")
        finally:
            self.reporter.finish()
        return metrics

    def _epoch(self, epoch: int, partial: resume_state.Restored | None) -> dict[str, Any]:
        stage, lr, self.active_optimizer = self.stages.begin(epoch)
        if partial is not None and partial.method is not None:
            self.method.load_running_state(partial.method)
        if stage.name == "main":
            lr = self.lr_schedule.epoch_lr(stage.epoch)  # the lr of the epoch's first step (GradientStep sets every step's)
        started = time.perf_counter()
        reset_peak_memory(self.device)  # the epoch's own peak: not the teacher's evaluation, not earlier runs
        sums = partial.sums if partial is not None else EpochSums()
        with edited_images(self.train_loader, self.stages.image_edits(stage)):
            train = self._train_epoch(epoch, sums)
        val = evaluate(self.eval_fn, self.val_loader, ragged=self.student)
        if stage.name == "main" and val.top1 > self.best_top1:
            self.best_top1, self.best_epoch = val.top1, epoch
            if self.world.is_main:
                self.save_weights(self.run.best, val.top1)
        metrics = {
            "epoch": epoch,
            **self.stages.marks(stage),
            "lr": lr,
            **train,
            **self.method.epoch_metrics(),
            "val_top1": val.top1,
            "val_top5": val.top5,
            "val_loss": val.loss,
            **self._ema_metrics(),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "epoch_time_s": time.perf_counter() - started,
            "images_per_s": train["train_samples"] / sums.seconds if sums.seconds > 0 else 0.0,
        }
        if self.teacher_eval is not None:
            metrics["agreement"] = val.agreement(self.teacher_eval.predictions)
        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
        if self.world.is_main:
            self.run.append_metrics(metrics)
        self._save_checkpoint(epoch)
        self.reporter.epoch_end(metrics)
        return metrics

    def _train_epoch(self, epoch: int, sums: EpochSums) -> dict[str, Any]:
        self.student.train(self.stages.student_trains)
        self.method.train()
        self.train_loader.set_epoch(epoch, start=sums.steps)
        total = sums.steps + len(self.train_loader)
        window: dict[str, Tensor] = {}
        window_steps = 0
        started = time.perf_counter()
        for step, batch in enumerate(self.train_loader, start=sums.steps + 1):
            terms, logits = self._step(batch, epoch, step, total)
            top1, top5 = _correct(logits.detach(), batch.y)
            sums.add(terms, top1, batch.y.numel(), top5)
            for name, value in terms.items():
                window[name] = window[name] + value.detach().float() if name in window else value.detach().float()
            window_steps += 1
            logging = step % self.schedule.log_every == 0 or step == total
            loss = None
            if logging:
                host = {name: value / self.world.size for name, value in _to_host(self._reduced(window)).items()}
                if not all(math.isfinite(v) for v in host.values()):
                    self._diverged(epoch, step, host)
                loss = sum(host.values()) / window_steps
                window, window_steps = {}, 0
            self.reporter.step(epoch, step, batch.y.numel() * self.world.size, loss)
            # One process stops at any step; ranks agree on stopping at a log step, where they sync anyway.
            stop = self._stop_agreed(logging)
            if stop and step < total and self.gradient_step.boundary(step, total):  # never inside an accumulation
                unchecked = _to_host(self._reduced(window))  # steps since the last log (all ranks: they stop alike)
                if not all(math.isfinite(v) for v in unchecked.values()):
                    self._diverged(epoch, step, unchecked)  # never checkpoint a diverged state
                sums.seconds += time.perf_counter() - started
                self._save_checkpoint(epoch - 1, stopped=(epoch, sums))
                raise self._stopped(f"interrupted at step {step}/{total} of epoch {epoch}")
        sums.seconds += time.perf_counter() - started
        size = self.world.size
        means = {f"train_{name}": value.item() / (sums.steps * size) for name, value in self._reduced(sums.terms).items()}
        counts = self._reduced({"c": sums.correct.float(), "c5": sums.correct5.float(),
                                "n": torch.tensor(float(sums.samples), device=self.device)})
        samples = int(counts["n"].item())
        return {
            "train_loss": sum(means.values()),
            **means,
            "train_top1": 100.0 * counts["c"].item() / samples if samples else 0.0,
            "train_top5": 100.0 * counts["c5"].item() / samples if samples else 0.0,
            "train_samples": samples,
        }

    def _stop_agreed(self, sync_point: bool) -> bool:
        """Whether to stop now: on a signal to this process, or under DDP, at a sync point, to any rank."""
        if not self.world.enabled:
            return self.stop.requested
        return sync_point and distributed.any_rank(self.stop.requested, self.device)

    def _stopped(self, where: str) -> Stopped:
        return Stopped(f"{where}; a resumable checkpoint is saved",
                       f"resume with: {self.resume_command} --resume {self.run.path}", exit_code=130)

    def _reduced(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sums over ranks, in one collective (values unchanged in a single process)."""
        if not self.world.enabled or not values:
            return values
        names = sorted(values)
        total = distributed.all_reduce_sum(torch.stack([values[n].float().reshape(()) for n in names]))
        return dict(zip(names, total))

    def _step(self, batch: Batch, epoch: int = 1, step: int = 1, total: int = 1) -> tuple[dict[str, Tensor], Tensor]:
        """One training step; (loss terms, logits). The defaults (a first step) serve harnesses that time steps alone."""
        needs = self.method.needs
        full = self.rows is None or batch.y.numel() == self.rows
        capture.step_begins(self.device, full and self.student_fn is not self.student_eager)
        teacher_fn, student_fn = (self.teacher_fn, self.student_fn) if full else (self.teacher_eager, self.student_eager)
        with autocast(self.device, self.precision):
            t_out = None
            if self.teacher is not None:
                with torch.inference_mode(), teacher_mode(self.teacher_eager, needs):
                    t_out = run_network(teacher_fn, batch, teacher_needs(needs))
                t_out = _as_normal_tensors(t_out)
            s_out = run_network(student_fn, batch, needs)
            terms = self.method_fn(s_out, t_out, batch)
        if self.active_optimizer is self.optimizer:  # main stage: the run's schedule, accumulation, clipping, EMA
            self.gradient_step(terms, self.stages.current.epoch, step, total)
        else:
            optimize(self.active_optimizer, terms)
        return terms, s_out.logits[: batch.y.numel()]

    def _ema_metrics(self) -> dict[str, float]:
        """Validation of the student's weight EMA (`--ema`), beside the raw student's."""
        if self.ema is None:
            return {}
        result = evaluate(self.ema.module, self.val_loader)
        return {"val_ema_top1": result.top1, "val_ema_top5": result.top5, "val_ema_loss": result.loss}

    def _diverged(self, epoch: int, step: int, terms: dict[str, float]) -> None:
        described = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
        raise KdError(
            f"training diverged: the loss became non-finite by step {step} of epoch {epoch} ({described})",
            "lower --lr or the method's weights (--set ...), or train with --precision fp32; "
            + (f"the last good checkpoint is kept in {self.run.checkpoints}" if self.run.last.exists()
               else "it diverged before its first checkpoint, so start it again in a new --out"),
            exit_code=1,
        )

    def _note_stop(self, signal_name: str) -> None:
        note = getattr(self.reporter, "note", None)
        if note is not None:
            note(f"{signal_name}: stopping after the current step and saving a checkpoint (again to stop at once)")

    # ---- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self, completed: int, stopped: tuple[int, EpochSums] | None = None) -> None:
        """State after `completed` whole epochs, plus every rank's running state of the epoch it
        stopped inside (`stopped`: that epoch and this rank's sums)."""
        ranks = resume_state.gathered(self.device, *((stopped[1], self.method.running_state()) if stopped else ()))
        state = {
            "kdcli_version": __version__,
            "config": self.fingerprint,
            "epoch": completed,
            "partial": {"epoch": stopped[0]} if stopped else None,
            "ranks": ranks,
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method_optimizers": {k: o.state_dict() for k, o in self.method.own_optimizers().items()},
            "stages": self.stages.state(),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
        }
        if self.world.is_main:
            save_state(self.run.last, state)

    def _restore(self) -> tuple[int, resume_state.Restored | None]:
        """Load the last checkpoint: (whole epochs completed, running state of a stopped epoch or None)."""
        if not self.run.last.exists():
            # Stopped (e.g. killed) before its first checkpoint: nothing to keep, so start it over.
            note = getattr(self.reporter, "note", None)
            if note is not None:
                note(f"{self.run.path} has no checkpoint yet: starting the run from its first epoch")
            self.run.truncate_metrics(0)
            return 0, None
        state = load_resume_state(self.run.last, self.schedule.epochs)
        if state.get("kdcli_version") != __version__:
            raise KdError(
                f"{self.run.path} was written by kd {state.get('kdcli_version')}, this is kd {__version__}",
                "resume it with the kd version that started it, or start a fresh run",
            )
        if state.get("config") != self.fingerprint:
            raise KdError(
                f"{self.run.config} changed since the run's last checkpoint",
                "restore the original config.toml, or start a new run with --out elsewhere",
            )
        with restoring(self.run.last):
            self.student.load_state_dict(state["student"])
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            for name, optimizer in self.method.own_optimizers().items():
                optimizer.load_state_dict(state["method_optimizers"][name])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["ema"])
            self.stages.load(state.get("stages", {}))
            mid_epoch = state["partial"] is not None
            share = resume_state.restore(state["ranks"], self.world, self.device, mid_epoch)
        if share.saved_world != self.world.size:
            note = getattr(self.reporter, "note", None)
            if note is not None and self.world.is_main:
                note(f"resuming a run checkpointed by {share.saved_world} processes on {self.world.size}: same global "
                     "batches, but batch-norm statistics and random draws differ from an uninterrupted run")
        self.best_top1, self.best_epoch = state["best_top1"], state["best_epoch"]
        self.run.truncate_metrics(state["epoch"])
        return int(state["epoch"]), share if mid_epoch else None


def _to_host(values: dict[str, Tensor]) -> dict[str, float]:
    """Scalar device tensors read back in one transfer (one host sync, not one per loss term)."""
    if not values:
        return {}
    return dict(zip(values, torch.stack([v.float().reshape(()) for v in values.values()]).tolist()))


def _correct(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(top-1 hits, top-5 hits) of a batch, as device tensors."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()
