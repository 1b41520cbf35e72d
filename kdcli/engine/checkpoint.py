"""Atomic, pickle-free checkpoints: tensors in one safetensors file, everything else as JSON in its header.

Nested states (optimizer state dicts, RNG states, method state) are flattened: each tensor is
stored under a dotted path and replaced by a placeholder in the JSON skeleton, so any structure of
dicts, lists, numbers, strings and tensors round-trips without pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kdcli import __version__
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
    except (SafetensorError, KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError, OSError) as exc:
        raise KdError(
            f"checkpoint {path} is unreadable ({exc})",
            "it may be truncated or not written by kd; start a fresh run or point at another run folder",
        ) from None


def _unreadable(path: Path, why: str) -> KdError:
    return KdError(
        f"checkpoint {path} is inconsistent ({why})",
        "it was not written by this kd run or was edited; start a fresh run (--overwrite) or point at another run folder",
    )


def load_resume_state(path: Path, epochs: int) -> dict[str, Any]:
    """A resume checkpoint (`load_state`), its header checked field by field before anything is restored:
    a forged or damaged file is refused with a message, never half-applied."""
    state = load_state(path)
    if not isinstance(state, dict):
        raise _unreadable(path, "its state is not a table")
    if state.get("kdcli_version") != __version__:
        return state  # another kd's layout: the caller refuses it by version, which says more
    tables = ("student", "method", "optimizer", "method_optimizers")
    missing = [key for key in ("epoch", "best_top1", "best_epoch", "ranks", *tables) if key not in state]
    if missing:
        raise _unreadable(path, "no " + ", ".join(missing))
    epoch, best_epoch = state["epoch"], state["best_epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= epochs:
        raise _unreadable(path, f"epoch {epoch!r} is not a whole number of epochs from 0 to {epochs}")
    if isinstance(best_epoch, bool) or not isinstance(best_epoch, int) or not 0 <= best_epoch <= epoch:
        raise _unreadable(path, f"best epoch {best_epoch!r} is not in 0..{epoch}")
    if isinstance(state["best_top1"], bool) or not isinstance(state["best_top1"], (int, float)):
        raise _unreadable(path, f"best top-1 {state['best_top1']!r} is not a number")
    bad = [key for key in tables if not isinstance(state[key], dict)]
    if bad:
        raise _unreadable(path, ", ".join(bad) + " not a table")
    partial = state.get("partial")
    if partial is not None and not (isinstance(partial, dict) and partial.get("epoch") == epoch + 1):
        raise _unreadable(path, "its mid-epoch state does not follow its last epoch")
    ranks = state["ranks"]
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, dict) for r in ranks):
        raise _unreadable(path, "its per-process states are not a list of tables")
    for share in ranks:
        rng = share.get("rng")
        if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
            raise _unreadable(path, "no torch RNG state")
        if partial is not None and not isinstance(share.get("sums"), dict):
            raise _unreadable(path, "its mid-epoch state has no running sums")
    return state


@contextmanager
def restoring(path: Path):
    """Loading a checked state into the run's modules: a state that does not fit them is the file's fault."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise _unreadable(path, f"it does not fit this run: {str(exc).strip().splitlines()[0][:200]}") from None


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The CPU generator's state, and that of `device`'s generator when it is a GPU (this process's own:
    under DDP each rank owns one GPU, and the others' generators are not its to save)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state`'s streams; a GPU stream saved on another GPU (another rank's) is set on `device`'s."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
