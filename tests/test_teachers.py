"""Published teachers: safe loading of research .pth files, `kd teachers fetch/import` against a
loopback HTTP server serving a tar in the release layout, and the store's records of teachers."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kdcli.errors import KdError
from kdcli.models import create_model
from kdcli.teachers import kd_home, list_teachers, load_network, read_metadata, teacher_digest, teacher_path
from kdcli.teachers import pth as pth_module
from kdcli.teachers.files import load_pth
from kdcli.teachers.pth import inspect
from tests.conftest import TINY_DATA, _Payload, assert_clean_error

ACCURACY = {"resnet56": 72.34, "resnet8": 59.5}
DATA100 = "synthetic:classes=100,n=500,size=16"


def published_checkpoint(arch: str, seed: int, legacy: bool = False) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A zoo model saved as RepDistiller's train_teacher.py saves (numpy-scalar accuracy, SGD state,
    the run's Namespace): the .pth bytes and the model's state dict."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = {
        "epoch": 240,
        "model": model.state_dict(),
        "accuracy": np.float64(ACCURACY.get(arch, 70.0)),
        "optimizer": optimizer.state_dict(),
        "opt": argparse.Namespace(model=arch, lr=0.05, lr_decay_epochs=[150, 180, 210], dataset="cifar100"),
        "history": np.array([10.5, 40.25], dtype=np.float32),
        "extra": ({"cifar100"}, b"bytes", 1 + 2j, None, True),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue(), {k: v.clone() for k, v in model.state_dict().items()}


def make_tar(members: dict[str, bytes], folders: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        if folders:
            folder = tarfile.TarInfo("cifar_teachers")
            folder.type = tarfile.DIRTYPE
            archive.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release():
    """The release layout (two teachers, one in torch's older format, a README) and the originals."""
    resnet56, state56 = published_checkpoint("resnet56", 0)
    resnet8, state8 = published_checkpoint("resnet8", 1, legacy=True)
    members = {
        "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": resnet56,
        "cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth": resnet8,
        "cifar_teachers/README.txt": b"teachers\n",
    }
    return {"tar": make_tar(members), "members": members, "states": {"resnet56": state56, "resnet8": state8}}


class Server:
    """A loopback HTTP server for one file with Range support; `cut_after` breaks the next
    response off after that many bytes (a dropped connection)."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.cut_after: int | None = None
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                if self.path != "/cifar_teachers.tar":
                    self.send_error(404)
                    return
                outer.ranges.append(self.headers.get("Range"))
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                body = outer.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.payload) - 1}/{len(outer.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after is not None:
                    body, outer.cut_after = body[: outer.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar_teachers.tar"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(payload: bytes) -> Server:
        servers.append(Server(payload))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def store_snapshot() -> dict[str, bytes]:
    root = kd_home() / "teachers"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- safe loading of research checkpoints -------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_published_checkpoint_loads_strictly_with_its_accuracy(tmp_path, legacy):
    data, state = published_checkpoint("resnet8", 3, legacy=legacy)
    path = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    path.write_bytes(data)
    model, metadata = load_pth(path)
    assert metadata["arch"] == "resnet8" and metadata["num_classes"] == "100"
    assert float(metadata["top1"]) == pytest.approx(59.5)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_numpy_1x_names_and_other_wrappers_load(tmp_path):
    """Files written under numpy 1.x name numpy.core.multiarray; CRD's student files keep `snet`."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    buffer = io.BytesIO()
    torch.save({"snet": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_acc": np.float32(61.0)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(tmp_path / "a.pth", "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(info, data)
    loaded, metadata = load_pth(tmp_path / "a.pth", arch="resnet8")
    assert float(metadata["top1"]) == 61.0
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_crafted_pickle_is_refused_by_name_in_one_clean_line(kd, tmp_path):
    evil = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    evil.parent.mkdir()
    marker = tmp_path / "payload-ran"
    buffer = io.BytesIO()
    torch.save({"model": _Payload(str(marker))}, buffer)  # torch's own format around the payload
    evil.write_bytes(buffer.getvalue())
    result = kd("eval", evil, "--data", TINY_DATA)
    assert_clean_error(result, "would have to run code (", "pathlib.Path", "was not loaded")
    assert "\x1b" not in result.stderr and len(result.stderr.strip().splitlines()) == 2
    assert not marker.exists()


def test_an_unlisted_inert_global_is_refused_too(tmp_path):
    """Only the allowlist passes, however harmless the rest: a datetime is named and refused."""
    import datetime

    path = tmp_path / "x.pth"
    torch.save({"model": create_model("resnet8", num_classes=10).state_dict(), "when": datetime.date(2020, 1, 1)}, path)
    with pytest.raises(KdError, match=r"run code \(datetime\.date\)"):
        load_pth(path, arch="resnet8")


def test_compression_bomb_is_refused_before_torch_reads_it(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        with archive.open("archive/data/0", "w") as entry:
            block = bytes(1 << 20)
            for _ in range(100):  # 100 MiB of zeros: ~100 KB on disk
                entry.write(block)
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(KdError, match="would expand to 104,857,6") as error:
        load_pth(bomb, arch="resnet8")
    assert "not unpacked" in error.value.message


def test_legacy_storages_larger_than_the_file_are_refused(tmp_path):
    """Torch's older format allocates what the pickle declares: a declared terabyte is refused."""

    class Declares(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 1 << 40) if obj == "huge" else None

    path = tmp_path / "huge.pth"
    with open(path, "wb") as handle:
        Declares(handle, protocol=2).dump({"model": {"w": "huge"}})
    with pytest.raises(KdError, match="whose tensors claim"):
        inspect(path)


def test_pickle_opcode_bound(tmp_path, monkeypatch):
    data, _ = published_checkpoint("resnet8", 0)
    path = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    path.write_bytes(data)
    monkeypatch.setattr("kdcli.teachers.pickle_scan.MAX_OPCODES", 500)
    with pytest.raises(KdError, match="larger than any checkpoint"):
        inspect(path)


def test_safe_globals_are_restored_after_a_load(tmp_path):
    data, _ = published_checkpoint("resnet8", 0)
    path = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    path.write_bytes(data)
    before = set(torch.serialization.get_safe_globals())
    load_pth(path)
    after = set(torch.serialization.get_safe_globals())
    assert argparse.Namespace not in after and np.ndarray not in after and before <= after
    torch.serialization.add_safe_globals([argparse.Namespace])  # a user's own registration survives
    try:
        load_pth(path)
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(list(before))


# --- kd teachers fetch / import --------------------------------------------------------------


def test_fetch_converts_and_registers_the_release(kd, serve, release):
    server = serve(release["tar"])
    result = kd("teachers", "fetch", "--url", server.url, "--json")
    assert result.code == 0, result.stderr
    imported = {t["arch"]: t for t in json.loads(result.stdout)["teachers"]}
    assert set(imported) == {"resnet56", "resnet8"}
    for arch, state in release["states"].items():
        member = release["members"][f"cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth"]
        path = teacher_path(arch, "cifar100")
        metadata = read_metadata(path)
        assert metadata["arch"] == arch and metadata["num_classes"] == "100" and metadata["dataset"] == "cifar100"
        assert metadata["source"] == f"{server.url}#cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth"
        assert metadata["source_sha256"] == hashlib.sha256(member).hexdigest() == imported[arch]["sha256"]
        assert float(metadata["top1"]) == pytest.approx(ACCURACY[arch])
        model, _ = load_network(arch, "cifar100", 100)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    listing = {row["model"]: row for row in list_teachers()}
    assert listing["resnet56"]["source"].startswith(server.url) and listing["resnet56"]["top1"] == pytest.approx(72.34)
    shown = kd("list", "teachers")
    assert "72.34" in shown.stdout and "resnet56" in shown.stdout
    # Fetching again reuses the store: no download, nothing replaced.
    again = kd("teachers", "fetch", "resnet56", "--url", server.url, "--json")
    assert again.code == 0 and json.loads(again.stdout)["teachers"][0]["status"] == "unchanged"
    assert len(server.ranges) == 1


def test_import_then_distill_from_the_teacher_by_name(kd, tmp_path, release):
    archive = tmp_path / "cifar_teachers.tar"
    archive.write_bytes(release["tar"])
    result = kd("teachers", "import", archive, "--only", "resnet56", "--data", DATA100)
    assert result.code == 0, result.stderr
    assert [row["model"] for row in list_teachers()] == ["resnet56"]
    out = tmp_path / "run"
    run = kd("distill", "--teacher", "resnet56", "--student", "resnet8", "--method", "kd", "--data", DATA100,
             "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out", out, "--json")
    assert run.code == 0, run.stderr
    summary = json.loads(run.stdout)
    stored = teacher_path("resnet56", DATA100)
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert summary["teacher_sha256"] == digest == teacher_digest("resnet56", DATA100)
    assert summary["teacher_source"].startswith(f"store {stored}") and str(archive) in summary["teacher_source"]
    assert f'teacher_sha256 = "{digest}"' in (out / "config.toml").read_text()
    with safe_open(str(out / "student.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["teacher_sha256"] == digest and metadata["teacher_source"] == summary["teacher_source"]


def test_import_a_folder_and_a_single_pth(kd, tmp_path, release):
    for name, data in release["members"].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    result = kd("teachers", "import", tmp_path / "cifar_teachers", "--json")
    assert result.code == 0, result.stderr
    assert sorted(t["arch"] for t in json.loads(result.stdout)["teachers"]) == ["resnet56", "resnet8"]
    single = tmp_path / "mine.pth"
    single.write_bytes(release["members"]["cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth"])
    assert_clean_error(kd("teachers", "import", single), "cannot tell the architecture")
    same = kd("teachers", "import", single, "--arch", "resnet8", "--json")
    assert same.code == 0 and json.loads(same.stdout)["teachers"][0]["status"] == "unchanged"


def test_an_interrupted_download_resumes_to_the_same_bytes(kd, serve, release):
    server = serve(release["tar"])
    server.cut_after = 100_000
    first = kd("teachers", "fetch", "--url", server.url)
    assert_clean_error(first, server.url)
    assert "again to resume" in first.stderr
    assert store_snapshot() == {}
    parts = list((kd_home() / "downloads").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 100_000
    second = kd("teachers", "fetch", "--url", server.url)
    assert second.code == 0, second.stderr
    assert server.ranges == [None, "bytes=100000-"]
    (archive,) = (kd_home() / "downloads").glob("*.tar")
    assert archive.read_bytes() == release["tar"] and not list((kd_home() / "downloads").glob("*.part"))
    assert {row["model"] for row in list_teachers()} == {"resnet56", "resnet8"}


def _malicious_member(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": _Payload(str(marker))}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["corrupt", "traversal", "digest", "unreachable", "crafted"])
def test_bad_archives_exit_2_and_leave_the_store_as_it_was(kd, serve, release, tmp_path, case):
    kept = teacher_path("vgg8", "cifar100")
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"an earlier teacher")  # the store must come out byte for byte as it went in
    before = store_snapshot()
    marker = tmp_path / "payload-ran"
    good = release["members"]["cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"]
    expected = {
        "corrupt": (release["tar"][:30_000] + b"\x00garbage" * 100, "not a readable"),
        "traversal": (make_tar({"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": good, "../../x": b"x"}), "'../../x'"),
        "digest": (make_tar({"cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth": good}), "not the published"),
        "unreachable": (b"", "cannot reach"),
        "crafted": (make_tar({"cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth": _malicious_member(marker)}), "run code"),
    }
    payload, fragment = expected[case]
    if case == "unreachable":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{probe.getsockname()[1]}/cifar_teachers.tar"
    else:
        url = serve(payload).url
    result = kd("teachers", "fetch", "--url", url)
    assert_clean_error(result, fragment)
    assert store_snapshot() == before
    assert not marker.exists() and not (tmp_path.parent / "x").exists() and not (kd_home() / "x").exists()
    if case != "unreachable":  # a bad archive is not kept: the next fetch downloads it again
        assert not list((kd_home() / "downloads").glob("*.tar"))
    if case == "unreachable":
        assert "kd teachers import" in result.stderr and url in result.stderr


def test_download_flag_fetches_a_missing_release_teacher(serve, release, monkeypatch):
    server = serve(release["tar"])
    monkeypatch.setenv("KD_TEACHERS_URL", server.url)
    with pytest.raises(KdError, match="no trained resnet56 for cifar100") as missing:
        load_network("resnet56", "cifar100", 100)
    assert "kd teachers fetch resnet56" in missing.value.hint and server.ranges == []
    model, metadata = load_network("resnet56", "cifar100", 100, download=True)
    assert metadata["source"].startswith(server.url)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in release["states"]["resnet56"].items())


# --- the store's records ---------------------------------------------------------------------


def test_empty_store_says_how_to_fill_it(kd):
    result = kd("list", "teachers")
    assert result.code == 0 and "kd teachers fetch" in result.stderr and "kd train" in result.stderr
    assert list_teachers() == []


def test_retraining_a_stored_teacher_needs_overwrite(kd, tmp_path):
    common = ["--data", TINY_DATA, "--epochs", "1", "--batch-size", "32", "--device", "cpu"]
    assert kd("train", "resnet8", *common, "--out", tmp_path / "a").code == 0
    stored = teacher_path("resnet8", TINY_DATA)
    first = stored.read_bytes()
    again = kd("train", "resnet8", *common, "--seed", "1", "--out", tmp_path / "b")
    assert_clean_error(again, "already holds resnet8")
    assert "--overwrite" in again.stderr and not (tmp_path / "b").exists() and stored.read_bytes() == first
    replaced = kd("train", "resnet8", *common, "--seed", "1", "--out", tmp_path / "b", "--overwrite", "--json")
    assert replaced.code == 0 and stored.read_bytes() != first
    assert read_metadata(stored)["source"] == f"kd train, run {tmp_path / 'b'}"


def test_teacher_digest_of_files_store_names_and_missing_teachers(tmp_path):
    weights = tmp_path / "t.safetensors"
    weights.write_bytes(b"weights")
    assert teacher_digest(str(weights)) == hashlib.sha256(b"weights").hexdigest()
    assert teacher_digest("resnet8", "cifar100") is None and teacher_digest(None) is None
    assert teacher_digest("timm:resnet18", "cifar100") is None
    stored = teacher_path("resnet8", "cifar100")
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"stored")
    assert teacher_digest("resnet8", "cifar100") == hashlib.sha256(b"stored").hexdigest()


def test_compare_does_not_reuse_a_run_whose_teacher_changed(tmp_path):
    from dataclasses import replace

    from kdcli.compare import Job, run_state
    from kdcli.config import build_config, to_toml

    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"first teacher")
    config = build_config({"teacher": str(teacher), "student": "resnet8", "data": TINY_DATA, "out": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    recorded = replace(config, teacher_sha256=teacher_digest(str(teacher)), teacher_source=f"file {teacher}")
    (tmp_path / "run" / "config.toml").write_text(to_toml(recorded))
    assert run_state(Job("kd-seed0", config)) == "new"  # same teacher: the run is this job's
    teacher.write_bytes(b"another teacher")
    with pytest.raises(KdError, match="other settings: teacher .* with sha256"):
        run_state(Job("kd-seed0", config))


def test_resume_refuses_a_teacher_that_changed(kd, tmp_path):
    from kdcli.teachers import save_model

    teacher = tmp_path / "teacher.safetensors"
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(teacher, create_model("resnet8", num_classes=4), arch="resnet8", num_classes=4, dataset=TINY_DATA)
        if seed == 0:
            run = kd("distill", "--teacher", teacher, "--student", "resnet8", "--data", TINY_DATA, "--epochs", "1",
                     "--device", "cpu", "--out", tmp_path / "run", "--json")
            assert run.code == 0, run.stderr
    assert_clean_error(kd("distill", "--resume", tmp_path / "run"), "changed since this run started")


def test_download_progress_shows_bytes_and_speed_in_a_terminal(serve, release, tmp_path, monkeypatch):
    from rich.console import Console

    from kdcli.teachers import download as downloading

    screen = io.StringIO()
    monkeypatch.setattr(downloading, "stderr", Console(file=screen, force_terminal=True, width=120))
    server = serve(release["tar"])
    target = downloading.download(server.url, tmp_path / "a.tar", 1 << 30, hint="offline")
    assert target.read_bytes() == release["tar"]
    shown = screen.getvalue()
    assert "cifar_teachers.tar" in shown and f"{len(release['tar']) / 1e6:.1f}/{len(release['tar']) / 1e6:.1f} MB" in shown
    assert "MB/s" in shown


def test_compare_with_download_fetches_the_release_teachers_of_its_grid(serve, release, monkeypatch, tmp_path):
    from kdcli.compare import make_plan
    from kdcli.teachers import find_teacher

    server = serve(release["tar"])
    monkeypatch.setenv("KD_TEACHERS_URL", server.url)
    flags = {"teacher": "resnet56", "student": "resnet8", "data": "cifar100"}
    with pytest.raises(KdError, match="no trained resnet56 for cifar100") as missing:
        make_plan(flags, methods="kd", out=str(tmp_path / "compare"))
    assert "kd teachers fetch" in missing.value.hint and "--download" in missing.value.hint
    assert server.ranges == [] and find_teacher("resnet56", "cifar100") is None
    plan = make_plan({**flags, "download": True}, methods="kd", out=str(tmp_path / "compare"))
    assert [job.config.teacher for job in plan.jobs] == ["resnet56"]
    assert find_teacher("resnet56", "cifar100") is not None
