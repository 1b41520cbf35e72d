"""Grid wall time of `kd compare --jobs 1` vs `--jobs N`: the same runs, each grid in a fresh folder.

    .venv/bin/python benchmarks/compare_jobs.py --jobs 1,2 --epochs 5 --seeds 2

Trains one teacher into a private teacher store, then runs the same `kd compare` command (through the
real entry point, as a user would) once per --jobs value, timing the whole command: planning, worker
start-up, training, aggregation and the compare.* files. It checks that every grid gives the same
table (per-seed top-1 of each method) and prints one markdown row per --jobs value with the load
average before and after, since a shared machine moves these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def kd(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcli", *args], env=env, capture_output=True, text=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1,2", help="comma-separated --jobs values to time")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--methods", default="none,kd")
    parser.add_argument("--seeds", default="2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-compare-jobs")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    env = {**os.environ, "KD_HOME": str(root / "home")}
    common = ["--data", args.data, "--epochs", str(args.epochs), "--device", "cpu"]
    if not (root / "teacher" / "summary.json").is_file():
        done = kd(["train", args.teacher, *common, "--out", str(root / "teacher"), "--overwrite"], env)
        if done.returncode:
            sys.exit(done.stderr)

    tables, lines = {}, []
    for jobs in map(int, args.jobs.split(",")):
        out = root / f"jobs{jobs}-{time.strftime('%H%M%S')}"
        command = ["compare", "--teacher", args.teacher, "--student", args.student, "--methods", args.methods,
                   "--seeds", args.seeds, *common, "--out", str(out), "--jobs", str(jobs), "--json"]
        load_before = os.getloadavg()
        start = time.perf_counter()
        done = kd(command, env)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        if done.returncode:
            sys.exit(done.stderr)
        rows = json.loads(done.stdout)["rows"]
        tables[jobs] = {(r["label"], str(r["teacher"])): r["per_seed"] for r in rows}
        runs = sum(r["runs"] for r in rows)
        lines.append(f"| {jobs} | {runs} | {wall:.1f} | {' / '.join(f'{x:.2f}' for x in load_before)} | "
                     f"{' / '.join(f'{x:.2f}' for x in load_after)} |")
        print(f"kd {' '.join(command)}: {wall:.1f} s", file=sys.stderr)
    same = all(table == next(iter(tables.values())) for table in tables.values())
    print(f"\n{args.teacher} -> {args.student} on {args.data}, methods {args.methods}, seeds {args.seeds}, "
          f"{args.epochs} epochs; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"same per-seed top-1 for every --jobs: {same}\n")
    print("| --jobs | runs | grid wall time (s) | load avg before (1/5/15 min) | after |")
    print("|---:|---:|---:|---|---|")
    print("\n".join(lines))
    if not same:
        sys.exit("the tables differ between --jobs values")


if __name__ == "__main__":
    main()
