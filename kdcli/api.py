"""Library entry points behind the CLI: train(), distill(), resume(), evaluate_checkpoint(), compare()."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli import __version__
from kdcli.batch import Batch
from kdcli.config import RunConfig, read_config_file, build_config, to_toml
from kdcli.data import build_data, make_loader
from kdcli.engine.evaluate import evaluate
from kdcli.engine.rundir import RunDir
from kdcli.engine.trainer import Schedule, Trainer
from kdcli.errors import KdError
from kdcli.methods import Method, Shapes, method_class
from kdcli.methods.base import resolve_hparams
from kdcli.models import create_model, default_lr, list_models
from kdcli.models.features import classifier_of, forward_outputs
from kdcli.report import ConsoleReporter
from kdcli.store import find_teacher, register_teacher
from kdcli.weights import load_model_file, save_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdError(f"--device {name} asked for, but no CUDA device is available", "use --device cpu or auto")
    return torch.device(name)


def run(config: RunConfig, overwrite: bool = False, resume: bool = False, reporter=None) -> dict[str, Any]:
    """Train (`config.command == "train"`) or distill; everything is validated before anything is written."""
    device = resolve_device(config.device)
    cls = method_class(config.method)
    resolve_hparams(cls, config.options)  # reject bad --set values before any slow work
    bundle = build_data(config.data, data_dir=config.data_dir, download=config.download)
    teacher = load_teacher(config, bundle.num_classes) if config.command == "distill" and cls.needs.teacher else None
    torch.manual_seed(config.seed)
    student = create_model(config.student, num_classes=bundle.num_classes)
    train_loader = make_loader(
        bundle.train, bundle, config.batch_size, True, device, config.seed, config.workers, views=cls.needs.views
    )
    val_loader = make_loader(bundle.val, bundle, config.eval_batch_size, False, device, config.seed, config.workers)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    method = build_method(cls, config, student, teacher, next(iter(val_loader)), len(bundle.train)).to(device)

    run_dir = RunDir(config.out or default_out(config))
    config = replace(config, out=str(run_dir.path))
    if not resume:
        run_dir.create(to_toml(config), overwrite=overwrite)

    weights_name = "model.safetensors" if config.command == "train" else "student.safetensors"
    metadata = {
        "arch": config.student,
        "num_classes": bundle.num_classes,
        "dataset": config.data,
        "method": config.method if config.command == "distill" else "train",
        "teacher": config.teacher,
    }

    def save_weights(path: Path, top1: float) -> None:
        save_model(path, student, top1=f"{top1:.4f}", **metadata)

    schedule = Schedule(
        epochs=config.epochs,
        lr=config.lr or default_lr(config.student),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        milestones=config.milestone_epochs(),
        lr_decay=config.lr_decay,
    )
    title = f"{config.teacher} -> {config.student} [{config.method}]" if teacher else f"train {config.student}"
    trainer = Trainer(
        student, teacher, method, train_loader, val_loader, schedule, run_dir,
        reporter or ConsoleReporter(title), save_weights,
    )
    started = time.perf_counter()
    trainer.fit(resume=resume)
    elapsed = time.perf_counter() - started

    history = run_dir.read_metrics()
    last = history[-1]
    save_weights(run_dir.path / weights_name, last["val_top1"])
    summary = {
        "command": config.command,
        "run_dir": str(run_dir.path),
        "teacher": config.teacher if teacher is not None else None,
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
        "weights": str(run_dir.path / weights_name),
        "kdcli_version": __version__,
    }
    run_dir.write_summary(summary)
    if config.command == "train":
        summary["registered_as"] = str(register_teacher(run_dir.path / weights_name, config.student, config.data))
    return summary


def resume(run_path: str | Path, reporter=None) -> dict[str, Any]:
    """Continue the run in `run_path` from its last checkpoint, with the config saved there."""
    run_dir = RunDir(run_path)
    if not run_dir.config.is_file():
        raise KdError(f"{run_dir.path} is not a kd run folder (no config.toml)", "pass the --out folder of an earlier run")
    config = build_config(read_config_file(run_dir.config))
    return run(replace(config, out=str(run_dir.path)), resume=True, reporter=reporter)


def default_out(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if config.command == "train":
        return Path("runs") / f"{config.student}-{_slug(config.data)}-{stamp}"
    return Path("runs") / f"{_slug(config.teacher or 'none')}-{config.student}-{config.method}-{stamp}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(text).stem if text)


def load_teacher(config: RunConfig, num_classes: int) -> nn.Module:
    """`--teacher` as a path to a weights file, or a model name looked up in the teacher store."""
    if not config.teacher:
        raise KdError("kd distill needs --teacher", "pass a trained model name (see `kd list teachers`) or a checkpoint path")
    path = Path(config.teacher).expanduser()
    if path.is_file() or path.suffix in (".safetensors", ".pth", ".pt") or "/" in config.teacher:
        model, _ = load_model_file(path, arch=config.teacher_arch, num_classes=num_classes)
        return model
    stored = find_teacher(config.teacher, config.data)
    if stored is None:
        if config.teacher not in list_models():
            create_model(config.teacher, num_classes=num_classes)  # raises the did-you-mean error
        raise KdError(
            f"no trained {config.teacher} for {config.data} in the teacher store",
            f"train one with `kd train {config.teacher} --data {config.data}`, or pass --teacher PATH to a checkpoint",
        )
    model, _ = load_model_file(stored, num_classes=num_classes)
    return model


@torch.no_grad()
def shapes_of(model: nn.Module, x: torch.Tensor) -> Shapes:
    """Feature, embedding and class shapes from one forward pass in eval mode."""
    was_training = model.training
    model.eval()
    out = forward_outputs(model, x)
    model.train(was_training)
    return Shapes(
        features=[tuple(f.shape[1:]) for f in out.features],
        embedding=int(out.embedding.shape[1]) if out.embedding is not None else 0,
        num_classes=int(out.logits.shape[1]),
    )


def build_method(
    cls: type[Method], config: RunConfig, student: nn.Module, teacher: nn.Module | None, batch: Batch, num_samples: int
) -> Method:
    """The method, built from the networks' shapes (dry run on one batch) and its --set options."""
    x = batch.x[:2]
    student_shapes = shapes_of(student, x)
    teacher_shapes = shapes_of(teacher, x) if teacher is not None else Shapes()
    head = classifier_of(teacher) if cls.needs.teacher_head and teacher is not None else None
    torch.manual_seed(config.seed + 1)
    return cls(student_shapes, teacher_shapes, num_samples, teacher_head=head, **config.options)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate_checkpoint(
    checkpoint: str, data: str | None, arch: str | None, data_dir: str | None, batch_size: int, device: str
) -> dict[str, Any]:
    """Top-1/top-5/NLL of a kd safetensors or RepDistiller .pth on a dataset's validation split."""
    dev = resolve_device(device)
    path = Path(checkpoint)
    if path.suffix == ".safetensors" and path.is_file():
        from kdcli.weights import read_metadata

        data = data or read_metadata(path).get("dataset")
    if not data:
        raise KdError("no dataset to evaluate on", "pass --data (e.g. --data cifar100)")
    bundle = build_data(data, data_dir=data_dir)
    model, metadata = load_model_file(path, arch=arch, num_classes=bundle.num_classes)
    loader = make_loader(bundle.val, bundle, batch_size, False, dev, 0, 0)
    result = evaluate(model.to(dev), loader)
    return {
        "checkpoint": str(path),
        "arch": metadata["arch"],
        "data": data,
        "samples": result.samples,
        "top1": result.top1,
        "top5": result.top5,
        "nll": result.loss,
        "params": count_params(model),
    }


def compare(run_dirs: list[str]) -> dict[str, Any]:
    """Aggregate finished run folders: per (teacher, student, method), top-1 mean and std over runs."""
    summaries = []
    for run_path in run_dirs:
        found = sorted(Path(run_path).glob("**/summary.json"))
        if not found:
            raise KdError(f"{run_path} holds no finished kd run (no summary.json)", "pass run folders written by kd distill/train")
        summaries += [json.loads(p.read_text()) for p in found]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s.get("teacher"), s["student"], s["method"], s["data"]), []).append(s)
    rows = []
    for (teacher, student, method, data), runs in groups.items():
        last = [r["top1"] for r in runs]
        best = [r["best_top1"] for r in runs]
        rows.append({
            "teacher": teacher, "student": student, "method": method, "data": data, "runs": len(runs),
            "top1_mean": statistics.fmean(last), "top1_std": statistics.stdev(last) if len(last) > 1 else 0.0,
            "best_top1_mean": statistics.fmean(best), "best_top1_std": statistics.stdev(best) if len(best) > 1 else 0.0,
            "time_per_epoch_s": statistics.fmean(r["time_per_epoch_s"] for r in runs),
        })
    rows.sort(key=lambda r: -r["top1_mean"])
    return {"rows": rows}
