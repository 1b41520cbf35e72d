"""Data parallelism on CPU with the gloo backend: sharding, consistent state across ranks, and a real torchrun run."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdcli.data.loaders import shard_order
from tests.conftest import TINY_DATA


def test_shards_partition_every_global_batch():
    order = torch.randperm(23)
    parts = [shard_order(order, 4, rank, 2) for rank in range(2)]
    assert all(p.numel() == 8 for p in parts)  # 2 whole global batches of 8; the last 7 dropped
    for b in range(2):
        together = torch.cat([p[b * 4 : (b + 1) * 4] for p in parts])
        assert torch.equal(together, order[b * 8 : (b + 1) * 8])
    assert torch.equal(shard_order(order, 4, 0, 1), order)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _no_host_reads():
    def refuse(*args, **kwargs):
        raise AssertionError("a host read (sync) inside the memory-bank update")

    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__int__", "__bool__", "cpu")}
    for name in saved:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial state on every rank, as the engine seeds it
    from kdcli.engine.distributed import average_parameter_gradients
    from kdcli.methods.memory import ContrastMemory

    bank = ContrastMemory(num_samples=8, dim=4, momentum=0.5)
    # Each rank updates its own samples with its own embeddings.
    index = torch.tensor([rank * 2, rank * 2 + 1])
    emb = torch.full((2, 4), float(rank + 1))
    with _no_host_reads():  # the bank's all-gathers never wait for the device (no .item(), int(), tolist())
        bank.update(index, emb, -emb)
    z = bank.constant(0, lambda: torch.tensor(float(rank + 1)))
    net = torch.nn.Linear(3, 1)
    net(torch.full((1, 3), float(rank + 1))).sum().backward()
    average_parameter_gradients(net.parameters())
    torch.save({"student": bank.student, "teacher": bank.teacher, "z": z, "grad": net.weight.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_memory_bank_and_agent_gradients_agree_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ("student", "teacher", "z", "grad"):
        assert torch.equal(a[key], b[key]), key
    # Both ranks' rows landed in both banks: rows 0-1 from rank 0 (value 1), rows 2-3 from rank 1 (value 2).
    from kdcli.methods.memory import ContrastMemory

    torch.manual_seed(0)
    initial = ContrastMemory(num_samples=8, dim=4, momentum=0.5).student
    for row, value in ((0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0)):
        expected = torch.nn.functional.normalize(0.5 * initial[row] + 0.5 * value, dim=0)
        assert torch.allclose(a["student"][row], expected)
    assert torch.equal(a["student"][4:], initial[4:])
    assert a["z"].item() == pytest.approx(1.5 * 8)  # mean over ranks of the first batch's mean, times N
    assert torch.allclose(a["grad"], torch.full((1, 3), 1.5))  # mean of 1 and 2


@pytest.fixture
def teacher_file(kd, tmp_path):
    result = kd("train", "resnet8", "--data", TINY_DATA, "--epochs", "2", "--batch-size", "32",
                "--device", "cpu", "--out", tmp_path / "teacher")
    assert result.code == 0, result.stderr
    return tmp_path / "teacher" / "model.safetensors"


def test_torchrun_two_processes_match_one_process(tmp_path, teacher_file):
    common = ["distill", "--teacher", str(teacher_file), "--student", "resnet8", "--method", "kd",
              "--data", TINY_DATA, "--epochs", "3", "--batch-size", "32", "--device", "cpu",
              "--precision", "fp32", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single = subprocess.run([sys.executable, "-m", "kdcli", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "kdcli", *common, "--out", str(tmp_path / "two"), "--nproc", "2"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert double.returncode == 0, double.stderr
    one, two = json.loads(single.stdout), json.loads(double.stdout)  # rank 0 alone prints the summary
    assert two["processes"] == 2 and one["processes"] == 1
    assert "Traceback" not in double.stderr
    assert double.stderr.count("epoch   3/3") == 1  # one progress stream
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert lines[0]["train_samples"] == 128  # both ranks: 4 whole global batches of 32 (the partial one dropped)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "teacher", "two"]
    # Same global batch, same data order: the two runs agree within the noise of 4-class tiny data.
    assert abs(one["top1"] - two["top1"]) <= 15.0, (one["top1"], two["top1"])


def test_sync_bn_on_cpu_is_a_clear_error(kd, monkeypatch, tmp_path):
    from kdcli.engine import distributed
    from tests.conftest import assert_clean_error

    monkeypatch.setattr(distributed, "setup", lambda device: distributed.World(rank=0, size=2))
    result = kd("train", "resnet8", "--data", TINY_DATA, "--device", "cpu", "--sync-bn", "--out", tmp_path / "r")
    assert_clean_error(result, "--sync-bn needs GPUs")
    assert not (tmp_path / "r").exists()


def test_global_batch_must_split_over_processes(kd, monkeypatch, tmp_path):
    from kdcli.engine import distributed
    from tests.conftest import assert_clean_error

    monkeypatch.setattr(distributed, "setup", lambda device: distributed.World(rank=0, size=2))
    result = kd("train", "resnet8", "--data", TINY_DATA, "--device", "cpu", "--batch-size", "33", "--out", tmp_path / "r")
    assert_clean_error(result, "does not split over 2 processes")
