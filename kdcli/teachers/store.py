"""The teacher store: where `--teacher resnet110` finds the weights `kd train resnet110` (or
`kd teachers fetch/import`) put there.

Layout: $KD_HOME/teachers/<dataset>/<arch>.safetensors (KD_HOME defaults to ~/.cache/kdcli).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

from kdcli.engine.checkpoint import atomic_write
from kdcli.errors import KdError


def kd_home() -> Path:
    return Path(os.environ.get("KD_HOME", "~/.cache/kdcli")).expanduser()


def dataset_key(dataset: str) -> str:
    """A folder name for a dataset spec (`synthetic:classes=10` -> `synthetic_classes_10`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_")


def teacher_path(arch: str, dataset: str) -> Path:
    return kd_home() / "teachers" / dataset_key(dataset) / f"{arch}.safetensors"


def check_free(arch: str, dataset: str, overwrite: bool) -> None:
    """Refuse to replace a stored teacher unless asked: runs distilled from it name it by sha256."""
    stored = find_teacher(arch, dataset)
    if stored is not None and not overwrite:
        raise KdError(
            f"the teacher store already holds {arch} for {dataset} ({stored})",
            "pass --overwrite to replace it (runs distilled from it keep its sha256 in their config.toml), "
            "or keep it and distill from it with --teacher " + arch,
        )


def register_teacher(model_file: Path, arch: str, dataset: str, overwrite: bool = False) -> Path:
    """Copy a model into the store atomically (an existing one only with `overwrite`); returns its path."""
    check_free(arch, dataset, overwrite)
    target = teacher_path(arch, dataset)
    atomic_write(target, lambda tmp: shutil.copyfile(model_file, tmp))
    return target


def find_teacher(arch: str, dataset: str) -> Path | None:
    path = teacher_path(arch, dataset)
    return path if path.is_file() else None


_digests: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so repeated lookups do not re-read it."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def list_teachers() -> list[dict[str, Any]]:
    """Every stored teacher: data folder, model (its arch), path, where it came from, its recorded top-1."""
    from kdcli.teachers.files import read_metadata

    root = kd_home() / "teachers"
    rows = []
    for path in sorted(root.glob("*/*.safetensors")):
        try:
            metadata = read_metadata(path)
        except KdError:
            metadata = {}
        top1 = metadata.get("top1")
        rows.append({
            "data": path.parent.name,
            "model": path.stem,
            "path": str(path),
            "source": metadata.get("source") or ("kd train" if metadata.get("method") == "train" else "unknown"),
            "top1": float(top1) if _is_number(top1) else None,
            "num_classes": int(metadata["num_classes"]) if str(metadata.get("num_classes", "")).isdigit() else None,
        })
    return rows


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
