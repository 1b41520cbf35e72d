"""Data parallelism on CPU with the gloo backend: sharding, consistent state across ranks, and a real torchrun run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdcli.data.loaders import shard_order
from tests.conftest import MEASURED_FIELDS, TINY_DATA


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
    assert "Warning" not in double.stderr  # torch's DDP deprecation notices are not the user's business
    assert double.stderr.count("epoch   3/3") == 1  # one progress stream
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert lines[0]["train_samples"] == 128  # both ranks: 4 whole global batches of 32 (the partial one dropped)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "teacher", "two"]
    # Same global batch, same data order: the two runs agree within the noise of 4-class tiny data.
    assert abs(one["top1"] - two["top1"]) <= 15.0, (one["top1"], two["top1"])


def test_a_second_run_in_the_process_reuses_the_group_and_teardown_leaves_it(tmp_path, monkeypatch):
    from kdcli.engine import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, with the group of an earlier run
        monkeypatch.setenv("RANK", "1")
        group = dist.group.WORLD
        assert distributed.setup("cpu") == distributed.World(rank=1, size=2)
        assert dist.group.WORLD is group
        distributed.teardown()
        assert not dist.is_initialized()
        distributed.teardown()  # no group: nothing to leave
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_kd_command_leaves_the_group_after_its_run_and_after_a_stop(kd, monkeypatch, tmp_path):
    from kdcli import api
    from kdcli.engine import distributed
    from kdcli.engine.trainer import Stopped

    left = []
    monkeypatch.setattr(distributed, "teardown", lambda: left.append("left"))
    assert kd("train", "resnet8", "--data", TINY_DATA, "--epochs", "1", "--device", "cpu", "--out", tmp_path / "r").code == 0
    assert left == ["left"]

    def stopped(*args, **kwargs):
        raise Stopped("interrupted at step 3/4 of epoch 1", "resume with kd train --resume r", exit_code=130)

    monkeypatch.setattr(api, "run", stopped)
    assert kd("train", "resnet8", "--data", TINY_DATA, "--device", "cpu", "--out", tmp_path / "s").code == 130
    assert left == ["left", "left"]


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


class _Quiet:
    def start(self, *a): ...
    def step(self, *a): ...
    def epoch_end(self, metrics): ...
    def finish(self): ...
    def note(self, text): ...


class _CtrlCAt(_Quiet):
    """Every rank gets a SIGINT at `at` = (epoch, step); they stop together at the next log step (20)."""

    def __init__(self, at):
        self.at = at

    def step(self, epoch, step, *rest):
        if (epoch, step) == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def _itkd_config(teacher: str, out: Path):
    from kdcli.config import build_config

    return build_config({"command": "distill", "teacher": teacher, "student": "resnet8", "method": "itkd",
                         "options": {"warmup": 1, "rl_every": 1}, "data": "synthetic:classes=4,n=800,size=16",
                         "epochs": 2, "batch_size": 16, "device": "cpu", "precision": "fp32", "seed": 3,
                         "out": str(out)})


def _stop_and_resume_worker(rank: int, world: int, port: int, teacher: str, tmp: str) -> None:
    """Runs ITKD straight through, then stopped inside its learning epoch 2 and resumed, on 2 gloo ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from kdcli import api
    from kdcli.engine.trainer import Stopped

    tmp = Path(tmp)
    api.run(_itkd_config(teacher, tmp / "straight"), reporter=_Quiet())
    try:
        api.run(_itkd_config(teacher, tmp / "stopped"), reporter=_CtrlCAt((2, 4)))
        raise AssertionError("the run did not stop")
    except Stopped as stopped:
        assert "interrupted at step 20/40 of epoch 2" in stopped.message, stopped.message
    dist.barrier()
    if rank == 0:
        shutil.copytree(tmp / "stopped", tmp / "fewer")  # to resume on one process
    dist.barrier()
    api.resume(tmp / "stopped", reporter=_Quiet())
    dist.destroy_process_group()


def test_ddp_stop_inside_an_itkd_epoch_resumes_bit_exact_and_on_fewer_processes(kd, tmp_path):
    """Each rank checkpoints its own random streams, running sums and ITKD rollout: resumed on 2 ranks the run
    equals the uninterrupted one bit for bit; resumed on 1 it goes on from the same global batch."""
    from safetensors.torch import load_file

    from kdcli.engine.checkpoint import load_state
    from kdcli.models import create_model
    from kdcli.teachers import save_model

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    save_model(teacher, create_model("resnet8", num_classes=4), arch="resnet8", num_classes=4, dataset="synthetic")
    mp.spawn(_stop_and_resume_worker, args=(2, _free_port(), str(teacher), str(tmp_path)), nprocs=2, join=True)

    got, expected = (load_file(tmp_path / run / "student.safetensors") for run in ("stopped", "straight"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    lines = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("stopped", "straight")}
    drop = MEASURED_FIELDS
    assert [{k: v for k, v in m.items() if k not in drop} for m in lines["stopped"]] == \
           [{k: v for k, v in m.items() if k not in drop} for m in lines["straight"]]

    shares = load_state(tmp_path / "fewer" / "checkpoints" / "last.safetensors")["ranks"]
    assert len(shares) == 2 and all(s["method"]["pending"] is not None for s in shares)
    assert not torch.equal(shares[0]["rng"]["torch"], shares[1]["rng"]["torch"])  # each rank its own draws
    assert not torch.equal(shares[0]["method"]["pending"]["states"], shares[1]["method"]["pending"]["states"])

    result = kd("distill", "--resume", tmp_path / "fewer")
    assert result.code == 0, result.stderr
    assert "checkpointed by 2 processes on 1" in result.stderr
    fewer = [json.loads(line) for line in (tmp_path / "fewer" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in fewer] == [1, 2]
    assert fewer[0] == lines["straight"][0] | {k: fewer[0][k] for k in drop}  # epoch 1 is the 2-process run's
    assert fewer[1]["train_samples"] == lines["straight"][1]["train_samples"] == 640  # every sample once
    assert math.isfinite(fewer[1]["train_loss"]) and 0 <= fewer[1]["train_top1"] <= 100


def test_running_sums_of_two_ranks_regroup_onto_one_or_four():
    """The trainer's epoch mean is (sum over ranks of the terms) / (steps * ranks); hits and samples are sums."""
    from kdcli.engine.resume_state import EpochSums

    def saved(kd, hits, samples):
        return EpochSums({"kd": torch.tensor(kd)}, torch.tensor(hits), samples, 2, 1.5, torch.tensor(hits + 1)).state()

    shares = [saved(1.0, 5, 8), saved(3.0, 7, 8)]
    for world in (1, 4):
        parts = [EpochSums.regrouped(shares, rank, world, torch.device("cpu")) for rank in range(world)]
        kd = sum(p.terms["kd"] for p in parts) / (2 * world)
        assert kd.item() == 1.0  # ((1 + 3) / 2 ranks) / 2 steps
        assert sum(p.correct for p in parts).item() == 12 and sum(p.correct5 for p in parts).item() == 14
        assert sum(p.samples for p in parts) == 16 and all(p.steps == 2 for p in parts)


@pytest.mark.parametrize("views", [None, "rotations", "strong"])
def test_ranks_get_their_rows_of_the_one_process_global_batch_augmented_alike(views):
    """Same images, same crops, flips and views per global batch whatever the number of processes: a run
    checkpointed by N processes goes on with the same batches on fewer."""
    from kdcli.data.loaders import TensorLoader
    from kdcli.data.registry import InMemorySplit

    split = InMemorySplit(torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8), torch.arange(37) % 5)

    def batches(per_rank, rank, world):
        loader = TensorLoader(split, per_rank, True, (0.5,) * 3, (0.25,) * 3, seed=7, views=views, shard=(rank, world))
        loader.set_epoch(3)
        return list(loader)

    one = batches(8, 0, 1)
    ranks = [batches(4, r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 37 // 8  # the partial global batch dropped
    for b, whole in enumerate(one[: 37 // 8]):
        parts = [ranks[r][b] for r in range(2)]
        assert torch.equal(torch.cat([p.x for p in parts]), whole.x)
        assert torch.equal(torch.cat([p.index for p in parts]), whole.index)
        if views:
            copies = whole.views.shape[0] // 8
            per_view = [torch.cat([p.views.view(copies, 4, 3, 8, 8)[v] for p in parts]) for v in range(copies)]
            assert torch.equal(torch.cat(per_view), whole.views)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ab", "at", "cc", "crcd", "crd", "ctkd", "dist", "dkd", "fitnet", "fsp", "ft", "itkd",
                                    "kd", "kdsvd", "mlkd", "mlld", "nst", "ofd", "pkt", "reviewkd", "rkd", "sp", "vid"])
def test_every_method_trains_on_two_processes(method, tmp_path, teacher_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    acting = ["--set", "warmup=1", "--set", "rl_every=1"] if method == "itkd" else []  # the agent acts and learns
    result = subprocess.run([sys.executable, "-m", "kdcli", "distill", "--teacher", str(teacher_file), "--student", "resnet8",
                             "--method", method, *acting, "--data", TINY_DATA, "--epochs", "2", "--batch-size", "32",
                             "--device", "cpu", "--nproc", "2", "--out", str(tmp_path / "run"), "--json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    main = [m for m in lines if m.get("stage", "main") == "main"]  # after ab/fsp/ft's init stage, if any
    assert len(main) == 2 and all(math.isfinite(m["train_loss"]) for m in lines)
