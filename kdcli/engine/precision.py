"""Mixed precision: which dtype to autocast to on a device, and the autocast context for a step."""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch import nn

from kdcli.errors import KdError
from kdcli.losses import full_precision
from kdcli.models.features import classifier_of

PRECISIONS = ("auto", "fp32", "bf16")


def has_fast_bf16(device: torch.device) -> bool:
    """bf16 matmul units: CUDA sm80+ (Ampere, Hopper), or CPUs with AMX / AVX512-BF16 via oneDNN."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for `--precision name` on `device`."""
    if name not in PRECISIONS:
        raise KdError(f"--precision {name!r} is invalid", "use auto, fp32 or bf16")
    if name == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise KdError("--precision bf16 asked for, but this GPU has no bf16 support", "use --precision fp32")
    return name


def autocast(device: torch.device, precision: str):
    """The step's context: bf16 autocast, or nothing for fp32.

    Only the networks and heads run in bf16: every loss (`kdcli.losses`, the contrastive
    objectives, ITKD's agent) switches autocast off and promotes its inputs to fp32, and
    cross-entropy is fp32 by autocast's own policy on CPU and CUDA alike.
    """
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def classifier_in_fp32(model: nn.Module) -> None:
    """Make `model`'s final Linear compute the logits in fp32 under autocast (a no-op without one).

    Every loss reads the logits; made in bf16 they carry ~3 significant digits, and on digits that
    cost the students ~0.8 top-1 points against fp32, which an fp32 classifier on both networks
    recovers (benchmarks/README.md). The layer is a tiny part of the step. Weights, names and
    state_dict stay those of the Linear: only the instance's class changes, to a subclass.
    """
    try:
        head = classifier_of(model)
    except KdError:
        return
    head.__class__ = _fp32_subclass(type(head))


@functools.cache
def _fp32_subclass(linear: type[nn.Linear]) -> type[nn.Linear]:
    if getattr(linear, "fp32_under_autocast", False):
        return linear
    forward = full_precision(linear.forward)  # the losses' wrapper: autocast off, bf16 inputs promoted
    return type(f"Fp32{linear.__name__}", (linear,), {"forward": forward, "fp32_under_autocast": True})


_MATMUL_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def frozen_bf16_copy(model: nn.Module) -> nn.Module:
    """A copy of the frozen `model` whose conv and linear weights are stored in bf16, to run under
    bf16 autocast without autocast re-casting every weight on every step.

    The cast rounds exactly as autocast's per-step cast does, so the outputs are autocast's. Kept
    in fp32: the final classifier (see `classifier_in_fp32`) and normalisation layers, whose kernels
    take bf16 inputs with fp32 parameters as autocast gives them. The original stays fp32 (it is
    what evaluation and the saved teacher use).
    """
    copied = copy.deepcopy(model)
    try:
        head = classifier_of(copied)
    except KdError:
        head = None
    for module in copied.modules():
        if isinstance(module, _MATMUL_LAYERS) and module is not head:
            module.to(torch.bfloat16)
    return copied
