"""Digits comparison: a plain student vs KD vs the four core methods, several seeds, mean ± std.

    .venv/bin/python benchmarks/digits_compare.py --epochs 15 --seeds 0,1,2

Trains a resnet32 teacher on the bundled digits once, distills it into resnet8 with each method and
seed (finished runs are reused), and prints a markdown table built by `kdcli.api.compare`.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from kdcli import api
from kdcli.config import build_config, load_preset


class Quiet(SilentReporter):
    def epoch_end(self, m):
        print(f"  epoch {m['epoch']}: val {m['val_top1']:.2f}", flush=True)


def run_once(layers: dict, out: Path) -> dict:
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    print(f"{out.name} ...", flush=True)
    return api.run(build_config(load_preset("quickstart"), layers, {"out": str(out)}), overwrite=True, reporter=Quiet())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="none,kd,sp,crcd,itkd,mlkd")
    parser.add_argument("--teacher", default="resnet32")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--out", default="runs/bench-digits")
    args = parser.parse_args()
    root = Path(args.out)
    common = {"epochs": args.epochs, "device": "cpu"}
    teacher = run_once({**common, "command": "train", "student": args.teacher, "method": "none"}, root / "teacher")
    for method in args.methods.split(","):
        for seed in map(int, args.seeds.split(",")):
            layers = {**common, "command": "distill", "teacher": teacher["weights"], "student": args.student,
                      "method": method, "seed": seed}
            run_once(layers, root / "runs" / f"{method}-seed{seed}")
    result = api.compare([str(root / "runs")])
    print(f"\nteacher {args.teacher}: top-1 {teacher['top1']:.2f}; student {args.student}; "
          f"{args.epochs} epochs, seeds {args.seeds}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| method | top-1 last (mean ± std) | top-1 best (mean ± std) | s/epoch |")
    print("|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['method']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | "
              f"{r['best_top1_mean']:.2f} ± {r['best_top1_std']:.2f} | {r['time_per_epoch_s']:.1f} |")
    (root / "compare.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
