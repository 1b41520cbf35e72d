"""Training the plan: the runs without a summary, one at a time in this process or N at once in worker
processes (`--jobs N`), each in its own run folder. A failed run is recorded and the others go on;
Ctrl-C stops every run at a checkpoint, and the same command continues them.

The compare package never imports kdcli.api (api calls compare): in this process the caller hands in
a Runner; worker processes run `python -m kdcli.compare_worker`, an entry point like the CLI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdcli.compare.aggregate import changed_options
from kdcli.compare.plan import Job, Plan, run_state
from kdcli.config import to_toml
from kdcli.errors import KdError
from kdcli.report import plural, stderr

WORK = ".kd-compare"  # under the parent folder: each worker's config and log


@dataclass(frozen=True)
class Runner:
    """How a run trains in this process (kdcli.api.run / api.resume, passed in by the api)."""

    train: Callable[[Any, Any], dict]  # (RunConfig, reporter) -> summary
    resume: Callable[[Path, Any], dict]  # (run folder, reporter) -> summary


def execute(plan: Plan, runner: Runner, jobs: int = 1, devices: list[str] | None = None, reporter=None) -> list[dict[str, Any]]:
    """Train every run of the plan that has no summary yet; returns the failed runs ({key, run, error, exit_code}).

    Raises KdError(exit 130) when interrupted, after every running job has saved a checkpoint.
    """
    if jobs < 1:
        raise KdError(f"--jobs {jobs} is invalid", "use 1 or more")
    states = {job.name: run_state(job) for job in plan.jobs}  # settings clashes fail before any training
    todo = [job for job in plan.jobs if states[job.name] != "done"]
    at_once = min(jobs, len(todo)) or 1
    stderr.print(f"kd compare: {plan.description}: {plural(len(plan.jobs), 'run')} in {plan.out}"
                 f" ({len(plan.jobs) - len(todo)} done already)"
                 + (f", {at_once} at a time" if at_once > 1 else ""), markup=False, soft_wrap=True)
    if at_once == 1:
        return _in_process(plan, todo, states, runner, reporter)
    return Pool(plan, todo, states, at_once, placements(todo, devices)).run()


def failure(job: Job, message: str, exit_code: int) -> dict[str, Any]:
    """A failed run, keyed like the table row it belongs to."""
    c = job.config
    key = (c.teacher, c.student, c.method, tuple(changed_options(c.method, c.options).items()), c.data, c.epochs)
    return {"key": key, "run": job.name, "error": message, "exit_code": exit_code}


def _report_failure(job: Job, message: str, hint: str | None) -> None:
    stderr.print(f"error: {job.name}: {message}", markup=False, soft_wrap=True)
    if hint:
        stderr.print(f"hint: {hint}", markup=False, soft_wrap=True)
    stderr.print("kd compare goes on with the other runs", markup=False, soft_wrap=True)


def _in_process(plan: Plan, todo: list[Job], states: dict[str, str], runner: Runner, reporter) -> list[dict[str, Any]]:
    failed = []
    for number, job in enumerate(todo, start=1):
        resuming = states[job.name] == "partial"
        stderr.print(f"[{number}/{len(todo)}] {job.name}{' (resuming)' if resuming else ''}", markup=False, soft_wrap=True)
        try:
            if resuming:
                runner.resume(Path(job.config.out), reporter)
            else:
                runner.train(job.config, reporter)
        except KdError as exc:
            if exc.exit_code == 130:  # stopped by a signal, after saving a checkpoint
                raise KdError(f"{job.name}: {exc.message}", continue_hint(plan), 130) from exc
            _report_failure(job, exc.message, exc.hint)
            failed.append(failure(job, exc.message, exc.exit_code))
        except KeyboardInterrupt:
            raise KdError(f"interrupted during {job.name}", continue_hint(plan), exit_code=130) from None
    return failed


def continue_hint(plan: Plan) -> str:
    return (f"run the same kd compare command with --out {plan.out} to continue: "
            "finished runs are reused and interrupted ones resume from their checkpoints")


def placements(todo: list[Job], devices: list[str] | None) -> list[str | None]:
    """The device slots jobs are spread over: --devices, else every visible GPU for runs that would use
    CUDA, else the runs' own device (None: leave it)."""
    if devices:
        return [d if d in ("cpu", "auto") or d.startswith("cuda") else f"cuda:{d}" for d in devices]
    wants_cuda = any(job.config.device in ("auto", "cuda") for job in todo)
    import torch  # only here: planning and aggregation do not need it

    if wants_cuda and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [None]


def parse_devices(value: str | None) -> list[str] | None:
    """`0,1,2` (GPU indices), `cuda:0,cuda:1` or `cpu`."""
    if value is None:
        return None
    devices = [d.strip() for d in value.split(",") if d.strip()]
    good = all(d == "cpu" or d.isdigit() or (d.startswith("cuda:") and d[5:].isdigit()) for d in devices)
    if not devices or not good:
        raise KdError(f"--devices {value!r} is invalid", "give GPU indices such as --devices 0,1 (or cpu)")
    return devices


class Pool:
    """Up to N worker processes at once, one Rich progress line per running job."""

    def __init__(self, plan: Plan, todo: list[Job], states: dict[str, str], size: int, slots: list[str | None]):
        self.plan, self.todo, self.states, self.size, self.slots = plan, list(todo), states, size, slots
        self.work = plan.out / WORK
        self.running: dict[str, tuple[subprocess.Popen, threading.Thread, str | None]] = {}
        self.errors: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.console: Console = stderr
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}
        self.stopped: list[str] = []
        import torch

        # Every worker computes with the threads a --jobs 1 run would use: PyTorch's CPU kernels are not
        # bitwise equal across thread counts, and --jobs must not change the results (only the schedule).
        self.threads = torch.get_num_threads()

    def run(self) -> list[dict[str, Any]]:
        self.work.mkdir(parents=True, exist_ok=True)
        failed: list[dict[str, Any]] = []
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console,
            )
            self.progress.start()
        queue = list(self.todo)
        interrupted = False
        try:
            while queue or self.running:
                while queue and len(self.running) < self.size:
                    self._start(queue.pop(0))
                name = self._wait_any()
                code = self._finish(name)
                if code == 130:
                    interrupted = True
                    break
                if code:
                    failed.append(self._failure(name, code))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if interrupted:
                self._stop_all()
            if self.progress is not None:
                self.progress.stop()
        if interrupted:
            raise KdError(f"interrupted: {plural(len(queue) + len(self.stopped), 'run')} left to train",
                          continue_hint(self.plan), exit_code=130)
        return failed

    def _start(self, job: Job) -> None:
        slot = self._free_slot()
        config = job.config if slot is None else replace(job.config, device=slot)
        stem = job.name.replace("/", "__")
        spec, log = self.work / f"{stem}.toml", self.work / f"{stem}.log"
        spec.write_text(to_toml(config))
        resuming = self.states[job.name] == "partial"
        command = [sys.executable, "-m", "kdcli.compare_worker", str(spec), "--threads", str(self.threads)]
        if resuming:
            command.append("--resume")
        with self.lock:
            self._say(f"start {job.name}{' (resuming)' if resuming else ''}" + (f" on {slot}" if slot else ""))
            if self.progress is not None:
                self.tasks[job.name] = self.progress.add_task(job.name, total=None, status="starting")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                   start_new_session=True)  # Ctrl-C reaches the pool, which stops each worker once
        reader = threading.Thread(target=self._read, args=(job, process), daemon=True)
        reader.start()
        self.running[job.name] = (process, reader, slot)

    def _free_slot(self) -> str | None:
        used = [slot for _, _, slot in self.running.values()]
        return min(self.slots, key=used.count)

    def _wait_any(self) -> str:
        while True:
            for name, (process, _, _) in self.running.items():
                if process.poll() is not None:
                    return name
            threading.Event().wait(0.2)

    def _finish(self, name: str) -> int:
        process, reader, _ = self.running.pop(name)
        reader.join()
        code = process.wait()
        with self.lock:
            self._say(f"{'done' if code == 0 else 'stopped' if code == 130 else 'FAILED'} {name}")
            if self.progress is not None:
                self.progress.update(self.tasks[name], status="done" if code == 0 else f"exit {code}")
        if code == 130:
            self.stopped.append(name)
        return code

    def _stop_all(self) -> None:
        """SIGINT to every worker (each saves a checkpoint and exits 130), then wait for them."""
        for process, _, _ in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for name in list(self.running):
            process, reader, _ = self.running.pop(name)
            process.wait()
            reader.join()
            self.stopped.append(name)

    def _failure(self, name: str, code: int) -> dict[str, Any]:
        job = next(j for j in self.todo if j.name == name)
        error = self.errors.get(name)
        if error is None:  # the worker died without a word (killed, out of memory): its log says why
            stem = name.replace("/", "__")
            error = {"message": f"worker exited with status {code} (see {self.work / f'{stem}.log'})", "hint": None}
        _report_failure(job, error["message"], error.get("hint"))
        return failure(job, error["message"], code)

    def _read(self, job: Job, process: subprocess.Popen) -> None:
        """One JSON event per line from a worker: reporter calls and a final error, if any."""
        for line in process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self.lock:
                self._show(job.name, event)

    def _show(self, name: str, event: dict[str, Any]) -> None:
        kind = event.get("event")
        task = self.tasks.get(name)
        if kind == "start":
            total = event["epochs"] * event["steps"]
            done = (event["first_epoch"] - 1) * event["steps"]
            if self.progress is not None:
                self.progress.update(task, total=total, completed=done, status=f"epoch {event['first_epoch']}/{event['epochs']}")
        elif kind == "step" and self.progress is not None:
            self.progress.update(task, completed=(event["epoch"] - 1) * event["steps"] + event["step"])
        elif kind == "epoch":
            m = event["metrics"]
            text = f"epoch {m['epoch']}/{event['epochs']} val {m['val_top1']:.2f}"
            if self.progress is not None:
                self.progress.update(task, completed=m["epoch"] * event["steps"], status=text)
            else:
                self._say(f"{name}: {text}")
        elif kind == "note":
            self._say(f"{name}: {event['text']}")
        elif kind == "error":
            self.errors[name] = event

    def _say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)


class EventReporter:
    """The worker side: every reporter call as one JSON line on stdout, for the pool's view."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.epochs = self.steps = 0

    def _emit(self, **event: Any) -> None:
        self.stream.write(json.dumps(event, default=str) + "\n")
        self.stream.flush()

    def start(self, epochs: int, steps: int, first_epoch: int) -> None:
        self.epochs, self.steps = epochs, steps
        self._emit(event="start", epochs=epochs, steps=steps, first_epoch=first_epoch)

    def step(self, epoch: int, step: int, images: int = 0, loss: float | None = None) -> None:
        if step % max(1, self.steps // 20) == 0:  # 20 updates an epoch are plenty for a bar
            self._emit(event="step", epoch=epoch, step=step, steps=self.steps)

    def epoch_end(self, metrics: dict[str, Any]) -> None:
        self._emit(event="epoch", metrics=metrics, epochs=self.epochs, steps=self.steps)

    def note(self, text: str) -> None:
        self._emit(event="note", text=text)

    def finish(self) -> None: ...

    def error(self, message: str, hint: str | None, exit_code: int) -> None:
        self._emit(event="error", message=message, hint=hint, exit_code=exit_code)


def worker_main(argv: list[str], train: Callable, resume: Callable, read_config: Callable) -> int:
    """`python -m kdcli.compare_worker SPEC.toml [--threads N] [--resume]`: train one run of a pool."""
    import torch

    spec = Path(argv[0])
    if "--threads" in argv:
        torch.set_num_threads(int(argv[argv.index("--threads") + 1]))
    reporter = EventReporter()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if "--resume" in argv:
            resume(Path(read_config(spec).out), reporter)
        else:
            train(read_config(spec), reporter)
    except KdError as exc:
        print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        reporter.error(exc.message, exc.hint, exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - reported as this run's failure, the grid goes on
        import traceback

        traceback.print_exc()
        reporter.error(f"internal error: {type(exc).__name__}: {exc}", "see the worker log; report the traceback", 1)
        return 1
    return 0

