"""Library entry points behind the CLI: train(), distill(), resume(), evaluate_checkpoint(), compare()."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from kdcli import __version__, plugins
from kdcli.build import CUSTOM_DATA, Sources, build_method, build_training, canonical, schedule_of, shapes_of  # noqa: F401 (public)
from kdcli.config import RunConfig, check_layer, load_run_config, to_toml
from kdcli.data import DataBundle, FolderSplit, build_data, make_loader
from kdcli.engine.evaluate import evaluate
from kdcli.engine.rundir import RunDir
from kdcli.engine import distributed
from kdcli.engine.precision import resolve_precision
from kdcli.engine.trainer import Trainer, config_fingerprint
from kdcli.errors import KdError, is_disk_full
from kdcli.methods import method_class
from kdcli.methods.base import resolve_hparams
from kdcli.models.registry import pretrained_input
from kdcli.logs import RunLogs, Tee, check_loggers
from kdcli.recipe import recipe_rows
from kdcli.report import ConsoleReporter, SilentReporter
from kdcli.profiling import count_params, profile
from kdcli.teachers import (
    check_free, check_kd_home, find_teacher, input_metadata, is_external, load_network, read_input, read_metadata, register_teacher,
    save_model,
    teacher_digest, teacher_file, teacher_source,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdError(f"--device {name} asked for, but no CUDA device is available", "use --device cpu or auto")
    return torch.device(name)


def run(
    config: RunConfig, overwrite: bool = False, resume: bool = False, reporter=None, sources: Sources = Sources()
) -> dict[str, Any]:
    """Train (`config.command == "train"`) or distill; everything is validated before anything is written.

    `sources` hands over objects (student, teacher, data) in place of the config's names (Python API).
    Under torchrun each process calls this; rank 0 alone writes the run folder.
    """
    config = canonical(config)
    config.validate()
    check_kd_home()
    world = distributed.setup(config.device)
    run_dir = RunDir(config.out or distributed.broadcast_object(str(default_out(config))))
    # The run folder's lock is held from here (a resumed run) or from its creation (a new one) to the end.
    if resume and world.is_main:
        run_dir.lock()  # a second process on the same folder is refused before any work
    try:
        with disk_full_as_error(replace(config, out=str(run_dir.path))):
            return _run(config, world, run_dir, overwrite, resume, reporter, sources)
    finally:
        run_dir.unlock()


def _run(
    config: RunConfig, world, run_dir: RunDir, overwrite: bool, resume: bool, reporter, sources: Sources
) -> dict[str, Any]:
    device = resolve_device(config.device)
    if world.enabled and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if world.enabled and config.optimizer == "dot":
        raise KdError("--optimizer dot runs in one process only (its two backward passes bypass DDP's gradient sync)",
                      "drop --nproc, or use --optimizer sgd")
    cls = method_class(config.method)
    resolve_hparams(cls, config.options)  # reject bad --set values before any slow work
    if sources.student is None:
        check_architecture_name(config.student)
    check_loggers(config.log)
    if config.command == "train" and not resume and storable(config, sources):
        check_free(config.student, config.data, overwrite)  # before hours of training, not after
    bundle = sources.bundle or build_data(config.data, data_dir=config.data_dir, download=config.download, val_split=config.val_split)
    if config.pretrained:
        bundle = with_pretrained_input(bundle, config.student, config.teacher if config.command == "distill" else None)
    wants_teacher = config.command == "distill" and cls.needs.teacher
    teacher = (sources.teacher or load_teacher(config, bundle.num_classes)) if wants_teacher else None
    if teacher is not None and sources.teacher is None:
        config = with_teacher_record(config, resume)
    student, teacher, method, train_loader, val_loader = build_training(
        config, cls, bundle, teacher, device, world, student=sources.student
    )

    config = replace(config, out=str(run_dir.path))
    if teacher is not None and not resume and sources.teacher is None:
        check_out_apart_from_teacher(run_dir, config)
    if not resume and world.is_main:
        run_dir.create(to_toml(config), overwrite=overwrite)  # takes the folder's lock
    distributed.barrier()

    weights_name = "model.safetensors" if config.command == "train" else "student.safetensors"
    metadata = {
        "arch": config.student,
        "num_classes": bundle.num_classes,
        "dataset": config.data,
        "method": config.method if config.command == "distill" else "train",
        "teacher": config.teacher,
        "teacher_sha256": config.teacher_sha256,
        "teacher_source": config.teacher_source,
        "source": f"kd train, run {run_dir.path}" if config.command == "train" else None,
        **input_metadata(bundle.mean, bundle.std, bundle.input_size[0] if isinstance(bundle.val, FolderSplit) else None),
        "input_shape": ",".join(map(str, next(iter(val_loader)).x.shape[1:])),  # what `kd export` traces with
    }

    def save_weights(path: Path, top1: float) -> None:
        save_model(path, student, top1=f"{top1:.4f}", **metadata)

    title = f"{config.teacher} -> {config.student} [{config.method}]" if teacher else f"train {config.student}"
    schedule = schedule_of(config)
    precision = resolve_precision(config.precision, device)
    if world.is_main:
        lr_schedule = schedule.lr_schedule(len(train_loader))
        logs = RunLogs(run_dir, config.log, config.to_dict(), len(train_loader),
                       lambda epoch, batch: lr_schedule.at(lr_schedule.step_of(epoch, (batch - 1) // config.accumulate)))
        reporter = Tee(logs, reporter or ConsoleReporter(title))
        rows = recipe_rows(
            config, train_size=len(bundle.train), val_size=len(bundle.val), num_classes=bundle.num_classes,
            input_size=bundle.input_size, lr=schedule.lr, steps_per_epoch=lr_schedule.steps_per_epoch,
            hparams=method.hp, device=str(device), precision=precision, processes=world.size,
        )
        if hasattr(reporter, "recipe"):
            reporter.recipe(rows)
    else:
        reporter = SilentReporter()
    trainer = Trainer(
        student, teacher, method, train_loader, val_loader, schedule, run_dir,
        reporter, save_weights,
        device=device,
        precision=precision,
        fingerprint=config_fingerprint(run_dir.config.read_text()),
        compile=config.compile,
        deterministic=config.deterministic,
        resume_command=f"kd {config.command}",
        world=world,
    )
    started = time.perf_counter()
    trainer.fit(resume=resume)
    elapsed = time.perf_counter() - started
    if not world.is_main:
        return {"rank": world.rank, "run_dir": str(run_dir.path)}

    history = run_dir.read_metrics()
    if not history:
        raise KdError(
            f"{run_dir.metrics} is empty or missing, but the run's checkpoint says all {config.epochs} epochs are done",
            "the run folder was changed by hand: restore metrics.jsonl, or start the run again with --overwrite",
        )
    last = history[-1]
    save_weights(run_dir.path / weights_name, last["val_top1"])
    ema_weights = run_dir.path / weights_name.replace(".safetensors", "_ema.safetensors")
    if trainer.ema is not None:
        save_model(ema_weights, trainer.ema.module, top1=f"{last['val_ema_top1']:.4f}", **metadata, ema=str(config.ema))
    summary = {
        "command": config.command,
        "run_dir": str(run_dir.path),
        "teacher": config.teacher if teacher is not None else None,
        "teacher_sha256": config.teacher_sha256 if teacher is not None else None,
        "teacher_source": config.teacher_source if teacher is not None else None,
        "student": config.student,
        "method": config.method,
        "data": config.data,
        "num_classes": bundle.num_classes,
        "epochs": config.epochs,
        "seed": config.seed,
        "top1": last["val_top1"],
        "top5": last["val_top5"],
        "best_top1": trainer.best_top1,
        "best_epoch": trainer.best_epoch,
        "teacher_top1": trainer.teacher_eval.top1 if trainer.teacher_eval else None,
        "agreement": last.get("agreement"),
        "student_params": count_params(student),
        "method_params": sum(p.numel() for p in method.trainable_parameters()),
        "time_s": elapsed,
        "time_per_epoch_s": statistics.median(m["epoch_time_s"] for m in history),
        "images_per_s": statistics.median(m["images_per_s"] for m in history),
        "device": str(device),
        "precision": trainer.precision,
        "processes": world.size,
        "peak_memory_mb": max(m["peak_memory_mb"] for m in history),
        "weights": str(run_dir.path / weights_name),
        **({"ema_top1": last["val_ema_top1"], "ema_weights": str(ema_weights)} if trainer.ema is not None else {}),
        "kdcli_version": __version__,
    }
    run_dir.write_summary(summary)
    if config.command == "train" and storable(config, sources):
        summary["registered_as"] = _register_trained(run_dir.path / weights_name, config, overwrite)
    return summary


def storable(config: RunConfig, sources: Sources) -> bool:
    """A trained network goes to the teacher store when names find it again: not objects, not file specs."""
    return sources.student is None and sources.bundle is None and "/" not in config.student


def _register_trained(weights: Path, config: RunConfig, overwrite: bool) -> str | None:
    """The trained network into the teacher store. The start of the run checked that the place was
    free (or --overwrite); a resumed run whose teacher was stored meanwhile keeps the stored one."""
    if find_teacher(config.student, config.data) is not None and not overwrite:
        return None
    return str(register_teacher(weights, config.student, config.data, overwrite=True))


def with_teacher_record(config: RunConfig, resume: bool) -> RunConfig:
    """`config` with the sha256 and source of its teacher's weights; a resumed run must find the
    teacher it started with."""
    digest = teacher_digest(config.teacher, config.data)
    if resume and config.teacher_sha256 and digest != config.teacher_sha256:
        raise KdError(
            f"the teacher {config.teacher} changed since this run started (sha256 {config.teacher_sha256[:12]}..., now "
            f"{(digest or 'none')[:12]}...)",
            "restore the original teacher, or start a new run in another --out",
        )
    return replace(config, teacher_sha256=digest, teacher_source=teacher_source(config.teacher, config.data, config.pretrained))


def resume(run_path: str | Path, reporter=None) -> dict[str, Any]:
    """Continue the run in `run_path` from its last checkpoint, with the config saved there."""
    config = load_run_config(run_path)
    if config.data == CUSTOM_DATA:
        raise KdError(
            f"{config.out} was started from Python with Dataset objects, which the command line cannot rebuild",
            f"resume it from Python: kdcli.{config.command}(..., out={config.out!r}, resume=True) with the same objects",
        )
    return run(config, resume=True, reporter=reporter)


@contextmanager
def disk_full_as_error(config: RunConfig):
    """A full disk while a run writes is the environment, not a bug: say so, where, and how to go on."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        if not is_disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or config.out
        raise KdError(
            f"the disk is full: no space left on the device holding {where}",
            f"free some space, then `kd {config.command} --resume {config.out}` continues from the last checkpoint",
            exit_code=1,
        ) from None


def default_out(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    student = _short(config.student)
    if config.command == "train":
        return Path("runs") / f"{student}-{_slug(config.data)}-{stamp}"
    return Path("runs") / f"{_slug(config.teacher or 'none')}-{student}-{config.method}-{stamp}"


def _short(name: str) -> str:
    """A network's name in a folder name: a plug-in spec by its factory, `pkg.mod:make` -> `make`."""
    return name.rpartition(":")[2] if plugins.is_plugin_spec(name) else name


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(text).stem if text)


def load_teacher(config: RunConfig, num_classes: int) -> nn.Module:
    """`--teacher`: a weights file, a name in the teacher store, or a pretrained timm:/tv: model (see load_network)."""
    if not config.teacher:
        raise KdError("kd distill needs --teacher", "pass a trained model name (see `kd list teachers`) or a checkpoint path")
    model, _ = load_network(
        config.teacher, config.data, num_classes, arch=config.teacher_arch, pretrained=config.pretrained, download=config.download
    )
    return model


def check_architecture_name(name: str) -> None:
    """The student is named by its architecture; a weights file there is a mix-up with --teacher."""
    path = Path(name).expanduser()
    if path.is_file() or path.suffix in (".safetensors", ".pth", ".pt"):
        raise KdError(
            f"{name} is a weights file, but the student must be an architecture name",
            "name the network to train, e.g. --student resnet20 (see `kd list models`); a trained network goes to --teacher",
        )


def check_out_apart_from_teacher(run_dir: RunDir, config: RunConfig) -> None:
    """Refuse an --out folder that holds the teacher's weights: the run would mix with or overwrite them."""
    path = teacher_file(config.teacher, config.data)
    if path is not None and path.resolve().is_relative_to(run_dir.path.resolve()):
        raise KdError(
            f"--out {run_dir.path} holds the teacher's weights {path}",
            "write the run to another folder with --out (the teacher's file would be mixed with or overwritten by the run)",
        )


def with_pretrained_input(bundle: DataBundle, student: str, teacher: str | None = None) -> DataBundle:
    """`bundle` normalised (and, for image folders, sized) as the published weights of the student
    expect, or of the teacher when only the teacher is a timm:/tv: model (`--pretrained`)."""
    name = next((n for n in (student, teacher) if is_external(n)), None)
    if name is None:
        raise KdError(
            "--pretrained applies to timm:NAME and tv:NAME models, and there is none in this run",
            "drop --pretrained (CIFAR-zoo models have no published weights; load trained ones from a checkpoint)",
        )
    expected = pretrained_input(name)
    return bundle if expected is None else _with_input(bundle, expected.mean, expected.std, expected.size)


def _with_input(bundle: DataBundle, mean, std, size: int | None) -> DataBundle:
    """In-memory sets keep their native size (the loaders do not resize); image folders take `size`."""
    folder = isinstance(bundle.val, FolderSplit)
    input_size = (size, size) if size and folder else bundle.input_size
    return replace(bundle, mean=tuple(mean), std=tuple(std), input_size=input_size)


def evaluate_checkpoint(
    checkpoint: str,
    data: str | None = None,
    arch: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    *,
    teacher: str | None = None,
    teacher_arch: str | None = None,
    pretrained: bool = False,
    timing: bool = True,
    workers: int | None = None,
    download: bool = False,
) -> dict[str, Any]:
    """Accuracy, calibration, agreement with a teacher and cost of a network on a dataset's validation split.

    `checkpoint` and `teacher` are resolved as `--teacher` is (`load_network`; `download` fetches
    the dataset and a missing release teacher). The inputs are
    normalised as the network was trained (the mean/std kd records in its weights, the pretrained
    config of a timm/tv model), else with the dataset's; the teacher sees the same inputs.
    Returns top1/top5/ece in percent, nll per sample, agreement in percent, params, macs (one
    image), latency_ms (batch 1) and throughput (images/s at `throughput_batch`) on `device` as medians
    with their interquartile range (`*_iqr`) and number of timed runs (`*_runs`), and the thread count.
    """
    check_layer({"batch_size": batch_size, "workers": workers, "device": device})
    dev = resolve_device(device)
    if not data and checkpoint.endswith(".safetensors") and Path(checkpoint).expanduser().is_file():
        data = read_metadata(Path(checkpoint).expanduser()).get("dataset")
    if not data:
        raise KdError("no dataset to evaluate on", "pass --data (e.g. --data cifar100)")
    bundle = build_data(data, data_dir=data_dir, download=download)
    model, metadata = load_network(checkpoint, data, bundle.num_classes, arch=arch, pretrained=pretrained, download=download)
    trained_on = read_input(metadata, checkpoint)
    if trained_on is not None:
        bundle = _with_input(bundle, *trained_on)
    loader = make_loader(bundle.val, bundle, batch_size, False, dev, 0, workers)
    model.to(dev)
    result = evaluate(model, loader)
    summary: dict[str, Any] = {
        "checkpoint": checkpoint,
        "arch": metadata["arch"],
        "data": data,
        "samples": result.samples,
        "top1": result.top1,
        "top5": result.top5,
        "nll": result.loss,
        "ece": result.ece,
    }
    if teacher:
        teacher_model, teacher_metadata = load_network(
            teacher, data, bundle.num_classes, arch=teacher_arch, pretrained=pretrained, download=download
        )
        reference = evaluate(teacher_model.to(dev), loader)
        summary.update(
            teacher=teacher, teacher_arch=teacher_metadata["arch"], teacher_top1=reference.top1,
            agreement=result.agreement(reference.predictions),
        )
    cost = profile(model, (3, *bundle.input_size), timing=timing)
    summary.update(
        params=cost.params, macs=cost.macs, input_size=[3, *bundle.input_size], device=cost.device,
        threads=cost.threads, precision="fp32", **_timing_fields("latency_ms", cost.latency_ms),
        **_timing_fields("throughput", cost.throughput), throughput_batch=cost.throughput_batch,
    )
    return summary


def _timing_fields(name: str, spread) -> dict[str, Any]:
    """`name` (the median), `name`_iqr ([q1, q3]) and `name`_runs of a timing, or Nones without one."""
    if spread is None:
        return {name: None, f"{name}_iqr": None, f"{name}_runs": None}
    return {name: spread.median, f"{name}_iqr": [spread.q1, spread.q3], f"{name}_runs": spread.runs}


def compare(
    run_dirs: list[str] | None = None, plan=None, out: str | None = None, reporter=None, jobs: int = 1,
    devices: list[str] | None = None,
) -> dict[str, Any]:
    """`kd compare`: train a `kdcli.compare.make_plan` grid (resumably, `jobs` runs at once) or aggregate
    `run_dirs`; see kdcli.compare. Runs trained in this process go through run() and resume()."""
    from kdcli import compare as comparison

    runner = comparison.Runner(
        train=lambda config, rep: run(config, overwrite=True, reporter=rep),
        resume=lambda path, rep: resume(path, reporter=rep),
    )
    return comparison.compare(run_dirs, plan=plan, out=out, runner=runner, reporter=reporter, jobs=jobs, devices=devices)
