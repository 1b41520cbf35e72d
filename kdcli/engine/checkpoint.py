"""Atomic, pickle-free checkpoints: tensors in one safetensors file, everything else as JSON in its header.

Nested states (optimizer state dicts, RNG states, method state) are flattened: each tensor is
stored under a dotted path and replaced by a placeholder in the JSON skeleton, so any structure of
dicts, lists, numbers, strings and tensors round-trips without pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kdcli.errors import KdError

_TENSOR = "__tensor__"
STATE_KEY = "kdcli.state"


def flatten(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON-able skeleton of `state`; its tensors are moved into `tensors` under dotted keys."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous()
        return {_TENSOR: prefix}
    if isinstance(state, dict):
        # JSON keys are strings: remember integer keys (optimizer state is keyed by param index).
        return {
            "__dict__": [
                [key, flatten(value, f"{prefix}.{key}", tensors)] for key, value in state.items()
            ]
        }
    if isinstance(state, (list, tuple)):
        return [flatten(value, f"{prefix}.{i}", tensors) for i, value in enumerate(state)]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot checkpoint a {type(state).__name__} at {prefix}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        return {key: unflatten(value, tensors) for key, value in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten(value, tensors) for value in skeleton]
    return skeleton


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, and rename it over `path`: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_state(path: Path, state: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write a nested state (tensors anywhere inside) to `path` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, "s", tensors)
    header = dict(metadata or {})
    header[STATE_KEY] = json.dumps(skeleton)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_state(path: Path) -> dict[str, Any]:
    """Read a state written by `save_state`."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        return unflatten(json.loads(header[STATE_KEY]), tensors)
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise KdError(
            f"checkpoint {path} is unreadable ({exc})",
            "it may be truncated or not written by kd; start a fresh run or point at another run folder",
        ) from None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
