"""The Method base class, what a method needs from the engine, and the method registry."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.batch import Batch
from kdcli.errors import KdError, unknown
from kdcli.losses import kd_loss
from kdcli.models.features import Outputs


@dataclass(frozen=True)
class Needs:
    """What a method asks the engine for beyond logits."""

    features: bool = False  # stage feature maps
    preact: bool = False  # ... taken before the final ReLU of each stage
    embedding: bool = False  # pooled penultimate vector
    index: bool = False  # dataset index of each sample (memory banks, per-sample state)
    views: str | None = None  # extra views the loader builds: "rotations" (3 more) or "strong" (1 more)
    joint_views: bool = True  # run x and its views through a network in one pass (shared BN stats)
    teacher: bool = True  # False: the teacher is never run (plain training)
    teacher_head: bool = False  # the frozen teacher classifier's weight/bias as buffers (CRCD)
    teacher_preact: bool = False  # the teacher's features before each stage's final ReLU (ReviewKD)
    teacher_bn: bool = False  # the teacher's BatchNorms before each stage's ReLU, given to __init__ (OFD)
    teacher_batch_stats: bool = False  # teacher BN normalises with batch statistics (buffers untouched; OFD)


@dataclass(frozen=True)
class Shapes:
    """Shapes of one network's outputs, read from a dry run on one batch (batch dim dropped)."""

    features: list[tuple[int, ...]] = field(default_factory=list)
    embedding: int = 0
    num_classes: int = 0


class Method(nn.Module):
    """A distillation method: an nn.Module that owns its trainable heads and state.

    Subclasses set the class attributes, and override `distill` to return their own weighted
    terms; the cross-entropy (`ce`) and Hinton KD (`kd`, temperature `T`) terms every method may
    carry are added here, so the weights of all three follow RepDistiller's
    `L = gamma*CE + alpha*KD + beta*L_method` convention.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    year: ClassVar[int] = 0
    needs: ClassVar[Needs] = Needs()
    defaults: ClassVar[dict[str, Any]] = {"ce": 1.0, "kd": 0.0, "T": 4.0}
    label_smoothing: float = 0.0  # of every ce term (`--label-smoothing`, set by the run's builder)
    # Valid values of options (see RANGES); merged along the class hierarchy, so a subclass names only
    # its own. An undeclared numeric option must still be finite; loss weights default to nonnegative.
    ranges: ClassVar[dict[str, str]] = {"ce": "nonnegative", "kd": "nonnegative", "T": "positive"}

    def __init__(
        self,
        student: Shapes,
        teacher: Shapes,
        num_samples: int,
        teacher_head: nn.Linear | None = None,
        train_labels: Tensor | None = None,
        **hparams: Any,
    ):
        """`num_samples`: training-set size (memory banks). `teacher_head`: given when needs.teacher_head;
        kept as non-persistent buffers `teacher_head_weight` [C, D] / `teacher_head_bias` [C].
        `train_labels`: the label of every training sample [num_samples] when known (class-aware
        negatives); None in unit tests that build a method by hand."""
        super().__init__()
        self.student_shapes = student
        self.teacher_shapes = teacher
        self.num_samples = num_samples
        self.hp = resolve_hparams(type(self), hparams)
        self.epoch = 1
        self.epochs = 1
        self.train_labels = train_labels
        if teacher_head is not None:
            bias = teacher_head.bias if teacher_head.bias is not None else teacher_head.weight.new_zeros(teacher_head.out_features)
            self.register_buffer("teacher_head_weight", teacher_head.weight.detach().clone(), persistent=False)
            self.register_buffer("teacher_head_bias", bias.detach().clone(), persistent=False)

    def forward(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        """Named, already weighted loss terms; the trainer minimises their sum.

        With `needs.views`, `s` and `t` cover `[x; views]` stacked along dim 0 (the first
        `batch.y.numel()` rows are the plain batch); override `forward` to use the views.
        In the initialisation stage (`self.stage == "init"`) the terms are `init_terms`.
        """
        if self.stage == "init":
            return self.init_terms(s, t, batch)
        terms: dict[str, Tensor] = {}
        if self.hp["ce"]:
            terms["ce"] = self.hp["ce"] * self.cross_entropy(s.logits, batch.y)
        if self.hp["kd"] and t is not None:
            terms["kd"] = self.hp["kd"] * self.kd_term(s.logits, t.logits)
        terms.update(self.distill(s, t, batch))
        return terms

    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """The hard-label loss of every method's `ce` term, with the run's label smoothing."""
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The unweighted `kd` term: Hinton KD at temperature `T`. Override to change how the
        logits are compared (standardised logits, a learned temperature), not which terms exist."""
        return kd_loss(student_logits, teacher_logits, self.hp["T"])

    def distill(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        """The method's own weighted terms (none for plain CE / KD)."""
        return {}

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called before each 1-based training epoch (schedules, warm-ups, curricula)."""
        self.epoch, self.epochs = epoch, epochs

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the student's optimizer updates jointly with the student."""
        return [p for p in self.parameters() if p.requires_grad]

    def epoch_metrics(self) -> dict[str, float]:
        """Extra per-epoch values for metrics.jsonl (e.g. mean chosen temperature); read at epoch end."""
        return {}

    def running_state(self) -> dict[str, Any]:
        """State that lives only inside an epoch (e.g. a rollout waiting for its reward, per-epoch sums):
        tensors, numbers, lists and dicts; checkpointed when a run stops mid-epoch."""
        return {}

    def load_running_state(self, state: dict[str, Any]) -> None:
        """Restore `running_state()` after `on_epoch_start` of the resumed epoch."""

    def own_optimizers(self) -> dict[str, Any]:
        """Optimizers the method steps itself (e.g. an RL agent's Adam); checkpointed by the engine."""
        return {}

    def image_edits(self, epoch: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """(targets, sources, rho) to mix into the in-memory training images for 1-based main `epoch`
        only (image[t] = rho * image[s] + (1 - rho) * image[t]; ITKD's purification), or None."""
        return None

    # ---- the initialisation stage (RepDistiller --init_epochs: AB, FT, FSP, two-stage FitNet) ----
    # A method with an `init_epochs` option > 0 gets that many epochs before the main ones, with
    # its own SGD over `init_parameters` at the constant lr `init_lr`, minimising `init_terms`.
    stage: str = "main"

    def init_epochs(self) -> int:
        return int(self.hp.get("init_epochs", 0))

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """What the init stage trains: by default the student's feature layers (all but the
        classifier, RepDistiller's get_feat_modules) and the method's own trainable parameters."""
        from kdcli.models.features import classifier_of

        head = {id(p) for p in classifier_of(student).parameters()}
        return [p for p in student.parameters() if id(p) not in head] + self.trainable_parameters()

    def init_trains_student(self) -> bool:
        """Whether the student runs in train mode (BN statistics update) during the init stage."""
        return True

    def init_lr(self, lr: float) -> float:
        """The init stage's constant lr: the `init_lr` option when > 0, else the main lr."""
        return float(self.hp.get("init_lr", 0.0)) or lr

    def init_terms(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError(f"{self.name} has no initialisation stage")


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a Method available as `--method NAME`."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_class(name: str) -> type[Method]:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise unknown("method", name, _REGISTRY, "kd list methods")
    return _REGISTRY[name]


def list_methods() -> dict[str, type[Method]]:
    _load_builtin_methods()
    return dict(sorted(_REGISTRY.items()))


# What each range name admits (the `ranges` convention shared by every method).
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "positive": (lambda x: x > 0, "a finite number above 0"),
    "nonnegative": (lambda x: x >= 0, "a finite number, not negative"),
    "fraction": (lambda x: 0 <= x <= 1, "a number from 0 to 1"),
    "count": (lambda x: x >= 1 and float(x).is_integer(), "a positive integer (1 or more)"),
    "any": (lambda x: True, "a finite number"),
}


def hparam_ranges(cls: type[Method]) -> dict[str, str]:
    """The declared range of every option of `cls`, base classes first, the subclass's own last."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass).get("ranges", {}))
    return merged


def resolve_hparams(cls: type[Method], overrides: dict[str, Any]) -> dict[str, Any]:
    """The class defaults updated with `overrides`, each coerced to its default's type and checked against its range."""
    resolved = dict(cls.defaults)
    ranges = hparam_ranges(cls)
    for key, value in overrides.items():
        if key not in resolved:
            raise unknown(f"option for method {cls.name!r}:", key, resolved)
        resolved[key] = check_range(key, coerce(key, value, resolved[key]), ranges.get(key, "any"), cls.defaults[key])
    return resolved


def check_range(key: str, value: Any, kind: str, default: Any = None) -> Any:
    """`value` if it is finite and inside the range named `kind` (lists: every item); a KdError otherwise."""
    admits, expected = RANGES[kind]
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue  # switches and names: the method checks their choices
        try:
            finite = math.isfinite(item)
        except OverflowError:  # an integer beyond any float
            finite = False
        if not finite or not admits(item):
            raise KdError(f"option {key}={item!r} is out of range: {key} must be {expected}", f"the default is --set {key}={default}" if default is not None else f"use {expected}")
    return value


def coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a `--set` value (often a string) to the type of the default; refuse a value of another type."""
    if default is None:
        return value
    if not isinstance(value, str):
        return _typed(key, value, default)
    try:
        if isinstance(default, bool):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes", "on")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (list, tuple)):
            return type(default)(coerce(key, v.strip(), default[0] if default else "") for v in value.split(",") if v.strip())
    except ValueError:
        raise KdError(
            f"option {key}={value!r} is not a valid {type(default).__name__}",
            f"write it like {key}={default!r}",
        ) from None
    return value


def _typed(key: str, value: Any, default: Any) -> Any:
    """A non-string value (a preset's TOML `T = true`) must have the default's type; ints pass as floats."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok and abs(value) < 1e308 else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        if ok and default:
            value = type(default)(_typed(key, v, default[0]) for v in value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise KdError(
            f"option {key}={value!r} is not a valid {type(default).__name__}",
            f"write it like {key}={default!r}",
        )
    return value


def _load_builtin_methods() -> None:
    import kdcli.methods  # noqa: F401  (registers the built-in methods)
