"""Research checkpoints (`.pth`) read without ever running code from them.

The published RepDistiller/mdistiller teachers are not bare state dicts: beside the tensors under
`model` they hold numpy scalars (the accuracy), numpy arrays, an argparse Namespace, optimizer
state. kd reads them in three steps, each before the next touches more of the file:
1. bounds from the zip directory (what every entry would expand to) or, for the older format, the
   storages the pickle declares against the file size: a compression bomb is refused unpacked;
2. a scan of the pickle (kdcli.teachers.pickle_scan) naming every global it would look up: any name
   outside SAFE_GLOBALS is refused by name, nothing imported or called;
3. `torch.load(weights_only=True)` with exactly those inert types allowed (torch's safe globals),
   so torch's own restricted unpickler stays the one that builds the objects.
"""

from __future__ import annotations

import importlib
import re
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from kdcli.errors import KdError
from kdcli.teachers.pickle_scan import PickleTooLarge, Scan, scan

GiB = 1 << 30
MAX_EXPANDED_BYTES = 4 * GiB  # far above any CIFAR/ImageNet teacher (resnet32x4: 30 MB)
MAX_EXPANSION = 32  # declared size / file size; torch stores entries uncompressed (ratio ~1)
EXPANSION_FLOOR = 64 << 20  # small files may declare up to this much regardless of the ratio
MAX_PICKLE_BYTES = 256 << 20
MAX_ENTRIES = 100_000

_CONVERT_HINT = (
    "kd reads only tensors, numbers, numpy values, Namespace and plain containers from a .pth; convert it "
    "where it was made: torch.save(model.state_dict(), F), or save it as .safetensors"
)
_NUMPY_PATHS = {  # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core
    "scalar": ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"),
    "_reconstruct": ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"),
}


def _torch_globals() -> set[str]:
    rebuild = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state")
    names = {f"torch._utils.{name}" for name in rebuild}
    names |= {"torch.Size", "torch.device", "torch.nn.parameter.Parameter", "torch.serialization._get_layout"}
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) or (name.endswith("Storage") and isinstance(value, type)):
            names.add(f"torch.{name}")
    return names


SAFE_GLOBALS: frozenset[str] = frozenset(
    _torch_globals()
    | {"collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.bytearray",
       "builtins.complex", "argparse.Namespace", "numpy.ndarray", "numpy.dtype"}
    | {path for paths in _NUMPY_PATHS.values() for path in paths}
)


def read_checkpoint(path: Path) -> Any:
    """The object a `.pth` holds, loaded only after its bounds and globals were checked."""
    inspect(path)
    try:
        with _allowed_globals():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of an untrusted file is the user's input
        raise KdError(f"refused to load {path}: not a readable PyTorch checkpoint ({_plain(exc)})", _CONVERT_HINT) from None


def inspect(path: Path) -> Scan:
    """Refuse a file that would expand beyond reason or name a global outside SAFE_GLOBALS."""
    try:
        with open(path, "rb") as handle:
            zipped = handle.read(4) == b"PK\x03\x04"
        result = _inspect_zip(path) if zipped else _inspect_legacy(path)
    except KdError:
        raise
    except PickleTooLarge as exc:
        raise KdError(f"refused {path}: its pickle is larger than any checkpoint ({exc})", _CONVERT_HINT) from None
    except (zipfile.BadZipFile, ValueError, IndexError, EOFError, OSError) as exc:
        raise KdError(
            f"refused to load {path}: truncated, corrupt or not a PyTorch checkpoint ({_plain(exc)})",
            "copy the file again, or pass another checkpoint",
        ) from None
    unsafe = [name for name in result.globals if name not in SAFE_GLOBALS]
    if unsafe:
        named = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
        raise KdError(f"refused {path}: the file would have to run code ({named}) to load and was not loaded", _CONVERT_HINT)
    return result


def _inspect_zip(path: Path) -> Scan:
    """torch's zip format: sizes from the central directory, then the scan of `<root>/data.pkl`."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
        if len(entries) > MAX_ENTRIES:
            raise _bomb(path, f"{len(entries):,} entries")
        declared = sum(entry.file_size for entry in entries)
        if declared > min(MAX_EXPANDED_BYTES, max(EXPANSION_FLOOR, MAX_EXPANSION * size)):
            raise _bomb(path, f"{size:,} bytes that would expand to {declared:,}")
        pickles = [e for e in entries if e.filename.count("/") == 1 and e.filename.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise zipfile.BadZipFile("no single <name>/data.pkl inside")
        if pickles[0].file_size > MAX_PICKLE_BYTES:
            raise _bomb(path, f"a {pickles[0].file_size:,}-byte pickle")
        with archive.open(pickles[0]) as stream:
            return scan(stream)


def _inspect_legacy(path: Path) -> Scan:
    """torch's pre-1.6 format: up to five pickles (magic, protocol, system info, object, storage keys)
    followed by the raw storages, which must fit in the file."""
    size = path.stat().st_size
    result = Scan()
    with open(path, "rb") as stream:
        for _ in range(5):
            if stream.tell() >= size:
                break
            scan(stream, result)
    declared = sum(max(count, 0) * _element_size(kind) for kind, count in result.storages)
    if any(count < 0 for _, count in result.storages) or declared > size:
        raise _bomb(path, f"{size:,} bytes whose tensors claim {declared:,}")
    return result


_ELEMENT_SIZES = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8,
}


def _element_size(storage_type: str) -> int:
    """Bytes per element of a legacy storage class name (torch.FloatStorage: 4); untyped: 1."""
    return _ELEMENT_SIZES.get(storage_type.rpartition(".")[2].removesuffix("Storage"), 1)


def _bomb(path: Path, what: str) -> KdError:
    return KdError(
        f"refused {path}: {what}, more than a checkpoint can hold (a compression bomb or a corrupt file); not unpacked",
        "pass the original checkpoint; kd reads .pth files of up to 4 GiB unpacked",
    )


@contextmanager
def _allowed_globals() -> Iterator[None]:
    """torch's safe globals for the inert non-torch types in SAFE_GLOBALS, for this load only."""
    serialization = torch.serialization
    registered = set(serialization.get_safe_globals())
    extra = [item for item in _numpy_and_namespace() if item not in registered]  # the user's own stay
    if hasattr(serialization, "safe_globals"):  # torch >= 2.5
        with serialization.safe_globals(extra):
            yield
        return
    before = serialization.get_safe_globals()  # torch 2.4
    serialization.add_safe_globals(extra)
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(before)


def _numpy_and_namespace() -> list[Any]:
    import argparse

    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype]
    allowed += list({type(np.dtype(code)) for code in np.typecodes["All"]})
    for name, paths in _NUMPY_PATHS.items():
        target = getattr(_numpy_multiarray(), name)
        allowed += [_alias(target, path) for path in paths]
    return allowed


def _numpy_multiarray():
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")


def _alias(target, path: str):
    """`target` under the dotted name a pickle uses for it: torch matches allowed globals by
    `__module__` + `__qualname__`, and numpy moved these functions between versions."""
    module, _, name = path.rpartition(".")

    def call(*args):
        return target(*args)

    call.__module__, call.__name__, call.__qualname__ = module, name, name
    return call


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _plain(exc: BaseException) -> str:
    """A short, one-line reason in plain text (torch's messages carry escape codes and pages of advice)."""
    text = _ANSI.sub("", str(exc)).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), type(exc).__name__)
    line = line.removeprefix("Weights only load failed.").strip() or type(exc).__name__
    return line if len(line) <= 160 else line[:157].rsplit(" ", 1)[0] + "..."


# Where the tensors of a checkpoint live: RepDistiller/mdistiller `model`, CRD's `snet` (student
# network), other trainers' `state_dict`/`net`/`student`, or the bare state dict itself.
WRAPPER_KEYS = ("model", "state_dict", "snet", "student", "net")
_PREFIXES = ("module.", "student.", "model.")
_ACCURACY_KEYS = ("accuracy", "best_acc", "acc", "test_acc", "top1")


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint, with DataParallel/wrapper prefixes removed; the rest is ignored."""
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KdError(
            f"{path} holds no state_dict",
            "expected a dict of tensors, or RepDistiller's {'model': state_dict, ...}",
        )
    return OrderedDict((_strip_prefixes(str(key)), value) for key, value in obj.items())


def stored_accuracy(obj: Any) -> float | None:
    """The top-1 a trainer stored beside the weights (a float, numpy scalar or tensor), if any."""
    if not isinstance(obj, dict):
        return None
    for key in _ACCURACY_KEYS:
        value = obj.get(key)
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            continue
        return number
    return None


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key
