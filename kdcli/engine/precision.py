"""Mixed precision: which dtype to autocast to on a device, and the autocast context for a step."""

from __future__ import annotations

import contextlib

import torch

from kdcli.errors import KdError

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
