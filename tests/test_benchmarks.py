"""The benchmark scripts run end to end in their tiny modes and write the JSON they document.

No timing is asserted: these only keep the scripts working as the library changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_throughput_quick_writes_every_configuration(tmp_path):
    out = tmp_path / "results.json"
    result = run_script("throughput.py", "--quick", "--device", "cpu", "--methods", "kd,crd,mlkd", "--out", str(out),
                        cwd=tmp_path)
    report = json.loads(out.read_text())
    assert {"command", "date", "machine", "load_avg_before", "load_avg_after", "settings", "results"} <= set(report)
    assert {"device", "cpu", "cores", "torch"} <= set(report["machine"])
    windows = report["settings"]["windows"]
    rows = {r["method"]: r for r in report["results"]}
    assert {(r["method"], r["batch_size"]) for r in report["results"]} == {("kd", 16), ("crd", 16), ("mlkd", 16)}
    for method, r in rows.items():
        assert {"teacher", "student"} <= set(r)
        for variant in ("kd", "kd_fp32"):
            assert r[variant]["images_per_s"] > 0
            assert len(r[variant]["windows"]) == windows
            assert r[variant]["precision"] in ("fp32", "bf16")
            # step time against kd's at the same pair, batch size and precision
            assert r[variant]["step_vs_kd"] == pytest.approx(rows["kd"][variant]["images_per_s"] / r[variant]["images_per_s"])
        assert r["kd_fp32"]["precision"] == "fp32"
        # 240 epochs x 50,000 images at the measured rate, in minutes
        assert r["kd"]["projected_240_epochs_min"] == pytest.approx(240 * 50_000 / r["kd"]["images_per_s"] / 60)
    for r in (rows["kd"], rows["crd"]):  # the methods the reference loop implements
        assert len(r["reference"]["windows"]) == windows and r["reference"]["precision"] == "fp32"
        assert r["ratio_kd"] == pytest.approx(r["kd"]["images_per_s"] / r["reference"]["images_per_s"])
        assert r["ratio_kd_fp32"] > 0
    assert rows["mlkd"]["reference"] is None and "ratio_kd" not in rows["mlkd"]
    assert rows["kd"]["kd"]["step_vs_kd"] == 1.0
    assert "reference img/s" in result.stdout and "kd 240 ep (min)" in result.stdout  # the markdown table
    mlkd_line = next(line for line in result.stdout.splitlines() if "| mlkd |" in line)
    assert mlkd_line.split(" | ")[3] == "-"  # no reference column for mlkd


def test_fast_vs_reference_tiny_reports_every_mode(tmp_path):
    out = tmp_path / "fast-vs-ref"
    result = run_script("fast_vs_reference_digits.py", "--tiny", "--device", "cpu", "--out", str(out),
                        "--modes", "fast,fast_bf16_head,reference", cwd=tmp_path)
    report = json.loads((out / "results.json").read_text())
    seeds = report["settings"]["seeds"]
    assert report["fast"]["precision"] == "bf16" and report["reference"]["precision"] == "fp32"
    assert report["fast"]["loader"] == "TensorLoader" and report["reference"]["loader"] == "DataLoader+PIL"
    assert report["fast_bf16_head"]["classifier"] == "bf16" and "bf16 classifiers" in result.stdout
    for mode in ("fast", "fast_bf16_head", "reference"):
        assert len(report[mode]["top1"]) == len(seeds)
        assert all(0.0 <= v <= 100.0 for v in report[mode]["top1"])
        assert {"mean", "std"} <= set(report[mode])
    assert len(report["fast"]["paired_difference"]["per_seed"]) == len(seeds)
    assert isinstance(report["within_noise"], bool) and report["tolerance"] >= 0
    assert report["command"] in result.stdout
