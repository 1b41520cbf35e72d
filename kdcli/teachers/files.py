"""Model weight files: kd's safetensors (with metadata) and RepDistiller/mdistiller `.pth` checkpoints.

`.pth` files are read by kdcli.teachers.pth, which checks their size and every global their pickle
names before `torch.load(weights_only=True)` sees them: a crafted file never runs code here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from kdcli import __version__
from kdcli.engine.checkpoint import STATE_KEY, atomic_write
from kdcli.errors import KdError
from kdcli.models import create_model
from kdcli.models.features import classifier_of
from kdcli.teachers.pth import read_checkpoint, state_dict_of, stored_accuracy

FORMAT = "kdcli-model"


def is_weights_path(name: str) -> bool:
    """How `--teacher` and `kd eval` read a name: a file, a weights suffix or a slash means a path,
    anything else a model name (teacher store, zoo, timm:/tv:)."""
    path = Path(name).expanduser()
    return path.is_file() or path.suffix in (".safetensors", ".pth", ".pt") or "/" in name


def save_model(path: Path, model: nn.Module, **metadata: Any) -> None:
    """Write the model's weights and string metadata (arch, num_classes, dataset, ...) atomically."""
    header = {"format": FORMAT, "kdcli_version": __version__}
    header.update({key: str(value) for key, value in metadata.items() if value is not None})
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def input_metadata(mean, std, size: int | None = None) -> dict[str, str]:
    """Metadata recording the input a network was trained on: normalisation and (image folders) size."""
    metadata = {"mean": ",".join(f"{v:g}" for v in mean), "std": ",".join(f"{v:g}" for v in std)}
    if size:
        metadata["image_size"] = str(size)
    return metadata


def read_input(
    metadata: dict[str, str], source: Path | str = "the weights file"
) -> tuple[tuple[float, ...], tuple[float, ...], int | None] | None:
    """(mean, std, image size or None) recorded by `input_metadata`; None when the file has none.

    Recorded but malformed values (not 1 or 3 finite numbers, a std of 0) are refused: evaluating with
    them would normalise every image wrongly, or divide by zero."""
    if "mean" not in metadata or "std" not in metadata:
        return None
    mean = _numbers(metadata, "mean", source, positive=False)
    std = _numbers(metadata, "std", source, positive=True)
    size = _metadata_int(metadata, "image_size", source, 8, 4096) if metadata.get("image_size") else None
    return mean, std, size


def _numbers(metadata: dict[str, str], key: str, source, positive: bool) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in metadata[key].split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 3) or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise KdError(
            f"{source} has malformed metadata: {key}={metadata[key][:60]!r}",
            f"{key} must be 1 or 3 comma-separated finite numbers{' above 0' if positive else ''}; "
            "re-save the weights with kd, or fix the file's metadata",
        )
    return values


def _metadata_int(metadata: dict[str, str], key: str, source, low: int, high: int) -> int:
    text = str(metadata.get(key, ""))
    value = int(text) if text.strip().isdigit() and len(text) < 12 else None
    if value is None or not low <= value <= high:
        raise KdError(
            f"{source} has malformed metadata: {key}={text[:60]!r}",
            f"{key} must be an integer from {low} to {high}; re-save the weights with kd, or fix the file's metadata",
        )
    return value


def _trusted_arch(arch: str, path: Path, trusted: bool) -> str:
    """The architecture a file's metadata names; a plug-in one (user code) only when the user names it too.

    Building `pkg.module:factory` imports and runs that code: a weights file from elsewhere must not
    choose what runs, so such a file loads only with the spec given again on the command line.
    """
    from kdcli import plugins

    if trusted or not plugins.is_plugin_spec(arch):
        return arch
    raise KdError(
        f"{path} was made with the plug-in architecture {arch}, and kd imports user code only when you name it",
        f"if you trust that code, pass it again: --arch {arch} (kd eval, kd export) or --teacher-arch {arch} (kd distill)",
    )


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a kd safetensors file; a clear error for anything else."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise KdError(
            f"{path} is not a readable safetensors file ({exc})",
            "the file may be truncated or corrupt; re-create it or pass another checkpoint",
        ) from None
    return metadata


def load_model_file(
    path: str | Path, arch: str | None = None, num_classes: int | None = None, trusted: bool = False
) -> tuple[nn.Module, dict[str, str]]:
    """Build the network a weights file describes and load it strictly.

    arch: needed for `.pth` files unless the parent folder is RepDistiller's `<arch>_vanilla`.
    num_classes: the class count the caller needs; a file with another count is refused.
    trusted: the file is kd's own (the teacher store), so a plug-in architecture it names may be imported.
    """
    path = Path(path)
    if not path.is_file():
        raise KdError(f"checkpoint {path} does not exist", "check the path, or train one with `kd train`")
    if path.suffix == ".safetensors":
        metadata = read_metadata(path)
        if STATE_KEY in metadata:
            raise KdError(
                f"{path} is a kd resume checkpoint, not a weights file",
                "pass the run's student.safetensors (model.safetensors for kd train) or checkpoints/best.safetensors",
            )
        if metadata.get("format") != FORMAT or "arch" not in metadata:
            raise KdError(
                f"{path} was not written by kd (no arch in its metadata)",
                "pass a student.safetensors/model.safetensors from a kd run, or a RepDistiller .pth with --arch",
            )
        arch = arch or _trusted_arch(metadata["arch"], path, trusted)
        file_classes = _metadata_int(metadata, "num_classes", path, 1, 1_000_000)
        _check_classes(path, file_classes, num_classes)
        model = create_model(arch, num_classes=file_classes)
        _check_layout(path, model, _safetensors_layout(path), arch)
        state = _read_safetensors(path)
    else:
        return load_pth(path, arch, num_classes)
    model.load_state_dict(state, strict=True)
    return model, metadata


def load_pth(path: Path, arch: str | None = None, num_classes: int | None = None) -> tuple[nn.Module, dict[str, str]]:
    """A RepDistiller/mdistiller `.pth` loaded strictly into the zoo architecture; metadata holds the
    top-1 the trainer stored beside the weights, when there is one."""
    checkpoint = read_checkpoint(path)
    state = state_dict_of(checkpoint, path)
    arch = arch or _arch_from_folder(path)
    file_classes = _classes_in(state, arch)
    _check_classes(path, file_classes, num_classes)
    model = create_model(arch, num_classes=file_classes)
    _check_layout(path, model, {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}, arch)
    model.load_state_dict(state, strict=True)
    metadata = {"arch": arch, "num_classes": str(file_classes), "format": "pth"}
    accuracy = stored_accuracy(checkpoint)
    if accuracy is not None:
        metadata["top1"] = f"{accuracy:.4f}"
    return model, metadata


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise KdError(f"{path} is corrupt ({exc})", "re-create the file or pass another checkpoint") from None


def _safetensors_layout(path: Path) -> dict[str, tuple[tuple[int, ...], bool]]:
    """(shape, is floating point) of every tensor, read from the header alone."""
    with safe_open(str(path), framework="pt") as handle:
        slices = {key: handle.get_slice(key) for key in handle.keys()}
        return {key: (tuple(s.get_shape()), s.get_dtype().startswith(("F", "BF"))) for key, s in slices.items()}


def _arch_from_folder(path: Path) -> str:
    folder = path.parent.name
    if "_vanilla" in folder:
        return folder.split("_vanilla")[0]
    raise KdError(
        f"cannot tell the architecture of {path}",
        "pass --teacher-arch (or --arch) NAME, or keep the file in RepDistiller's <arch>_vanilla/ folder",
    )


def _classes_in(state: dict[str, torch.Tensor], arch: str) -> int:
    """Class count of a checkpoint, read from the classifier weight of the architecture."""
    probe = create_model(arch, num_classes=1)
    fc = classifier_of(probe)
    name = next(n for n, m in probe.named_modules() if m is fc)
    weight = state.get(f"{name}.weight")
    if weight is None or weight.ndim != 2:
        raise KdError(
            f"checkpoint does not match architecture {arch!r} (no classifier {name}.weight)",
            "pass the right --teacher-arch/--arch",
        )
    return int(weight.shape[0])


def _check_classes(path: Path, have: int, need: int | None) -> None:
    if need is not None and have != need:
        raise KdError(
            f"{path} predicts {have} classes but the data has {need}",
            "use a checkpoint trained on this dataset, or pick the matching --data",
        )


def _check_layout(path: Path, model: nn.Module, layout: dict[str, tuple[tuple[int, ...], bool]], arch: str) -> None:
    """Compare the file's tensor names, shapes and dtype kinds (float or integer) with the model
    before loading anything: float precision may differ (bf16 weights load into fp32), kind may not."""
    expected = {key: (tuple(v.shape), v.is_floating_point()) for key, v in model.state_dict().items()}
    missing = [key for key in expected if key not in layout]
    extra = [key for key in layout if key not in expected]
    wrong = [key for key in expected if key in layout and layout[key] != expected[key]]
    if missing or extra or wrong:
        sample = (missing or extra or wrong)[0]
        raise KdError(
            f"{path} does not match architecture {arch!r} "
            f"({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} mis-shaped or mis-typed tensors, e.g. {sample})",
            "pass the architecture the checkpoint was trained with (--teacher-arch / --arch)",
        )
