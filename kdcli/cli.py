"""The `kd` command: parses flags, merges presets, calls kdcli.api, prints results. No training logic."""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from pathlib import Path
from operator import itemgetter
from typing import Annotated, Any, Callable, Optional

import typer

try:
    from typer._click import exceptions as click_errors  # recent Typer vendors click: its errors are these
except ImportError:
    from click import exceptions as click_errors

from kdcli import __version__
from kdcli.config import build_config, check_layer, list_presets, load_preset, load_run_config, parse_set_options
from kdcli.engine.signals import exit_quietly_after_a_stop, ignore_signals
from kdcli.errors import KdError, is_disk_full, unknown
from kdcli.report import fmt, print_fields, print_json, print_rows, plural, print_summary, si, stderr

app = typer.Typer(
    name="kd",
    help="Knowledge distillation for PyTorch: distill a teacher network into a smaller student.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_state = {"debug": False}


def _flags_show_no_type() -> None:
    """Typer's rich help prints a `<bool>` type beside every on/off flag, as if it took a value: drop it."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)  # absent in older Typer, which shows none
    if shown is None or getattr(shown, "flags_untyped", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.flags_untyped = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()

# Options shared by `kd train` and `kd distill` (one definition each).
Data = Annotated[Optional[str], typer.Option("--data", help="cifar10, cifar100, imagefolder:PATH, digits, synthetic[:k=v,...], or your pkg.module:factory returning (train, val[, num_classes]) Datasets")]
ValSplit = Annotated[Optional[float], typer.Option("--val-split", help="imagefolder:PATH without val/: hold out this fraction of each class for validation.")]
DataDir = Annotated[Optional[str], typer.Option("--data-dir", help="Folder holding the dataset files.")]
Download = Annotated[Optional[bool], typer.Option("--download", help="Download the dataset, and a CIFAR-100 release teacher missing from the store, if missing (needs internet).")]
Epochs = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs (default 240; lr milestones scale with it).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Training batch size (default 64).")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Initial learning rate (default 0.05; 0.01 for MobileNetV2/ShuffleNet).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default 0).")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[Optional[str], typer.Option("--precision", help="auto (bf16 where the hardware is fast at it), fp32 or bf16.")]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile student and teacher.")]
Deterministic = Annotated[Optional[bool], typer.Option("--deterministic/--no-deterministic", help="Deterministic kernels only: bit-exact resume on GPUs, slower.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="DataLoader workers for image folders.")]
Out = Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder (default runs/<name>-<time>).")]
Preset = Annotated[Optional[str], typer.Option("--preset", help="Recipe from presets/NAME.toml (or a .toml path); flags override it.")]
Resume = Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder from its last checkpoint.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --out.")]
SyncBn = Annotated[Optional[bool], typer.Option("--sync-bn", help="SyncBatchNorm across data-parallel processes (GPUs).")]
Nproc = Annotated[int, typer.Option("--nproc", help="Data-parallel processes on this machine (launches torchrun).")]
Json = Annotated[bool, typer.Option("--json", help="Print only the summary JSON on stdout.")]
Pretrained = Annotated[Optional[bool], typer.Option("--pretrained", help="timm:NAME / tv:NAME models start from their published weights (downloaded once, then cached); inputs are normalised as those weights expect.")]
# Training recipe (kdcli.engine.optim / schedule / ema; README "Training recipes").
Optimizer = Annotated[Optional[str], typer.Option("--optimizer", help="sgd (default), adamw (weight decay then skips norms and biases), or dot: separate task/distillation momenta (DOT, ICCV 2023), with any method.")]
LrSchedule = Annotated[Optional[str], typer.Option("--schedule", help="multistep (default; --lr-decay at the milestones), cosine (per step), step (every --step-size epochs) or constant.")]
WarmupEpochs = Annotated[Optional[float], typer.Option("--warmup-epochs", help="Linear lr warm-up over this many epochs, per optimizer step (default 0).")]
MinLr = Annotated[Optional[float], typer.Option("--min-lr", help="Where the cosine schedule ends (default 0).")]
StepSize = Annotated[Optional[int], typer.Option("--step-size", help="Epochs between decays of the step schedule (default 30).")]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay (default 5e-4).")]
LabelSmoothing = Annotated[Optional[float], typer.Option("--label-smoothing", help="Label smoothing of the cross-entropy term (default 0).")]
ClipGrad = Annotated[Optional[float], typer.Option("--clip-grad", help="Clip the total gradient norm to this value (default off).")]
Accumulate = Annotated[Optional[int], typer.Option("--accumulate", help="Batches per optimizer step; effective batch = batch size x N x processes (scale --lr with it).")]
Ema = Annotated[Optional[float], typer.Option("--ema", help="Keep an EMA of the student's weights with this decay (e.g. 0.9998), evaluated and saved beside it.")]
Log = Annotated[Optional[list[str]], typer.Option("--log", help="Also log to tensorboard and/or wandb (repeatable or comma-separated).")]


def _recipe_flags(optimizer, schedule, warmup_epochs, min_lr, step_size, weight_decay, label_smoothing, clip_grad,
                  accumulate, ema, log) -> dict[str, Any]:
    loggers = [name.strip() for item in log or [] for name in item.split(",") if name.strip()]
    return dict(optimizer=optimizer, schedule=schedule, warmup_epochs=warmup_epochs, min_lr=min_lr, step_size=step_size,
                weight_decay=weight_decay, label_smoothing=label_smoothing, clip_grad=clip_grad, accumulate=accumulate,
                ema=ema, log=loggers or None)


def _version(value: bool) -> None:
    if value:
        print(f"kd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    _state["debug"] = debug


def _run(
    flags: dict[str, Any], preset: str | None, resume: Path | None, overwrite: bool, json_out: bool, nproc: int = 1
) -> None:
    if nproc < 1:
        raise KdError(f"--nproc {nproc} is invalid", "use 1 or more processes")
    # Flags, preset and a resumed config.toml are checked here, before torch is imported: a typo answers at once.
    if resume is not None:
        _check_resume_alone(flags, preset, overwrite, resume)
        load_run_config(resume)
    else:
        config = build_config(load_preset(preset) if preset else {}, flags)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from kdcli.launch import launch

        launch(nproc, sys.argv[1:])
        return
    from kdcli import api
    from kdcli.engine import distributed
    from kdcli.engine.trainer import Stopped

    try:
        summary = api.resume(resume) if resume is not None else api.run(config, overwrite=overwrite)
    except Stopped:  # every rank stops at the same step, so they leave the group together
        distributed.teardown()
        raise
    distributed.teardown()  # this process's one run is over, on every rank
    if "rank" in summary:
        return  # another rank of a data-parallel run: rank 0 prints the results
    if json_out:
        print_json(summary)
    else:
        print_summary(summary)


def _check_resume_alone(flags: dict[str, Any], preset: str | None, overwrite: bool, resume: Path) -> None:
    """A resumed run keeps the settings in its config.toml: refuse flags it would silently ignore."""
    implied = {"command": flags["command"], "method": "none" if flags["command"] == "train" else None}
    names = {"options": "--set", "student": "--student" if flags["command"] == "distill" else "MODEL"}
    given = [names.get(key, f"--{key.replace('_', '-')}") for key, value in flags.items()
             if value is not None and value != implied.get(key)]
    given += ["--preset"] * (preset is not None) + ["--overwrite"] * overwrite
    if given:
        raise KdError(
            f"--resume continues with the settings saved in {resume / 'config.toml'}; {', '.join(given)} cannot be combined with it",
            f"run `kd {flags['command']} --resume {resume}` alone, or start a new run with other settings in another --out",
        )


@app.command()
def train(
    model: Annotated[Optional[str], typer.Argument(help="Network to train, e.g. resnet110 (see `kd list models`).")] = None,
    data: Data = None, data_dir: DataDir = None, download: Download = None, epochs: Epochs = None,
    batch_size: BatchSize = None, lr: Lr = None, seed: Seed = None, device: Device = None, val_split: ValSplit = None,
    precision: Precision = None, compile_: Compile = None, deterministic: Deterministic = None,
    workers: Workers = None, out: Out = None, preset: Preset = None, resume: Resume = None,
    overwrite: Overwrite = False, json_out: Json = False, pretrained: Pretrained = None, nproc: Nproc = 1, sync_bn: SyncBn = None,
    optimizer: Optimizer = None, schedule: LrSchedule = None, warmup_epochs: WarmupEpochs = None, min_lr: MinLr = None,
    step_size: StepSize = None, weight_decay: WeightDecay = None, label_smoothing: LabelSmoothing = None,
    clip_grad: ClipGrad = None, accumulate: Accumulate = None, ema: Ema = None, log: Log = None,
) -> None:
    """Train a network from scratch (e.g. a teacher) and register it in the teacher store."""
    if model is None and resume is None:
        raise KdError("kd train needs a MODEL", "e.g. `kd train resnet110 --data cifar100` (see `kd list models`)")
    flags = dict(
        command="train", student=model, method="none", data=data, data_dir=data_dir, download=download, pretrained=pretrained,
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, workers=workers, out=out,
        precision=precision, compile=compile_, sync_bn=sync_bn, val_split=val_split, deterministic=deterministic,
        **_recipe_flags(optimizer, schedule, warmup_epochs, min_lr, step_size, weight_decay, label_smoothing, clip_grad,
                        accumulate, ema, log),
    )
    _run(flags, preset, resume, overwrite, json_out, nproc)


@app.command()
def distill(
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="Trained teacher: a name from the teacher store, a kd .safetensors or a RepDistiller .pth.")] = None,
    student: Annotated[Optional[str], typer.Option("--student", "-s", help="Student network, e.g. resnet20, timm:NAME, or your own pkg.module:factory / file.py:factory.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Distillation method (see `kd list methods`).")] = None,
    teacher_arch: Annotated[Optional[str], typer.Option("--teacher-arch", help="Architecture of a .pth teacher outside an <arch>_vanilla folder (a name or pkg.module:factory).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Method option KEY=VALUE (repeatable), e.g. --set T=4.")] = None,
    data: Data = None, data_dir: DataDir = None, download: Download = None, epochs: Epochs = None,
    batch_size: BatchSize = None, lr: Lr = None, seed: Seed = None, device: Device = None, val_split: ValSplit = None,
    precision: Precision = None, compile_: Compile = None, deterministic: Deterministic = None,
    workers: Workers = None, out: Out = None, preset: Preset = None, resume: Resume = None,
    overwrite: Overwrite = False, json_out: Json = False, pretrained: Pretrained = None, nproc: Nproc = 1, sync_bn: SyncBn = None,
    optimizer: Optimizer = None, schedule: LrSchedule = None, warmup_epochs: WarmupEpochs = None, min_lr: MinLr = None,
    step_size: StepSize = None, weight_decay: WeightDecay = None, label_smoothing: LabelSmoothing = None,
    clip_grad: ClipGrad = None, accumulate: Accumulate = None, ema: Ema = None, log: Log = None,
    dot_delta: Annotated[Optional[float], typer.Option("--dot-delta", help="DOT momentum gap: task momentum - delta, distillation + delta (default 0.075).")] = None,
) -> None:
    """Distill a teacher into a student with one method; writes <out>/student.safetensors."""
    flags = dict(
        command="distill", teacher=teacher, student=student, method=method, teacher_arch=teacher_arch,
        options=parse_set_options(set_ or []) or None, data=data, data_dir=data_dir, download=download, pretrained=pretrained,
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, workers=workers, out=out,
        precision=precision, compile=compile_, sync_bn=sync_bn, dot_delta=dot_delta, val_split=val_split, deterministic=deterministic,
        **_recipe_flags(optimizer, schedule, warmup_epochs, min_lr, step_size, weight_decay, label_smoothing, clip_grad,
                        accumulate, ema, log),
    )
    _run(flags, preset, resume, overwrite, json_out, nproc)


@app.command("eval")
def eval_(
    checkpoint: Annotated[str, typer.Argument(help="A kd .safetensors, a RepDistiller/mdistiller .pth, a name in the teacher store, or timm:NAME / tv:NAME with --pretrained.")],
    data: Data = None, data_dir: DataDir = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture of a .pth outside an <arch>_vanilla folder.")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="Also report agreement with this network (resolved as in kd distill).")] = None,
    teacher_arch: Annotated[Optional[str], typer.Option("--teacher-arch", help="Architecture of a .pth teacher outside an <arch>_vanilla folder.")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="timm:NAME / tv:NAME use their published weights (downloaded once, then cached).")] = False,
    download: Annotated[bool, typer.Option("--download", help="Download the dataset, and a CIFAR-100 release teacher missing from the store, if missing.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Evaluation batch size.")] = 256,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (also where latency and throughput are timed).")] = "auto",
    workers: Workers = None,
    timing: Annotated[bool, typer.Option("--timing/--no-timing", help="Time latency (batch 1) and throughput (batch 256).")] = True,
    json_out: Json = False,
) -> None:
    """Evaluate a network on a dataset's validation split: accuracy, calibration, agreement, size and speed.

    top-1/top-5 and NLL; ECE = expected calibration error over 15 equal-width confidence bins (percent);
    agreement = percent of samples where network and --teacher predict the same class; MACs of one image
    (FLOPs / 2, torch's FlopCounterMode); latency = median batch-1 forward, throughput = images/s at batch 256.
    """
    check_layer({"batch_size": batch_size, "workers": workers, "device": device})  # before torch is imported
    from kdcli import api

    result = api.evaluate_checkpoint(
        checkpoint, data, arch, data_dir, batch_size, device, teacher=teacher, teacher_arch=teacher_arch,
        pretrained=pretrained, timing=timing, workers=workers, download=download,
    )
    if json_out:
        print_json(result)
        return
    rows = [
        ("checkpoint", result["checkpoint"]), ("arch", result["arch"]), ("data", result["data"]),
        ("samples", result["samples"]), ("top-1 (%)", result["top1"]), ("top-5 (%)", result["top5"]),
        ("NLL", fmt(result["nll"], 4)), ("ECE (%, 15 bins)", result["ece"]),
        ("teacher", result.get("teacher")), ("teacher top-1 (%)", result.get("teacher_top1")),
        ("agreement with teacher (%)", result.get("agreement")),
        ("params", f"{result['params']:,}"), ("MACs (1 image)", si(result["macs"])),
        ("input", "x".join(map(str, result["input_size"]))),
        ("latency, batch 1 (ms)", _spread(result, "latency_ms", 2)),
        (f"throughput, batch {result['throughput_batch']} (img/s)", _spread(result, "throughput", 0)),
        ("device", f"{result['device']}, {plural(result['threads'], 'thread')}, {result['precision']}"),
    ]
    print_fields(f"kd eval {checkpoint}", rows)


@app.command("export")
def export_(
    source: Annotated[str, typer.Argument(help="A kd run folder or a kd .safetensors weights file.")],
    format_: Annotated[str, typer.Option("--format", "-f", help="torchscript or onnx (onnx needs the onnx extra).")] = "torchscript",
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="File to write (default: beside the weights, .pt or .onnx).")] = None,
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="dynamic, or a fixed batch size baked into the file.")] = "dynamic",
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="C,H,W for weights that do not record it, e.g. 3,32,32.")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="The network's architecture; needed again for your own pkg.module:factory networks.")] = None,
    json_out: Json = False,
) -> None:
    """Export a trained network for deployment, with its input normalisation as metadata, checked numerically against PyTorch."""
    from kdcli.export import export

    result = export(source, format_, out, batch_size, input_size, arch=arch).summary()
    if json_out:
        print_json(result)
        return
    rows = [("file", result["path"]), ("format", result["format"]),
            ("max abs difference vs PyTorch", "-" if result["max_abs_diff"] is None else f"{result['max_abs_diff']:.3g}"), ("checked with", result["checked_with"]),
            ("input", result.get("meta_input_shape")), ("mean", result.get("meta_mean")), ("std", result.get("meta_std"))]
    print_fields(f"kd export {source}", rows)


ListJson = Annotated[bool, typer.Option("--json", help="Print the list as one JSON array on stdout (for scripts).")]
LISTINGS = ("models", "methods", "datasets", "presets", "teachers")
Column = tuple[str, Callable[[dict[str, Any]], Any]]  # header, cell of a row


@app.command("list")
def list_(
    what: Annotated[str, typer.Argument(help="models, methods, datasets, presets or teachers.")] = "methods",
    json_out: ListJson = False,
) -> None:
    """List what kd knows: models, methods, datasets, presets, teachers."""
    if what not in LISTINGS:
        raise unknown("list", what, LISTINGS)
    title, columns, rows, empty = _listing(what)
    if json_out:
        print_json(rows)
    elif not rows and empty:
        stderr.print(f"{title}: empty. {empty}", markup=False, soft_wrap=True)
    else:
        print_rows(title, [header for header, _ in columns], [[cell(row) for _, cell in columns] for row in rows])


def _spread(result: dict[str, Any], name: str, digits: int) -> str | None:
    """'1.23 (IQR 1.10-1.41, 50 runs)': a timing's median with its spread, or None when not timed."""
    if result[name] is None:
        return None
    q1, q3 = result[f"{name}_iqr"]
    return f"{fmt(result[name], digits)} (IQR {fmt(q1, digits)}-{fmt(q3, digits)}, {result[f'{name}_runs']} runs)"


def _listing(what: str) -> tuple[str, list[Column], list[dict[str, Any]], str | None]:
    """(title, table columns, rows as plain data for --json, what to say when there are none) of `kd list WHAT`."""
    if what == "models":
        from kdcli.models import create_model, list_models
        from kdcli.profiling import count_macs, count_params

        rows = []
        for name in list_models():
            model = create_model(name, num_classes=100)
            rows.append({"name": name, "params": count_params(model), "macs_32x32": count_macs(model, (3, 32, 32))})
        columns = [("name", itemgetter("name")), ("params (100 classes)", lambda r: si(r["params"])),
                   ("MACs (32x32)", lambda r: si(r["macs_32x32"]))]
        return "models (also timm:NAME and tv:NAME)", columns, rows, None
    if what == "methods":
        from kdcli.methods import list_methods

        rows = [{"name": name, "method": cls.title, "paper": cls.paper, "defaults": dict(cls.defaults)}
                for name, cls in list_methods().items()]
        columns = [("name", itemgetter("name")), ("method", itemgetter("method")), ("paper", itemgetter("paper")),
                   ("defaults (--set KEY=VALUE)", lambda r: ", ".join(f"{k}={v}" for k, v in r["defaults"].items()))]
        return "methods", columns, rows, None
    if what in ("datasets", "presets"):
        from kdcli.data import list_datasets

        described = list_datasets() if what == "datasets" else list_presets()
        rows = [{"name": name, "description": text} for name, text in described.items()]
        flag = "--data" if what == "datasets" else "--preset"
        return f"{what} ({flag})", _plain_columns(["name", "description"]), rows, None
    from kdcli.teachers import list_teachers

    columns = [*_plain_columns(["data", "model"]), ("top-1 (%)", lambda r: fmt(r["top1"])),
               *_plain_columns(["source", "path"])]
    empty = ("Fill it with `kd teachers fetch` (the published CIFAR-100 teachers), `kd teachers import PATH`, "
             "or `kd train MODEL --data DATA` (every model kd trains is stored as a teacher).")
    return "teacher store", columns, list_teachers(), empty


def _plain_columns(keys: list[str]) -> list[Column]:
    return [(key, itemgetter(key)) for key in keys]


teachers_app = typer.Typer(
    help="Published teachers: fetch the CIFAR-100 release into the teacher store, or import it from files.",
    no_args_is_help=True,
)
app.add_typer(teachers_app, name="teachers")


@teachers_app.command("fetch")
def teachers_fetch(
    names: Annotated[Optional[list[str]], typer.Argument(help="Teachers to get, e.g. resnet110 (default: all in the release).", show_default=False)] = None,
    url: Annotated[Optional[str], typer.Option("--url", help="A mirror of cifar_teachers.tar (default $KD_TEACHERS_URL, else the mdistiller release).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different teacher of the same name in the store.")] = False,
    json_out: Json = False,
) -> None:
    """Download the published CIFAR-100 teachers (mdistiller's cifar_teachers.tar, ~364 MB, resumable) into the store."""
    from kdcli.teachers import fetch

    _print_imported(fetch(names or None, url=url, overwrite=overwrite), json_out)


@teachers_app.command("import")
def teachers_import(
    path: Annotated[Path, typer.Argument(help="cifar_teachers.tar, its extracted folder, or one .pth file.")],
    names: Annotated[Optional[list[str]], typer.Option("--only", help="Import only this teacher (repeatable).")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture of a single .pth outside an <arch>_vanilla folder.")] = None,
    data: Annotated[str, typer.Option("--data", help="Dataset the teachers were trained on.")] = "cifar100",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different teacher of the same name in the store.")] = False,
    json_out: Json = False,
) -> None:
    """Import teachers from files (air-gapped machines): converted to kd .safetensors and registered in the store."""
    from kdcli.teachers import import_path

    _print_imported(import_path(path, names or None, arch=arch, overwrite=overwrite, dataset=data), json_out)


def _print_imported(imported, json_out: bool) -> None:
    if json_out:
        print_json({"teachers": [item.as_dict() for item in imported]})
        return
    print_rows(
        "teacher store", ["model", "top-1 (%)", "status", "sha256 of the .pth", "path"],
        [[i.arch, fmt(i.top1), i.status, i.sha256[:16], i.path] for i in imported],
    )


@app.command()
def compare(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Finished run folders to aggregate (searched recursively); leave out to train the comparison.", show_default=False)] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="Trained teacher: a name from the teacher store, a kd .safetensors or a RepDistiller .pth.")] = None,
    student: Annotated[Optional[str], typer.Option("--student", "-s", help="Student network, e.g. resnet20, timm:NAME, or your own pkg.module:factory / file.py:factory.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", "-m", help="Methods to compare, comma-separated (default none,kd, or the preset's); none is the plain student.")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="3 for seeds 0,1,2, or a list such as 0,1,2 (default 1, or the preset's).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE for every method that has KEY, METHOD.KEY=VALUE for one (repeatable).")] = None,
    data: Data = None, data_dir: DataDir = None, download: Download = None, epochs: Epochs = None,
    batch_size: BatchSize = None, lr: Lr = None, device: Device = None, preset: Preset = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Parent folder of the runs and the compare.* files (default runs/compare-<teacher>-<student>-<time>, or runs/compare-<preset>-<time> for a preset's grid; when aggregating, the first folder).")] = None,
    teacher_arch: Annotated[Optional[str], typer.Option("--teacher-arch", help="Architecture of a .pth teacher outside an <arch>_vanilla folder.")] = None,
    precision: Precision = None, compile_: Compile = None, workers: Workers = None, pretrained: Pretrained = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Runs trained at once, each in its own process (several small runs share a GPU well).")] = 1,
    devices: Annotated[Optional[str], typer.Option("--devices", help="GPUs the --jobs are spread over, e.g. 0,1,2,3 (default: every visible GPU).")] = None,
    published: Annotated[bool, typer.Option("--published", help="Print the stored published CIFAR-100 tables (narrowed by --student/--teacher) and exit; trains nothing.")] = False,
    json_out: Json = False,
) -> None:
    """Which method is best for a teacher/student pair, by how much, at what cost.

    With --teacher/--student (or the grid of a preset such as cifar100-bench) it trains every
    method x seed under one folder, reusing finished runs and resuming an interrupted one; with run
    folders it aggregates them. Either way: a table, and compare.json, .csv, .md and .png.
    """
    if published:
        from kdcli.compare import print_published, published_table

        _compare_published(student, teacher, runs, json_out, print_published, published_table)
        return
    flags = dict(
        teacher=teacher, student=student, data=data, data_dir=data_dir, download=download, epochs=epochs,
        batch_size=batch_size, lr=lr, device=device, teacher_arch=teacher_arch, precision=precision,
        compile=compile_, workers=workers, pretrained=pretrained,
    )
    check_layer(dict(flags))  # before torch is imported
    if devices and jobs == 1:
        raise KdError("--devices spreads the runs of --jobs N over GPUs; with one job it would be ignored",
                      "add --jobs N (e.g. --jobs 4), or give one run its GPU with --device cuda:N")
    from kdcli import api
    from kdcli.compare import make_plan, parse_devices, print_tables

    if runs:
        training = {**flags, "methods": methods, "seeds": seeds, "set": set_, "preset": preset,
                    "jobs": None if jobs == 1 else jobs, "devices": devices}
        given = [f"--{name.replace('_', '-')}" for name, value in training.items() if value not in (None, [], ())]
        if given:
            raise KdError(
                f"{' '.join(given)} cannot be combined with run folders to aggregate",
                "aggregate with `kd compare DIR...`, or train with `kd compare --teacher T --student S --methods ...`",
            )
        result = api.compare(runs, out=out)
    else:
        plan = make_plan(flags, preset=preset, methods=methods, seeds=seeds, options=parse_set_options(set_ or []), out=out)
        result = api.compare(plan=plan, jobs=jobs, devices=parse_devices(devices))
    if json_out:
        print_json(result)
    else:
        print_tables(result)
    if result["failed"]:
        raise typer.Exit(1)  # the other runs finished and are in the table; the failures are listed under it


def _compare_published(student, teacher, runs, json_out, print_published, published_table) -> None:
    """`kd compare --published`: the stored tables alone."""
    if runs:
        raise KdError("--published prints the stored tables and takes no run folders", "run `kd compare --published [--student S]`")
    tables = published_table(student=student, teacher=teacher)
    if json_out:
        print_json({"published": tables})
    else:
        print_published(tables)


def main() -> None:
    """Console entry point: KdError -> `error:` + `hint:` on stderr and its exit code, no traceback.

    Click's own usage errors (an unknown option, a value of the wrong type) take the same form,
    keeping their did-you-mean; Ctrl-C says how the run can continue.
    """
    exit_quietly_after_a_stop()
    try:
        _main()
    finally:
        exit_quietly_after_a_stop(False)


def _main() -> None:
    try:
        try:
            code = app(standalone_mode=False)
        except click_errors.NoArgsIsHelpError as exc:
            exc.show()
            code = 2
        except click_errors.UsageError as exc:
            raise usage_error(exc) from None
        except click_errors.ClickException as exc:
            raise KdError(_sentence(exc.format_message()), "see `kd --help`", exit_code=exc.exit_code) from None
        except typer.Abort:
            raise KeyboardInterrupt from None  # EOF or Ctrl-C at a prompt
        if code == 130:  # typer turns a KeyboardInterrupt in a command into exit code 130
            raise KeyboardInterrupt
        sys.exit(code if isinstance(code, int) else 0)
    except KdError as exc:
        if exc.exit_code == 130:
            ignore_signals()  # stopping: another Ctrl-C must not interrupt the goodbye or the shutdown
        _fail(exc, exc.message, exc.hint, exc.exit_code)
    except KeyboardInterrupt as exc:
        ignore_signals()
        _fail(exc, "interrupted", "a run keeps its last finished epoch's checkpoint: continue it with `--resume DIR`", 130)
    except Exception as exc:  # noqa: BLE001 - last line of defence: no raw traceback for users
        if is_disk_full(exc):
            where = getattr(exc, "filename", None) or "the output folder"
            _fail(exc, f"the disk is full: no space left on the device holding {where}",
                  "free some space and run the command again (a run continues with `--resume DIR`)", 1)
        _fail(exc, f"internal error: {type(exc).__name__}: {exc}", "re-run with `kd --debug ...` and report the traceback", 1)


_SUGGESTION = re.compile(r"\s*\(?Did you mean (?:one of: )?(?P<names>.+?)\?\)?\s*$")


def usage_error(exc: click_errors.UsageError) -> KdError:
    """A click/typer usage error in kd's form: the message as the error, its did-you-mean and the help as the hint."""
    command = exc.ctx.command_path if exc.ctx is not None else "kd"
    see = f"see `{command} --help`"
    if isinstance(exc, click_errors.NoSuchOption):
        options = [o for p in exc.ctx.command.params for o in (*p.opts, *p.secondary_opts)] if exc.ctx else []
        close = _closest(exc.option_name, options)
        hint = f"did you mean {' or '.join(close)}? ({see})" if close else see
        return KdError(f"no such option: {exc.option_name}", hint, exit_code=exc.exit_code)
    text = exc.format_message()
    match = _SUGGESTION.search(text)
    hint = f"did you mean {match['names']}? ({see})" if match else see
    return KdError(_sentence(text[: match.start()] if match else text), hint, exit_code=exc.exit_code)


def _closest(name: str, choices: list[str]) -> list[str]:
    """The choices nearest to `name` (all within 0.1 of the best similarity), best first."""
    scored = sorted(((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in set(choices)), reverse=True)
    scored = [(score, c) for score, c in scored if score >= 0.6]
    return [c for score, c in scored if score >= scored[0][0] - 0.1][:3] if scored else []


def _sentence(text: str) -> str:
    """Click's 'No such option: --epoch.' as kd writes messages: 'no such option: --epoch'."""
    text = " ".join(text.split()).rstrip(".")
    return text[:1].lower() + text[1:]


def _fail(exc: BaseException, message: str, hint: str | None, code: int) -> None:
    if os.environ.get("RANK", "0") != "0":
        sys.exit(code)  # ranks of a data-parallel run fail alike: rank 0 speaks for them
    if _state["debug"]:
        traceback.print_exception(exc)
    stderr.print(f"error: {message}", markup=False, soft_wrap=True)
    if hint:
        stderr.print(f"hint: {hint}", markup=False, soft_wrap=True)
    sys.exit(code)
