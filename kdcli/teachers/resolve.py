"""`--teacher NAME` to a network: a weights file, the teacher store, the published release (with
`--download`), or a timm:/tv: model's published weights (with `--pretrained`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kdcli.errors import KdError
from kdcli.models import create_model, list_models
from kdcli.models.registry import pretrained_input
from kdcli.teachers import release
from kdcli.teachers.files import input_metadata, is_weights_path, load_model_file, read_metadata
from kdcli.teachers.store import file_sha256, find_teacher


def load_network(
    spec: str, data: str, num_classes: int, arch: str | None = None, pretrained: bool = False, download: bool = False,
) -> tuple[nn.Module, dict[str, str]]:
    """A trained network and its metadata, for `--teacher` and `kd eval`.

    `spec` is a weights file (kd safetensors; RepDistiller/mdistiller .pth, architecture from `arch`
    or its `<arch>_vanilla/` folder), else a name looked up in the teacher store for `data` (with
    `download`, a CIFAR-100 teacher of the published release is fetched into the store first), else,
    with `pretrained`, a `timm:NAME` / `tv:NAME` model with its published weights (which must
    predict the data's `num_classes` classes).
    """
    if is_weights_path(spec):
        path = Path(spec).expanduser()
        if path.is_dir():
            inside = [p for p in (path / "student.safetensors", path / "model.safetensors") if p.is_file()]
            raise KdError(
                f"{spec} is a folder, not a weights file",
                f"pass {inside[0]}" if inside else "pass the .safetensors or .pth file inside it",
            )
        return load_model_file(path, arch=arch, num_classes=num_classes)
    stored = find_teacher(spec, data)
    if stored is None and download and in_release(spec, data):
        release.fetch([spec])
        stored = find_teacher(spec, data)
    if stored is not None:
        return load_model_file(stored, num_classes=num_classes, trusted=True)  # the store holds kd's own files
    external = is_external(spec)
    if pretrained and external:
        return _pretrained_network(spec, num_classes)
    if spec not in list_models():
        create_model(spec, num_classes=num_classes)  # raises the did-you-mean error for unknown names
    hint = f"train one with `kd train {spec} --data {data}`, or pass a checkpoint path"
    if in_release(spec, data):
        hint = f"get the published one with `kd teachers fetch {spec}` (or add --download), or {hint}"
    if external:
        hint += ", or --pretrained for its published weights"
    raise KdError(f"no trained {spec} for {data} in the teacher store", hint)


def in_release(name: str, data: str) -> bool:
    """Whether `kd teachers fetch` provides this teacher (the release holds CIFAR-100 teachers)."""
    return data == release.DATASET and name in release.RELEASE_ARCHS


def teacher_file(spec: str | None, data: str) -> Path | None:
    """The weights file `--teacher spec` reads, when it is a file or in the store (else None)."""
    if not spec:
        return None
    if is_weights_path(spec):
        path = Path(spec).expanduser()
        return path if path.is_file() else None
    return find_teacher(spec, data)


def teacher_digest(spec: str | None, data: str = release.DATASET) -> str | None:
    """sha256 of the weights `--teacher spec` resolves to for `data` (None for published timm/tv
    weights or a teacher that is not there): a run whose recorded digest differs had another teacher."""
    path = teacher_file(spec, data)
    return file_sha256(path) if path is not None else None


def teacher_source(spec: str | None, data: str, pretrained: bool = False) -> str | None:
    """Where the teacher's weights come from, for the run's records."""
    path = teacher_file(spec, data)
    if path is None:
        return f"pretrained {spec}" if spec and pretrained and is_external(spec) else None
    if is_weights_path(spec or ""):
        return f"file {path.resolve()}"
    origin = read_metadata(path).get("source") if path.suffix == ".safetensors" else None
    return f"store {path}" + (f" (from {origin})" if origin else "")


def is_external(name: str | None) -> bool:
    """A `timm:NAME` / `tv:NAME` model name (these have published weights; the zoo has none)."""
    return bool(name) and not is_weights_path(name) and name.partition(":")[0] in ("timm", "tv")


def _pretrained_network(spec: str, num_classes: int) -> tuple[nn.Module, dict[str, str]]:
    expected = pretrained_input(spec)
    if expected is not None and expected.num_classes != num_classes:
        raise KdError(
            f"the pretrained {spec} predicts {expected.num_classes} classes but the data has {num_classes}",
            f"fine-tune it first (`kd train {spec} --pretrained --data DATA`); it is then found in the teacher store",
        )
    model = create_model(spec, num_classes=num_classes, pretrained=True)
    metadata = {"arch": spec, "num_classes": str(num_classes), "format": "pretrained"}
    if expected is not None:
        metadata.update(input_metadata(expected.mean, expected.std, expected.size))
    return model, metadata
