"""The resolved description of a run: preset TOML < CLI flags, saved beside the run as config.toml."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from kdcli.errors import KdError, did_you_mean, unknown

# RepDistiller's CIFAR-100 milestones (150, 180, 210 of 240 epochs), kept as fractions so that they
# scale with --epochs.
DEFAULT_MILESTONE_FRACTIONS = (150 / 240, 180 / 240, 210 / 240)


@dataclass
class RunConfig:
    """Everything that determines a run. Field names are the preset/config.toml keys."""

    command: str = "distill"  # "train" or "distill"
    student: str = "resnet20"  # for `kd train`: the network being trained
    pretrained: bool = False  # timm:/tv: student starts from its published weights (and a timm:/tv: teacher uses them)
    teacher: str | None = None
    teacher_arch: str | None = None
    teacher_sha256: str | None = None  # recorded by the run: sha256 of the teacher's weights file
    teacher_source: str | None = None  # recorded by the run: where those weights came from
    method: str = "kd"
    options: dict[str, Any] = field(default_factory=dict)  # method hyperparameters (--set)
    data: str = "cifar100"
    data_dir: str | None = None
    download: bool = False
    epochs: int = 240
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float | None = None  # None: 0.05, or 0.01 for MobileNetV2/ShuffleNet students
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] | None = None  # None: 150/180/210 of 240, scaled to --epochs
    lr_decay: float = 0.1
    optimizer: str = "sgd"  # "dot": DOT's separate task/distillation momenta (kdcli.engine.dot)
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
        """Reject numbers no run can use, before anything is written."""
        checks = [
            (self.epochs >= 1, "epochs", self.epochs, "at least 1"),
            (self.batch_size >= 1, "batch-size", self.batch_size, "at least 1"),
            (self.eval_batch_size >= 1, "eval-batch-size", self.eval_batch_size, "at least 1"),
            (self.lr is None or self.lr > 0, "lr", self.lr, "a positive number"),
            (self.momentum >= 0, "momentum", self.momentum, "0 or more"),
            (self.weight_decay >= 0, "weight-decay", self.weight_decay, "0 or more"),
            (0 < self.lr_decay <= 1, "lr-decay", self.lr_decay, "in (0, 1]"),
            (self.workers is None or self.workers >= 0, "workers", self.workers, "0 or more"),
        ]
        for ok, name, value, expected in checks:
            if not ok:
                raise KdError(f"--{name} {value} is invalid", f"use {expected}")
        if self.optimizer not in ("sgd", "dot"):
            raise KdError(f"--optimizer {self.optimizer!r} is invalid", "use sgd or dot")
        if not 0 <= self.dot_delta <= self.momentum or self.momentum + self.dot_delta >= 1:
            raise KdError(f"--dot-delta {self.dot_delta} is invalid with --momentum {self.momentum}",
                          "use 0 <= delta <= momentum with momentum + delta < 1, e.g. 0.075")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise KdError(f"--precision {self.precision!r} is invalid", "use auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise KdError(f"--device {self.device!r} is invalid", "use auto, cpu, cuda or cuda:N")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = {f.name for f in fields(RunConfig)}
# Written by the run itself (what the teacher was), not settings a user chooses.
RECORDED_FIELDS = {"teacher_sha256", "teacher_source"}
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


def read_config_file(path: Path) -> dict[str, Any]:
    """A preset or config.toml as a dict of RunConfig fields; `[options]` holds method options."""
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise KdError(f"config file {path} does not exist", "check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise KdError(f"{path} is not valid TOML: {exc}", "fix the syntax at the position shown") from None
    for key in values:
        if key not in FIELD_NAMES | COMMAND_TABLES:
            raise KdError(f"{path}: unknown key {key!r}", did_you_mean(key, FIELD_NAMES | COMMAND_TABLES))
    return values


def build_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge layers left to right (later wins; None means 'not given'); `options` tables merge too."""
    merged: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None or key in COMMAND_TABLES:
                continue
            if key == "options":
                options.update(value)
            else:
                merged[key] = value
    config = RunConfig(**merged, options=options)
    config.validate()
    return config


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
    """config.toml text: top-level keys, then the [options] table. None values are omitted."""
    data = config.to_dict()
    options = data.pop("options")
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if value is not None]
    lines += ["", "[options]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in sorted(options.items())]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
