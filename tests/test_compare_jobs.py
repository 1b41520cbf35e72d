"""kd compare --jobs N: worker processes, the same results as one at a time, Ctrl-C stops all of them
resumably, device placement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdcli.compare.plan import Job
from kdcli.compare.run import Pool, parse_devices, placements
from kdcli.config import build_config
from kdcli.errors import KdError
from tests.conftest import MEASURED_FIELDS

# 50 steps an epoch, so that a Ctrl-C lands while the workers train.
DATA = "synthetic:classes=4,n=1600,size=16"


def grid(out: Path, *extra) -> list:
    return ["compare", "--teacher", "resnet8", "--student", "resnet8", "--methods", "none,kd", "--seeds", "2",
            "--data", DATA, "--epochs", "3", "--batch-size", "32", "--device", "cpu", "--out", out, *extra]


def metrics(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_FIELDS} for line in lines]


RUNS = ["none-seed0", "kd-seed0", "none-seed1", "kd-seed1"]


def test_jobs_two_stops_on_ctrl_c_resumes_and_matches_one_at_a_time(kd, tmp_path):
    assert kd("train", "resnet8", "--data", DATA, "--epochs", "1", "--batch-size", "32", "--device", "cpu",
              "--out", tmp_path / "teacher").code == 0
    straight = tmp_path / "straight"
    one = kd(*grid(straight, "--json"))
    assert one.code == 0, one.stderr

    parallel = tmp_path / "parallel"
    log = tmp_path / "parallel.log"
    with open(log, "w") as handle:
        # One thread, as this test process computes the straight grid: workers use the pool's thread count.
        proc = subprocess.Popen([sys.executable, "-m", "kdcli", *map(str, grid(parallel, "--jobs", "2"))],
                                stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not list(parallel.glob("*/checkpoints/last.safetensors")):  # a worker finished its first epoch
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the pool stops every worker at a checkpoint
    assert proc.wait(timeout=120) == 130, log.read_text()
    output = log.read_text()
    assert "Traceback" not in output and "error: interrupted" in output and f"--out {parallel}" in output
    lines = output.splitlines()
    first_done = next((i for i, line in enumerate(lines) if line.startswith(("done ", "stopped "))), len(lines))
    assert sum(line.startswith("start ") for line in lines[:first_done]) == 2  # two workers ran at once
    assert not all((parallel / name / "summary.json").is_file() for name in RUNS)

    again = kd(*grid(parallel, "--jobs", "2", "--json"))  # the same command continues
    assert again.code == 0, again.stderr
    assert "(resuming)" in again.stderr and "2 at a time" in again.stderr
    for name in RUNS:
        assert metrics(parallel / name) == metrics(straight / name), name
    rows = lambda text: [{k: r[k] for k in ("label", "runs", "per_seed", "top1_mean", "top1_std", "delta_top1", "delta_ci")}
                         for r in json.loads(text)["rows"]]
    assert rows(again.stdout) == rows(one.stdout)  # the same table as --jobs 1
    assert not list(parallel.glob("*.log"))  # worker logs live in .kd-compare/, not among the runs
    assert list((parallel / ".kd-compare").glob("*.log"))


def test_devices_and_placement():
    assert parse_devices("0,1") == ["0", "1"] and parse_devices(None) is None
    for bad in ("", "gpu0", "0,x"):
        with pytest.raises(KdError, match="--devices"):
            parse_devices(bad)
    jobs = [Job(f"run{i}", build_config({"command": "train", "student": "resnet8", "method": "none", "device": "auto"}))
            for i in range(3)]
    assert placements(jobs, ["0", "1"]) == ["cuda:0", "cuda:1"]
    assert placements(jobs, ["cpu"]) == ["cpu"]
    cpu = [Job("c", build_config({"command": "train", "student": "resnet8", "method": "none", "device": "cpu"}))]
    assert placements(cpu, None) == [None]  # a CPU run keeps its device

    class Running:  # the pool places a new job on the least used device
        def poll(self):
            return None

    pool = Pool.__new__(Pool)
    pool.slots, pool.running = ["cuda:0", "cuda:1"], {}
    assert pool._free_slot() == "cuda:0"
    pool.running = {"a": (Running(), None, "cuda:0")}
    assert pool._free_slot() == "cuda:1"
    pool.running["b"] = (Running(), None, "cuda:1")
    pool.running["c"] = (Running(), None, "cuda:0")
    assert pool._free_slot() == "cuda:1"


def test_bad_jobs(kd, tmp_path):
    result = kd("compare", "--student", "resnet8", "--methods", "none", "--data", DATA, "--device", "cpu",
                "--jobs", "0", "--out", tmp_path / "c")
    assert result.code == 2 and "error: --jobs 0 is invalid" in result.stderr and "hint:" in result.stderr
    assert not (tmp_path / "c").exists()


def test_devices_without_jobs_is_refused(kd, tmp_path):
    from tests.conftest import assert_clean_error

    result = kd("compare", "--teacher", "resnet8", "--student", "resnet8", "--devices", "0", "--out", tmp_path / "c")
    assert_clean_error(result, "--devices")
    assert not (tmp_path / "c").exists()
