"""The one place a run is assembled: networks, loaders and method from a RunConfig, or from objects.

`kd distill` builds everything from names in the RunConfig; the Python API may hand over ready
objects instead (`Sources`: an nn.Module student or teacher, a DataBundle over the user's Datasets).
Either way `build_training` returns the same parts for the one fit loop (engine.trainer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from kdcli import plugins
from kdcli.batch import Batch
from kdcli.config import RunConfig
from kdcli.data import DataBundle, make_loader
from kdcli.data.loaders import epoch_seed
from kdcli.engine import distributed
from kdcli.engine.trainer import Schedule
from kdcli.errors import KdError
from kdcli.methods import Method, Shapes
from kdcli.models import create_model, default_lr
from kdcli.models.features import classifier_of, forward_outputs
from kdcli.models.fold import fold_batchnorm
from kdcli.models.prerelu import stage_bns
from kdcli.teachers import is_external


RANK_STREAMS = 1 << 20  # seed streams of the DDP ranks' training draws, apart from the loaders' batch streams
CUSTOM_DATA = "custom"  # the config's name for data passed as Python objects


@dataclass(frozen=True)
class Sources:
    """Objects a run uses instead of building them from the config's names (Python API)."""

    student: nn.Module | None = None
    teacher: nn.Module | None = None
    bundle: DataBundle | None = None


def canonical(config: RunConfig) -> RunConfig:
    """The config with file plug-in specs made absolute, so the run and its weights reload from anywhere."""
    fields = {key: plugins.canonical_spec(getattr(config, key)) for key in ("student", "teacher_arch", "data")
              if plugins.is_plugin_spec(getattr(config, key))}
    return replace(config, **fields) if fields else config


def build_training(
    config: RunConfig, cls: type[Method], bundle: DataBundle, teacher: nn.Module | None, device: torch.device,
    world: distributed.World = distributed.World(), student: nn.Module | None = None,
) -> tuple[nn.Module, nn.Module | None, Method, Any, Any]:
    """(student, teacher, method, train loader, val loader) on `device` for a run of `config`.

    The student is `student` when given (trained in place), else created from `config.seed`; the
    (already loaded) teacher is moved to the device and its BatchNorm folded into its convolutions
    (a copy: a caller's teacher object keeps its layers); the method is built from one validation batch.
    """
    torch.manual_seed(config.seed)
    if student is None:
        from_published = config.pretrained if config.student_pretrained is None else config.student_pretrained
        student = create_model(config.student, num_classes=bundle.num_classes, pretrained=from_published and is_external(config.student))
    train_loader = make_loader(
        bundle.train, bundle, distributed.check_batch(config.batch_size, world), True, device, config.seed,
        config.workers, views=cls.needs.views, shard=(world.rank, world.size),
    )
    val_loader = make_loader(bundle.val, bundle, config.eval_batch_size, False, device, config.seed, config.workers)
    if config.sync_bn and world.enabled:
        if device.type != "cuda":
            raise KdError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)", "drop --sync-bn for CPU runs")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    student.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format)
    sample = next(iter(val_loader))
    method = build_method(cls, config, student, teacher, sample, bundle.train.labels).to(device)
    if teacher is not None:
        teacher, _ = fold_batchnorm(teacher, sample.x[:8], preact=cls.needs.preact)
    if world.enabled:  # weights and heads are drawn alike above; training draws (negatives, agent noise) per rank
        torch.manual_seed(epoch_seed(config.seed, 0, RANK_STREAMS + world.rank))
    return student, teacher, method, train_loader, val_loader


def schedule_of(config: RunConfig) -> Schedule:
    """The optimizer, lr schedule and step settings of `config`."""
    return Schedule(
        epochs=config.epochs,
        lr=config.lr or default_lr(config.student),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        milestones=config.milestone_epochs(),
        lr_decay=config.lr_decay,
        optimizer=config.optimizer,
        schedule=config.schedule,
        warmup_epochs=config.warmup_epochs,
        min_lr=config.min_lr,
        step_size=config.step_size,
        clip_grad=config.clip_grad,
        accumulate=config.accumulate,
        ema=config.ema,
        dot_delta=config.dot_delta,
    )


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
    cls: type[Method], config: RunConfig, student: nn.Module, teacher: nn.Module | None, batch: Batch, train_labels: torch.Tensor
) -> Method:
    """The method, built from the networks' shapes (dry run on one batch) and its --set options."""
    x = batch.x[:2]
    student_shapes = shapes_of(student, x)
    teacher_shapes = shapes_of(teacher, x) if teacher is not None else Shapes()
    for role, model, shapes in (("student", student, student_shapes), ("teacher", teacher, teacher_shapes)):
        if model is not None:
            check_provides(cls, config.method, role, model, shapes)
    head = classifier_of(teacher) if cls.needs.teacher_head and teacher is not None else None
    extra = {"teacher_bn": stage_bns(teacher)} if cls.needs.teacher_bn and teacher is not None else {}
    torch.manual_seed(config.seed + 1)
    method = cls(
        student_shapes, teacher_shapes, len(train_labels), teacher_head=head, train_labels=train_labels,
        **extra, **config.options,
    )
    method.label_smoothing = config.label_smoothing
    return method


def check_provides(cls: type[Method], method: str, role: str, model: nn.Module, shapes: Shapes) -> None:
    """Refuse a method whose inputs the network does not give, naming what kd could not find in it."""
    name = type(model).__name__
    if cls.needs.features and not shapes.features:
        raise KdError(
            f"method {method!r} needs stage feature maps, and kd found {len(shapes.features)} in the {role} {name}",
            "kd takes, among the network's top-level children (one nn.Sequential level unfolded), the last module "
            "producing each spatial resolution of 4-D maps; build your network from stage modules, "
            "or use a logits method such as kd or dkd",
        )
    if cls.needs.embedding and not shapes.embedding:
        raise KdError(
            f"method {method!r} needs the pooled embedding, and the {role} {name} feeds no [B, D] vector to its final nn.Linear",
            "end the network with pooling and an nn.Linear classifier, or use a logits method such as kd",
        )
