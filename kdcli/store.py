"""The teacher store: where `--teacher resnet110` finds the weights `kd train resnet110` produced.

Layout: $KD_HOME/teachers/<dataset>/<arch>.safetensors (KD_HOME defaults to ~/.cache/kdcli).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from kdcli.engine.checkpoint import atomic_write
from kdcli.errors import KdError


def kd_home() -> Path:
    return Path(os.environ.get("KD_HOME", "~/.cache/kdcli")).expanduser()


def check_kd_home() -> Path:
    """The teacher store's root, refused up front when it (or a folder above it) is a file: found at
    the start of a run, not after the run trained and tries to register its weights."""
    home = kd_home()
    for folder in (home / "teachers", home, *home.parents):
        if folder.exists():
            if not folder.is_dir():
                raise KdError(
                    f"KD_HOME {home} is not a folder ({folder} is a file)",
                    "point KD_HOME at a folder (or unset it for ~/.cache/kdcli); kd keeps its teacher store there",
                )
            break
    return home


def dataset_key(dataset: str) -> str:
    """A folder name for a dataset spec (`synthetic:classes=10` -> `synthetic_classes_10`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_")


def teacher_path(arch: str, dataset: str) -> Path:
    return kd_home() / "teachers" / dataset_key(dataset) / f"{arch}.safetensors"


def register_teacher(model_file: Path, arch: str, dataset: str) -> Path:
    """Copy a trained model into the store (replacing an older one atomically); returns its path."""
    target = teacher_path(arch, dataset)
    atomic_write(target, lambda tmp: shutil.copyfile(model_file, tmp))
    return target


def find_teacher(arch: str, dataset: str) -> Path | None:
    path = teacher_path(arch, dataset)
    return path if path.is_file() else None


def list_teachers() -> list[tuple[str, str, Path]]:
    """(dataset folder, arch, path) of every stored teacher."""
    root = kd_home() / "teachers"
    return [(p.parent.name, p.stem, p) for p in sorted(root.glob("*/*.safetensors"))]
