"""The published CIFAR-100 teachers (RepDistiller's, re-released by mdistiller) into the teacher store.

`fetch` downloads the release tar (resumably), `import_path` reads a tar, an extracted folder or
single `.pth` files. Either way each teacher is read by kdcli.teachers.pth (nothing in it runs),
loaded strictly into the zoo architecture, written as a kd `.safetensors` with where it came from,
and only once every requested teacher converted are they moved into the store: a failure leaves the
store as it was. Archive members are read as streams; no path is ever built from a member's name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from kdcli.errors import KdError, unknown
from kdcli.models import list_models
from kdcli.teachers.download import download
from kdcli.teachers.files import load_pth, read_metadata, save_model
from kdcli.teachers.store import check_free, file_sha256, find_teacher, kd_home, teacher_path

RELEASE_URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
URL_VARIABLE = "KD_TEACHERS_URL"
DATASET = "cifar100"
RELEASE_ARCHS = ("resnet56", "resnet110", "resnet32x4", "vgg13", "wrn_40_2", "ResNet50")
# sha256 of release members known from the published archive; every other member is checked by a
# strict load into its architecture.
PINNED_SHA256 = {
    "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth": "22aa12e2b632b19ddde155ccf2388671842ddd304824b3095e0a7fff364beb4f",
}
MAX_ARCHIVE_BYTES = 2 << 30  # the release is ~364 MB
MAX_MEMBER_BYTES = 1 << 30
MAX_MEMBERS = 10_000
_MEMBER = re.compile(r"(?:\./)?(?:[^/]+/)*(?P<arch>[A-Za-z0-9_]+)_vanilla/ckpt_epoch_240\.pth")


class BadArchive(KdError):
    """The archive itself is unusable (unreadable, a hostile member, a wrong digest): not kept."""


@dataclass
class Imported:
    arch: str
    path: str
    top1: float | None
    sha256: str  # of the original .pth
    source: str
    status: str  # "added", "replaced" or "unchanged"

    def as_dict(self) -> dict:
        return dict(vars(self))


def release_url(url: str | None = None) -> str:
    return url or os.environ.get(URL_VARIABLE) or RELEASE_URL


def fetch(names: list[str] | None = None, url: str | None = None, overwrite: bool = False) -> list[Imported]:
    """Download the release (unless every requested teacher is already stored) and import it."""
    wanted = _check_names(names)
    url = release_url(url)
    if wanted and all(find_teacher(name, DATASET) for name in wanted) and not overwrite:
        return [_stored(name) for name in wanted]
    archive = kd_home() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-cifar_teachers.tar"
    hint = (
        f"without network, download {url} elsewhere and run `kd teachers import cifar_teachers.tar`; "
        f"or point --url / {URL_VARIABLE} at a mirror"
    )
    download(url, archive, MAX_ARCHIVE_BYTES, hint)
    try:
        return import_path(archive, wanted, source=url, overwrite=overwrite)
    except BadArchive:
        archive.unlink(missing_ok=True)  # the next attempt downloads it again
        raise


def import_path(
    path: Path, names: list[str] | None = None, arch: str | None = None, source: str | None = None,
    overwrite: bool = False, dataset: str = DATASET,
) -> list[Imported]:
    """Import a release tar, a folder of `<arch>_vanilla/ckpt_epoch_240.pth`, or one `.pth` (arch
    from its folder or `arch`) into the store for `dataset`."""
    path = Path(path).expanduser()
    wanted = _check_names(names)
    if not path.exists():
        raise KdError(f"{path} does not exist", "pass the downloaded cifar_teachers.tar, its extracted folder or a .pth file")
    with _staging() as staging:
        if path.is_dir():
            converted = [_convert(f, _arch_of(f), str(f.resolve()), staging, dataset) for f in _folder_members(path, wanted)]
        elif tarfile.is_tarfile(path):
            converted = list(_convert_archive(path, wanted, source or str(path.resolve()), staging, dataset))
        else:
            converted = [_convert(path, arch or _arch_of(path), str(path.resolve()), staging, dataset)]
        _check_found(path, wanted, {c[0].arch for c in converted})
        return _register(converted, dataset, overwrite)


def _check_names(names: list[str] | None) -> list[str]:
    for name in names or ():
        if name not in list_models():
            raise unknown("model", name, list_models(), "kd list models")
    return list(dict.fromkeys(names or ()))


def _stored(name: str) -> Imported:
    path = teacher_path(name, DATASET)
    metadata = read_metadata(path)
    top1 = metadata.get("top1")
    return Imported(name, str(path), float(top1) if top1 else None, metadata.get("source_sha256", ""),
                    metadata.get("source", ""), "unchanged")


def _folder_members(folder: Path, wanted: list[str]) -> list[Path]:
    found = sorted(p for p in folder.rglob("ckpt_epoch_240.pth") if p.parent.name.endswith("_vanilla") and p.is_file())
    return [p for p in found if not wanted or _arch_of(p) in wanted]


def _arch_of(path: Path) -> str:
    folder = path.parent.name
    if folder.endswith("_vanilla"):
        return folder[: -len("_vanilla")]
    raise KdError(f"cannot tell the architecture of {path}", "pass --arch NAME, or keep the file in its <arch>_vanilla/ folder")


def _convert_archive(path: Path, wanted: list[str], source: str, staging: Path, dataset: str) -> Iterator[tuple[Imported, Path]]:
    """Stream the tar member by member: regular files named `<arch>_vanilla/ckpt_epoch_240.pth` are
    copied (bounded) into an anonymous staging file; any name that climbs out of the archive is refused."""
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for count, member in enumerate(archive, start=1):
                if count > MAX_MEMBERS:
                    raise BadArchive(f"{path} has more than {MAX_MEMBERS:,} members", "pass the release archive cifar_teachers.tar")
                _check_member_name(path, member.name)
                match = _MEMBER.fullmatch(member.name)
                if not match or not member.isreg():
                    continue
                arch = match.group("arch")
                if (wanted and arch not in wanted) or arch not in list_models() or arch in seen:
                    continue
                seen.add(arch)
                if member.size > MAX_MEMBER_BYTES:
                    raise BadArchive(f"{path}: member {member.name} is {member.size:,} bytes, more than a teacher can be", "pass the release archive")
                copy = staging / f"member-{count}.pth"  # never a path from the member's name
                digest = _copy_bounded(archive.extractfile(member), copy, member.size)
                pinned = PINNED_SHA256.get(member.name.removeprefix("./"))
                if pinned and digest != pinned:
                    raise BadArchive(
                        f"{path}: {member.name} has sha256 {digest}, not the published {pinned}",
                        "it is corrupt or not the published release: get cifar_teachers.tar again (kd teachers fetch removes a bad download itself)",
                    )
                try:
                    yield _convert(copy, arch, f"{source}#{member.name}", staging, dataset, digest)
                except KdError as exc:  # name the member, not the staging copy
                    raise BadArchive(exc.message.replace(str(copy), f"{path}:{member.name}"), exc.hint) from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BadArchive(f"{path} is not a readable tar archive ({exc})", "download it again (kd teachers fetch) or pass the extracted folder") from None


def _check_member_name(path: Path, name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", name):
        raise BadArchive(
            f"{path} holds a member named {name!r} that points outside the archive; nothing was imported",
            "it is not the published release: get cifar_teachers.tar again (kd teachers fetch removes a bad download itself)",
        )


def _copy_bounded(source: IO[bytes] | None, target: Path, size: int) -> str:
    """Copy exactly `size` bytes (the header's) and return their sha256."""
    if source is None:
        raise tarfile.TarError("member has no data")
    digest = hashlib.sha256()
    left = size
    with source, open(target, "wb") as out:
        while left:
            block = source.read(min(left, 1 << 20))
            if not block:
                raise EOFError("archive ends inside a member")
            digest.update(block)
            out.write(block)
            left -= len(block)
    return digest.hexdigest()


def _convert(pth: Path, arch: str, source: str, staging: Path, dataset: str, digest: str | None = None) -> tuple[Imported, Path]:
    """The `.pth` as a kd safetensors in `staging`, after a strict load into `arch`."""
    if arch not in list_models():
        raise unknown("model", arch, list_models(), "kd list models")
    digest = digest or file_sha256(pth)
    expected = {"cifar100": 100, "cifar10": 10}.get(dataset)
    model, metadata = load_pth(pth, arch, num_classes=expected)
    top1 = float(metadata["top1"]) if "top1" in metadata else None
    out = staging / f"{arch}.safetensors"
    save_model(out, model, arch=arch, num_classes=metadata["num_classes"], dataset=dataset, method="imported",
               source=source, source_sha256=digest, top1=metadata.get("top1"))
    return Imported(arch, str(teacher_path(arch, dataset)), top1, digest, source, "added"), out


def _check_found(path: Path, wanted: list[str], found: set[str]) -> None:
    missing = [name for name in wanted if name not in found]
    if missing or not found:
        raise KdError(
            f"{path} holds no {' or '.join(missing) or 'teacher'} (looked for <arch>_vanilla/ckpt_epoch_240.pth)",
            f"the release holds {', '.join(RELEASE_ARCHS)}; import other .pth files one by one with --arch",
        )


def _register(converted: list[tuple[Imported, Path]], dataset: str, overwrite: bool) -> list[Imported]:
    """Move the converted teachers into the store: all checks first, then one atomic rename each."""
    for item, _ in converted:
        stored = find_teacher(item.arch, dataset)
        if stored is not None and read_metadata(stored).get("source_sha256") == item.sha256:
            item.status = "unchanged"
        elif stored is not None:
            check_free(item.arch, dataset, overwrite)
            item.status = "replaced"
    for item, file in converted:
        if item.status != "unchanged":
            target = teacher_path(item.arch, dataset)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    return [item for item, _ in converted]


@contextmanager
def _staging() -> Iterator[Path]:
    """A private folder beside the store (same filesystem, so moving into the store is a rename)."""
    root = kd_home() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="import-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)

