"""User code named on the command line: `pkg.module:factory` or `path/to/file.py:factory`.

A spec names exactly one callable; kd imports that module (found on the Python path, or the one
file) and nothing else. Any failure inside the user's code - the import, the call, a wrong return
type - becomes a KdError quoting the exception's last line, so the CLI exits 2 without a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from torch import nn

from kdcli.errors import KdError

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_BUILT_IN_SOURCES = ("timm", "tv", "imagefolder", "synthetic")
SPEC_HINT = "write pkg.module:factory (importable from the Python path) or path/to/file.py:factory"


def is_plugin_spec(spec: object) -> bool:
    """`pkg.module:factory` (a dotted module) or `some/file.py:factory`; timm:/tv:/dataset names are not."""
    if not isinstance(spec, str):
        return False
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or source in _BUILT_IN_SOURCES:
        return False
    return source.endswith(".py") or ("." in source and bool(_DOTTED.match(source)))


def canonical_spec(spec: str) -> str:
    """The spec as recorded in weights and configs: a file path made absolute, so it reloads from anywhere."""
    source, _, attr = spec.rpartition(":")
    if source.endswith(".py"):
        return f"{Path(source).expanduser().resolve()}:{attr}"
    return spec


def load_callable(spec: str, what: str = "factory") -> Callable[..., Any]:
    """The callable a spec names, importing only its module."""
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr:
        raise KdError(f"{spec!r} is not a {what} spec", SPEC_HINT)
    if source.endswith(".py"):
        module = _import_file(Path(source).expanduser(), spec)
    else:
        if not _DOTTED.match(source):
            raise KdError(f"{spec!r}: {source!r} is not a module name", SPEC_HINT)
        try:
            module = _import_module(source)
        except ModuleNotFoundError as exc:
            if exc.name and source.startswith(exc.name) and (source == exc.name or source.startswith(exc.name + ".")):
                raise KdError(
                    f"cannot import {source!r} for {spec!r}: no module named {exc.name!r}",
                    "run kd from the folder that holds the package, put it on the Python path (PYTHONPATH, pip install -e .), or pass path/to/file.py:factory",
                ) from None
            raise user_error(spec, "importing", exc) from exc
        except Exception as exc:  # noqa: BLE001 - any failure of the user's module is their input
            raise user_error(spec, "importing", exc) from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise KdError(f"{spec!r}: module {source!r} has no {attr!r}", f"define {attr} in {source}, or fix the name after the colon")
    if not callable(target):
        raise KdError(f"{spec!r}: {attr!r} is not callable", "name a function or class that builds the object")
    return target


def _import_module(source: str):
    """Import `source` from the Python path, else from the current folder (as `python -m` would)."""
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        here = str(Path.cwd())
        top = source.partition(".")[0]
        if exc.name != top or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(source)


def _import_file(path: Path, spec: str):
    if not path.is_file():
        raise KdError(f"{spec!r}: there is no file {path}", SPEC_HINT)
    name = "kdcli_user_" + re.sub(r"\W", "_", str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        del sys.modules[name]
        raise user_error(spec, "importing", exc) from exc
    return module


def user_error(spec: str, doing: str, exc: BaseException) -> KdError:
    """A KdError naming the spec and the user's exception, with the line of user code that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/kdcli/" not in f.filename.replace("\\", "/") and "importlib" not in f.filename]
    where = f" at {Path(user[-1].filename).name}:{user[-1].lineno}" if user else ""
    text = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {text[-1]}" if text else type(exc).__name__
    return KdError(f"{spec} failed while {doing}{where}: {reason}", "fix that code and run again (`kd --debug ...` shows the whole traceback)")


def build_model(spec: str, num_classes: int) -> nn.Module:
    """`factory(num_classes=N)` of a model spec, checked to be an nn.Module."""
    factory = load_callable(spec)
    try:
        model = factory(num_classes=num_classes)
    except Exception as exc:  # noqa: BLE001
        raise user_error(spec, f"calling it with num_classes={num_classes}", exc) from exc
    if not isinstance(model, nn.Module):
        raise KdError(
            f"{spec} returned {type(model).__name__}, not a torch nn.Module",
            "the factory must return the network: def factory(num_classes): return MyNet(num_classes)",
        )
    return model


def call_data_factory(spec: str) -> tuple:
    """`factory()` of a data spec: (train, val) or (train, val, num_classes)."""
    factory = load_callable(spec)
    try:
        result = factory()
    except Exception as exc:  # noqa: BLE001
        raise user_error(spec, "building the data", exc) from exc
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise KdError(
            f"{spec} returned {type(result).__name__}, not (train, val) or (train, val, num_classes)",
            "return a pair of torch Datasets (or DataLoaders) yielding (image_tensor, label), optionally with the class count",
        )
    return tuple(result)


def spec_of_module(model: nn.Module) -> str:
    """How a run records a network passed as an object: `module:ClassName` (informational; reloading
    calls ClassName(num_classes=N), which works for classes built that way)."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"
