"""GPU-path settings that the CPU can check (issue 13): loader workers, per-epoch peak memory, backend
flags and --deterministic, the bf16 teacher copy, static shapes for capture."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kdcli import api
from kdcli.config import RunConfig, build_config, read_config_file, to_toml
from kdcli.data.loaders import default_num_workers, make_loader
from kdcli.data.registry import build_data
from kdcli.engine.memory import peak_memory_mb, reset_peak_memory
from tests.conftest import TINY_DATA, _Silent
from tests.test_data import write_image_folder


# ---- image-folder workers ------------------------------------------------------------------------

def test_image_folder_runs_use_the_per_core_worker_default(tmp_path, monkeypatch):
    cores = {0, 1, 2}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores, raising=False)
    assert default_num_workers() == 3
    cores.update(range(3, 20))
    assert default_num_workers() == 8  # at most 8
    assert RunConfig().workers is None and build_config({}).workers is None
    bundle = build_data(f"imagefolder:{write_image_folder(tmp_path)}", image_size=16)
    assert make_loader(bundle.train, bundle, 2, True, num_workers=RunConfig().workers).loader.num_workers == 8
    assert make_loader(bundle.train, bundle, 2, True, num_workers=0).loader.num_workers == 0  # --workers 0 kept
    assert "workers" not in to_toml(RunConfig())  # config.toml leaves it to the machine that resumes


# ---- peak memory ---------------------------------------------------------------------------------

def _touch(mib: int) -> None:
    block = torch.ones(mib * 2**20 // 4)  # resident: every page written
    del block


def test_peak_memory_resets(tmp_path):
    reset_peak_memory(torch.device("cpu"))
    _touch(300)
    high = peak_memory_mb(torch.device("cpu"))
    reset_peak_memory(torch.device("cpu"))
    assert peak_memory_mb(torch.device("cpu")) < high - 200


def test_epoch_peak_memory_excludes_what_ran_before_the_run(tmp_path):
    """An earlier run (e.g. of kd compare) or the teacher's evaluation must not count in an epoch's peak."""
    _touch(400)
    before = peak_memory_mb(torch.device("cpu"))
    out = tmp_path / "run"
    api.run(build_config({"command": "train", "student": "resnet8", "method": "none", "data": TINY_DATA,
                          "epochs": 1, "batch_size": 32, "device": "cpu", "out": str(out)}), reporter=_Silent())
    epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < epoch["peak_memory_mb"] < before - 200
