"""PyTorch backend switches for a run, set in one place and restored afterwards.

- `--precision fp32` means fp32: TF32 (10-bit mantissa) is off for matmuls and cuDNN convolutions,
  otherwise Ampere+ GPUs round every fp32 conv and matmul input. Under bf16 the convolutions run
  in bf16 anyway; TF32 stays allowed for cuDNN there, but not for matmuls, whose fp32 remainder is
  the classifier and the losses that are kept in fp32 on purpose (precision.classifier_in_fp32).
- `cudnn.benchmark` (pick the fastest conv algorithm per shape) pays off when shapes are static, which
  the trainer guarantees (the ragged last batch runs on its own, see engine.capture).
- `--deterministic`: deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN's
  deterministic kernels, cuBLAS's fixed workspace), so that a resumed GPU run equals an uninterrupted
  one bit for bit. It costs speed (no cudnn.benchmark, slower deterministic backward kernels such as
  index_add/scatter) and raises an error for an operation that has no deterministic kernel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from kdcli.errors import KdError

CUBLAS_WORKSPACE = ":4096:8"  # the setting cuBLAS documents for reproducible results


def _snapshot() -> dict:
    return {
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def _apply(s: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = s["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = s["cudnn_tf32"]
    torch.backends.cudnn.benchmark = s["benchmark"]
    torch.backends.cudnn.deterministic = s["cudnn_deterministic"]
    torch.use_deterministic_algorithms(s["deterministic"], warn_only=s["warn_only"])
    if s["cublas"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = s["cublas"]


NO_DETERMINISTIC_KERNEL = "does not have a deterministic implementation"  # PyTorch's RuntimeError says


def no_deterministic_kernel(exc: RuntimeError) -> KdError:
    """The clean error for an operation PyTorch cannot run deterministically (its RuntimeError names it)."""
    op = str(exc).split(" does not have", 1)[0].split()[-1] if str(exc).strip() else "an operation"
    return KdError(
        f"--deterministic: {op} has no deterministic kernel on this device, and this network or method uses it",
        "drop --deterministic (results then vary slightly between runs and resumes), or use another architecture",
    )


def settings(precision: str, deterministic: bool = False, warn_only: bool = False) -> dict:
    """The backend switches for a run with `precision` ("fp32" or "bf16")."""
    return {
        "warn_only": warn_only,
        "matmul_tf32": False,
        "cudnn_tf32": precision == "bf16",
        "benchmark": not deterministic,
        "cudnn_deterministic": deterministic,
        "deterministic": deterministic,
        "cublas": CUBLAS_WORKSPACE if deterministic else os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


@contextlib.contextmanager
def run_backend(precision: str, deterministic: bool = False) -> Iterator[None]:
    """The run's switches inside the block, the previous ones after it (library callers, tests).

    Deterministic algorithms a caller already turned on stay on (with their warn_only setting).
    """
    before = _snapshot()
    warn_only = not deterministic and before["deterministic"] and before["warn_only"]
    _apply(settings(precision, deterministic or before["deterministic"], warn_only))
    try:
        yield
    finally:
        _apply(before)


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """Plain fp32 kernels, TF32 off, inside the block: for numerical checks (e.g. the BN fold's)."""
    before = _snapshot()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        _apply(before)
