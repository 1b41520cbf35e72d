"""The resolved description of a run: preset TOML < CLI flags, saved beside the run as config.toml."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from kdcli import schema
from kdcli.errors import KdError, did_you_mean, unknown
from kdcli.schema import Bool, Float, Int, ListOf, Optional, Str, Table

# RepDistiller's CIFAR-100 milestones (150, 180, 210 of 240 epochs), kept as fractions so that they
# scale with --epochs.
DEFAULT_MILESTONE_FRACTIONS = (150 / 240, 180 / 240, 210 / 240)


@dataclass
class RunConfig:
    """Everything that determines a run. Field names are the preset/config.toml keys."""

    command: str = "distill"  # "train" or "distill"
    student: str = "resnet20"  # for `kd train`: the network being trained
    pretrained: bool = False  # timm:/tv: student starts from its published weights (and a timm:/tv: teacher uses them)
    student_pretrained: bool | None = None  # None: as `pretrained`; false: a pretrained teacher, a student from scratch (ImageNet KD)
    teacher: str | None = None
    teacher_arch: str | None = None
    teacher_sha256: str | None = None  # recorded by the run: sha256 of the teacher's weights file
    teacher_source: str | None = None  # recorded by the run: where those weights came from
    method: str = "kd"
    options: dict[str, Any] = field(default_factory=dict)  # method hyperparameters (--set)
    data: str = "cifar100"
    data_dir: str | None = None
    val_split: float | None = None  # image folders without val/: fraction of train/ held out
    download: bool = False
    epochs: int = 240
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float | None = None  # None: 0.05, or 0.01 for MobileNetV2/ShuffleNet students
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] | None = None  # None: 150/180/210 of 240, scaled to --epochs
    lr_decay: float = 0.1
    # Recipes beyond the CIFAR protocol (timm's train.py names; README "Training recipes").
    optimizer: str = "sgd"  # sgd | adamw | dot (kdcli.engine.optim registry; dot: DOT's separate task/distillation momenta)
    schedule: str = "multistep"  # multistep | cosine | step | constant (kdcli.engine.schedule)
    warmup_epochs: float = 0.0  # linear warm-up, per optimizer step, before the schedule
    min_lr: float = 0.0  # where cosine ends
    step_size: int = 30  # epochs between decays of the `step` schedule
    label_smoothing: float = 0.0  # of the ce term
    clip_grad: float | None = None  # max total gradient norm; None: no clipping
    accumulate: int = 1  # batches per optimizer step (effective batch = batch_size * accumulate * processes)
    ema: float | None = None  # decay of the student's weight EMA; None: no EMA
    log: list[str] = field(default_factory=list)  # extra loggers: tensorboard, wandb
    dot_delta: float = 0.075  # DOT's momentum gap: task mu - delta, distillation mu + delta
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where the hardware has fast bf16, else fp32
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False  # deterministic kernels only (bit-exact GPU resume; slower)
    sync_bn: bool = False  # SyncBatchNorm across the processes of a DDP run (GPUs)
    workers: int | None = None  # image-folder decoding workers; None: one per core, at most 8
    out: str | None = None

    def milestone_epochs(self) -> list[int]:
        if self.milestones is not None:
            return sorted(self.milestones)
        # ceil keeps short runs sensible (6 epochs -> 4, 5, 6) and 240 exact (150, 180, 210).
        return [max(1, math.ceil(f * self.epochs)) for f in DEFAULT_MILESTONE_FRACTIONS]

    def validate(self) -> None:
        """Reject values no run can use (types, ranges, finiteness), before anything is written."""
        for name, value in self.to_dict().items():
            setattr(self, name, schema.checked(FIELD_KINDS[name], value, flag_name(name)))
        if not 0 <= self.dot_delta <= self.momentum or self.momentum + self.dot_delta >= 1:
            raise KdError(f"--dot-delta {self.dot_delta} is invalid with --momentum {self.momentum}",
                          "use 0 <= delta <= momentum with momentum + delta < 1, e.g. 0.075")
        if self.optimizer == "dot" and (self.accumulate > 1 or self.clip_grad is not None):
            raise KdError("--optimizer dot steps once per batch on its own two gradients",
                          "drop --accumulate and --clip-grad, or use --optimizer sgd")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LOGGERS = ("tensorboard", "wandb")
# The registries' names (kdcli.engine.optim, kdcli.engine.schedule), here so flags are checked before
# torch is imported; tests/test_recipes.py checks they match.
OPTIMIZERS = ("sgd", "adamw", "dot")
SCHEDULES = ("multistep", "cosine", "step", "constant")
FIELD_NAMES = {f.name for f in fields(RunConfig)}
# Written by the run itself (what the teacher was), not settings a user chooses.
RECORDED_FIELDS = {"teacher_sha256", "teacher_source"}
# The one schema of a run's settings: flags, presets and config.toml are all checked against it.
FIELD_KINDS = {
    "command": Str(("train", "distill")),
    "student": Str(), "pretrained": Bool(), "teacher": Optional(Str()), "teacher_arch": Optional(Str()),
    "teacher_sha256": Optional(Str()), "teacher_source": Optional(Str()),
    "method": Str(), "options": Table(), "data": Str(), "data_dir": Optional(Str()), "download": Bool(),
    "epochs": Int(1, 100_000), "batch_size": Int(1, 1 << 20), "eval_batch_size": Int(1, 1 << 20),
    "lr": Optional(Float(0.0, low_open=True)), "momentum": Float(0.0, 1.0), "weight_decay": Float(0.0, 1.0),
    "milestones": Optional(ListOf(Int(1, 100_000))), "lr_decay": Float(0.0, 1.0, low_open=True),
    "student_pretrained": Optional(Bool()), "val_split": Optional(Float(0.0, 1.0, low_open=True, high_open=True)),
    "optimizer": Str(OPTIMIZERS), "schedule": Str(SCHEDULES), "warmup_epochs": Float(0.0, 100_000.0),
    "min_lr": Float(0.0), "step_size": Int(1, 100_000), "label_smoothing": Float(0.0, 1.0, high_open=True),
    "clip_grad": Optional(Float(0.0, low_open=True)), "accumulate": Int(1, 1 << 20),
    "ema": Optional(Float(0.0, 1.0, low_open=True, high_open=True)), "log": ListOf(Str(LOGGERS)),
    "dot_delta": Float(0.0, 1.0),
    "seed": Int(0, 2**63 - 1),  # torch generators take 64 bits; the method's seed is seed + 1
    "device": Str(("auto", "cpu", "cuda"), pattern=r"cuda:\d{1,3}", shown="cuda:N"), "precision": Str(("auto", "fp32", "bf16")),
    "channels_last": Bool(), "compile": Bool(), "sync_bn": Bool(), "deterministic": Bool(),
    "workers": Optional(Int(0, 256)), "out": Optional(Str()),
}
assert FIELD_KINDS.keys() == FIELD_NAMES
# Tables a preset may hold for one command only; RunConfig ignores them (`[compare]`: the grid of kd compare).
COMMAND_TABLES = {"compare"}


def presets_dir() -> Path:
    """The presets shipped with the package (the repo's presets/ in a source checkout)."""
    try:
        return Path(str(resources.files("kdcli.presets")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "presets"


def list_presets() -> dict[str, str]:
    """Preset name -> its first comment line."""
    out = {}
    for path in sorted(presets_dir().glob("*.toml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def load_preset(name: str) -> dict[str, Any]:
    """Read presets/NAME.toml (or a path to a .toml file) into config keys."""
    path = Path(name)
    if path.suffix != ".toml":
        path = presets_dir() / f"{name}.toml"
        if not path.is_file():
            raise unknown("preset", name, list_presets(), "kd list presets")
    return read_config_file(path)


class FileLayer(dict):
    """Config keys read from a file; `source` names it in error messages."""

    def __init__(self, values: dict[str, Any], source: Path):
        super().__init__(values)
        self.source = source


def flag_name(key: str) -> str:
    return "--set" if key == "options" else f"--{key.replace('_', '-')}"


def read_config_file(path: Path) -> FileLayer:
    """A preset or config.toml as RunConfig fields (`[options]`: method options), each value type-checked."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise KdError(f"config file {path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise KdError(f"config file {path} is a folder", "pass the path of a .toml file") from None
    except OSError as exc:
        raise KdError(f"cannot read {path} ({exc.strerror})", "check the path and its permissions") from None
    except UnicodeDecodeError as exc:
        raise KdError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded)",
                      "TOML files are UTF-8: save it as UTF-8, or restore it if it was damaged") from None
    except tomllib.TOMLDecodeError as exc:
        raise KdError(f"{path} is not valid TOML: {exc}", "fix the syntax at the position shown") from None
    for key in values:
        if key not in FIELD_NAMES | COMMAND_TABLES:
            raise KdError(f"{path}: unknown key {key!r}", did_you_mean(key, FIELD_NAMES | COMMAND_TABLES))
    layer = FileLayer(values, path)
    check_layer(layer)
    return layer


def check_layer(layer: dict[str, Any]) -> dict[str, Any]:
    """Each value of a layer checked against the schema, named as its source wrote it (flag or file key)."""
    source = getattr(layer, "source", None)
    for key, value in layer.items():
        if value is None or key in COMMAND_TABLES:
            continue
        if key not in FIELD_KINDS:
            raise unknown("setting", key, FIELD_NAMES)
        where = f"{source}: {key} =" if source is not None else flag_name(key)
        layer[key] = schema.checked(FIELD_KINDS[key], value, where)
    return layer


def build_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge layers left to right (later wins; None means 'not given'); `options` tables merge too.

    Every layer is type-checked before the merge, the merged config against its ranges after it.
    """
    merged: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for layer in layers:
        for key, value in check_layer(layer if isinstance(layer, FileLayer) else dict(layer)).items():
            if value is None or key in COMMAND_TABLES:
                continue
            if key == "options":
                options.update(value)
            else:
                merged[key] = value
    config = RunConfig(**merged, options=options)
    config.validate()
    return config


def load_run_config(folder: str | Path) -> RunConfig:
    """The resolved config of the run in `folder` (its config.toml), validated like any other input."""
    path = Path(folder) / "config.toml"
    if not path.is_file():
        raise KdError(f"{folder} is not a kd run folder (no config.toml)", "pass the --out folder of an earlier run")
    return dataclasses.replace(build_config(read_config_file(path)), out=str(folder))


def parse_set_options(pairs: list[str]) -> dict[str, str]:
    """`--set key=value` pairs into a dict (values stay strings; the method coerces them)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise KdError(f"--set {pair!r} is not key=value", "write e.g. --set T=4")
        options[key.strip()] = value.strip()
    return options


def to_toml(config: RunConfig) -> str:
    """config.toml text (a real TOML writer: any path or string reads back); None values are omitted."""
    data = {key: value for key, value in config.to_dict().items() if value is not None}
    data["options"] = dict(sorted(data.get("options", {}).items()))
    data = _as_toml_values(data)
    text = tomli_w.dumps(data)
    if tomllib.loads(text) != data:  # kd only ever writes a file it reads back the same
        raise KdError("the run's settings cannot be written as TOML that reads back the same",
                      "use plain strings, numbers and booleans for --set values")
    return text


def _as_toml_values(value: Any) -> Any:
    """Tuples as lists, as TOML reads them back."""
    if isinstance(value, dict):
        return {key: _as_toml_values(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_toml_values(v) for v in value]
    return value
