"""The public Python API: `kdcli.distill()`, `kdcli.train()`, `kdcli.evaluate()`.

Networks are names (as on the command line: zoo, timm:/tv:, pkg.module:factory, a weights file)
or nn.Module objects; data is a dataset name or a `(train, val)` pair of torch Datasets or
DataLoaders yielding `(image, label)`. A run goes through the same builder, fit loop and run folder
as `kd distill` (kdcli.api.run), and the call returns the same summary dict as `kd distill --json`.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from kdcli import api, plugins
from kdcli.build import CUSTOM_DATA, Sources
from kdcli.config import RunConfig, build_config, check_layer, read_config_file
from kdcli.data import build_data, make_loader
from kdcli.data.custom import bundle_from_datasets
from kdcli.engine.evaluate import evaluate as evaluate_model
from kdcli.engine.rundir import RunDir
from kdcli.errors import KdError
from kdcli.report import SilentReporter

_CONFIG_KEYS = {f.name for f in fields(RunConfig)} - {"command", "student", "teacher", "method", "data", "epochs", "out"}


def distill(
    teacher, student, data, method: str = "kd", epochs: int | None = None, out: str | Path | None = None, *,
    reporter=None, resume: bool = False, overwrite: bool = False, num_classes: int | None = None, **options,
) -> dict[str, Any]:
    """Distill `teacher` into `student` with `method`; returns the run's summary (as `kd distill --json`).

    options: RunConfig settings (batch_size, lr, seed, device, precision, workers, teacher_arch, ...)
    and the method's hyperparameters (e.g. T=4). A student object is trained in place.
    reporter: None for no output, "rich" for kd's progress display, or an object with kd's reporter methods.
    resume: continue the run in `out` from its last checkpoint (pass the same objects again).
    num_classes: the class count of Dataset data (default: the largest label + 1).
    """
    return _run("distill", student, data, method, epochs, out, reporter, resume, overwrite, num_classes, options, teacher=teacher)


def train(
    model, data, epochs: int | None = None, out: str | Path | None = None, *,
    reporter=None, resume: bool = False, overwrite: bool = False, num_classes: int | None = None, **options,
) -> dict[str, Any]:
    """Train `model` on `data` with cross-entropy (e.g. a teacher); returns the summary (as `kd train --json`).

    A model named by a string on named data is registered in the teacher store, as `kd train` does.
    """
    return _run("train", model, data, "none", epochs, out, reporter, resume, overwrite, num_classes, options)


def evaluate(
    model, data=None, *, batch_size: int = 256, device: str = "auto", num_classes: int | None = None, **options,
) -> dict[str, Any]:
    """Top-1/top-5 (percent), NLL and ECE of `model` on the validation split of `data`.

    A string `model` with named data is `kd eval` (kdcli.api.evaluate_checkpoint; options such as
    arch=, teacher=, timing= go to it). An nn.Module, or Dataset data, is scored directly, its inputs
    normalised with the data's mean/std (measured on the training split for Datasets).
    """
    if isinstance(model, str) and (data is None or isinstance(data, str)):
        return api.evaluate_checkpoint(model, data, batch_size=batch_size, device=device, **options)
    if options:
        raise KdError(f"evaluate() of an object takes no {', '.join(sorted(options))}", "pass batch_size, device and num_classes only")
    check_layer({"batch_size": batch_size, "device": device})  # as the CLI checks them
    bundle = _bundle(data, num_classes)
    if isinstance(model, str):
        model, _ = api.load_network(model, CUSTOM_DATA, bundle.num_classes)
    _check_module(model, "model")
    dev = api.resolve_device(device)
    loader = make_loader(bundle.val, bundle, batch_size, False, dev, 0, 0)
    result = evaluate_model(model.to(dev), loader)
    return {"samples": result.samples, "top1": result.top1, "top5": result.top5, "nll": result.loss, "ece": result.ece,
            "num_classes": bundle.num_classes, "mean": list(bundle.mean), "std": list(bundle.std)}


def _run(command, student, data, method, epochs, out, reporter, resume, overwrite, num_classes, options, teacher=None):
    _check_module(student, "student")
    if teacher is not None:
        _check_module(teacher, "teacher")
    sources = Sources(
        student=student if isinstance(student, nn.Module) else None,
        teacher=teacher if isinstance(teacher, nn.Module) else None,
        bundle=None if isinstance(data, str) else _bundle(data, num_classes),
    )
    settings = {key: value for key, value in options.items() if key in _CONFIG_KEYS}
    hparams = {key: value for key, value in options.items() if key not in _CONFIG_KEYS}
    if sources.bundle is not None and "batch_size" not in settings and isinstance(data[0], DataLoader) and data[0].batch_size:
        settings["batch_size"] = data[0].batch_size
    flags = dict(
        command=command, student=_name(student), teacher=_name(teacher) if teacher is not None else None,
        method=method, data=data if isinstance(data, str) else CUSTOM_DATA, epochs=epochs,
        out=str(out) if out is not None else None, **settings,
    )
    flags["options"] = {**settings.pop("options", {}), **hparams}
    if resume:
        config = _saved_config(out)
    else:
        config = build_config({key: value for key, value in flags.items() if value is not None})
    shown = None if reporter == "rich" else reporter or SilentReporter()
    return api.run(config, overwrite=overwrite, resume=resume, reporter=shown, sources=sources)


def _saved_config(out) -> RunConfig:
    if out is None:
        raise KdError("resume=True needs out=, the folder of the run to continue", "pass the out= of the earlier call")
    run_dir = RunDir(out)
    if not run_dir.config.is_file():
        raise KdError(f"{run_dir.path} is not a kd run folder (no config.toml)", "pass the out= folder of an earlier run")
    return replace(build_config(read_config_file(run_dir.config)), out=str(run_dir.path))


def _bundle(data, num_classes):
    if isinstance(data, str):
        return build_data(data)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return bundle_from_datasets(*data, num_classes=num_classes, name=CUSTOM_DATA)
    raise KdError(
        f"data is a {type(data).__name__}",
        "pass a dataset name (e.g. 'cifar100'), or a (train, val) pair of torch Datasets or DataLoaders",
    )


def _name(network) -> str:
    return plugins.spec_of_module(network) if isinstance(network, nn.Module) else network


def _check_module(network, role: str) -> None:
    if not isinstance(network, (str, nn.Module)):
        raise KdError(f"{role} is a {type(network).__name__}", "pass a name (e.g. 'resnet20', 'pkg.module:factory'), a weights path, or an nn.Module")
