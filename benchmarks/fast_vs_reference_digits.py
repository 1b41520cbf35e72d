"""Does kd's fast mode change results? bf16 + device loader vs fp32 + a RepDistiller-style PIL pipeline.

    .venv/bin/python benchmarks/fast_vs_reference_digits.py --epochs 15 --seeds 0,1,2 --out runs/bench-fast-vs-ref

On the bundled digits (offline), a teacher is trained once, then for every seed the student is
distilled twice with `kd distill --method kd` (quickstart preset otherwise):

- `fast`: the kd defaults with `--precision bf16`: bf16 autocast, channels_last, the device-resident
  TensorLoader with its batched crop/flip.
- `reference`: `--precision fp32`, NCHW (no channels_last) and RepDistiller's data path for training:
  a torch DataLoader over PIL images with RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor +
  Normalize (swapped in for kd's train loader; evaluation is the same for both).

`--modes` may add `fast_fp32`: kd's data path and channels_last in fp32, which separates the effect
of bf16 from that of the data path; and `fast_bf16_head`: `fast` with the networks' final classifiers
left in bf16 too (kd keeps them in fp32 under bf16 autocast; this shows what that buys).

Reported: last-epoch top-1 per seed, mean ± std (sample std) of each mode, whether the difference of
the means is within 2 pooled std (sqrt((std_fast^2 + std_ref^2) / 2)), and the per-seed (paired)
difference to the reference, mean ± std: runs of one seed start from the same weights, so a
difference with the same sign on every seed is a systematic effect even when it is within 2 std.
A benchmark, not a test. Finished runs with the same config in `--out` are reused.
`--tiny` runs a seconds-long version on small synthetic data (for the test suite).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from torch.utils.data import DataLoader

from kdcli import api
from kdcli.batch import Batch
from kdcli.config import build_config, load_preset, to_toml
from kdcli.data.loaders import epoch_seed
from kdcli.data.registry import DataBundle, InMemorySplit
from kdcli.engine import trainer as trainer_module
from kdcli.report import SilentReporter
from reference import ReferenceInstance, hwc_arrays, reference_transform
from throughput import device_info

TINY = {"data": "synthetic:classes=4,n=160,size=16", "epochs": 1, "seeds": "0", "teacher": "resnet8", "student": "resnet8"}


class ReferenceLoader:
    """RepDistiller's training data path behind kd's loader interface (set_epoch, len, Batch items).

    A DataLoader over the split as PIL images, transformed on the host to normalised float32 NCHW,
    then copied to the device. The shuffle is seeded from (seed, epoch); the crops and flips draw from
    the global torch RNG as torchvision's transforms do (the run seeds it).
    """

    def __init__(self, split: InMemorySplit, bundle: DataBundle, batch_size: int, device, seed: int, workers: int):
        dataset = ReferenceInstance(hwc_arrays(split.images), split.labels.tolist(),
                                    reference_transform(bundle.mean, bundle.std, bundle.input_size[0]))
        self.generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=self.generator)
        self.device, self.seed, self.start = torch.device(device), seed, 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        self.start = start

    def __len__(self) -> int:
        return len(self.loader) - self.start

    def __iter__(self) -> Iterator[Batch]:
        for i, (x, y, index) in enumerate(self.loader):
            if i >= self.start:
                yield Batch(x.to(self.device), y.to(self.device), index.to(self.device))


@contextlib.contextmanager
def reference_data_path(workers: int):
    """Make api.run train on ReferenceLoader (validation loaders and the method's dry run are unchanged)."""
    original = api.make_loader
    signature = inspect.signature(original)

    def make_loader(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a["train"] and isinstance(a["split"], InMemorySplit) and not a.get("views"):
            return ReferenceLoader(a["split"], a["bundle"], a["batch_size"], a["device"], a["seed"], workers)
        return original(*args, **kwargs)

    with mock.patch.object(api, "make_loader", make_loader):
        yield


class Quiet(SilentReporter):
    def epoch_end(self, m):
        print(f"    epoch {m['epoch']}: val top-1 {m['val_top1']:.2f} ({m['epoch_time_s']:.1f} s)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def bf16_classifiers():
    """Make the trainer leave the final classifiers under autocast (bf16), as kd did before it kept them in fp32."""
    with mock.patch.object(trainer_module, "classifier_in_fp32", lambda model: None):
        yield


MODES = {
    "fast": {"precision": "bf16", "channels_last": True, "loader": "TensorLoader"},
    "fast_bf16_head": {"precision": "bf16", "channels_last": True, "loader": "TensorLoader", "classifier": "bf16"},
    "fast_fp32": {"precision": "fp32", "channels_last": True, "loader": "TensorLoader"},
    "reference": {"precision": "fp32", "channels_last": False, "loader": "DataLoader+PIL"},
}
MODE_CONTEXT = {"reference": reference_data_path, "fast_bf16_head": lambda workers: bf16_classifiers()}


def run(layers: dict, out: Path) -> dict:
    """api.run with the quickstart preset under `layers`; a finished run with the same config.toml is reused."""
    config = build_config(load_preset("quickstart"), layers, {"out": str(out)})
    if (out / "summary.json").is_file() and (out / "config.toml").is_file() and (out / "config.toml").read_text() == to_toml(config):
        print(f"  {out.name}: reused", file=sys.stderr, flush=True)
        return json.loads((out / "summary.json").read_text())
    print(f"  {out.name} ...", file=sys.stderr, flush=True)
    return api.run(config, overwrite=True, reporter=Quiet())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default="fast,reference",
                        help="fast and reference, optionally fast_fp32 (TensorLoader + channels_last in fp32) "
                             "and fast_bf16_head (fast with bf16 classifiers)")
    parser.add_argument("--teacher", default="resnet32")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ref-workers", type=int, default=0, help="DataLoader workers of the reference data path")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run on tiny synthetic data (tests)")
    parser.add_argument("--out", default="runs/bench-fast-vs-ref", help="folder for the runs and results.json")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    modes = args.modes.split(",")
    if not {"fast", "reference"} <= set(modes) or not set(modes) <= set(MODES):
        parser.error(f"--modes must include fast and reference, from {', '.join(MODES)}")
    root = Path(args.out)
    os.environ.setdefault("KD_HOME", str(root / "kd_home"))  # keep the trained teacher out of the user's store
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(command, file=sys.stderr)
    started = time.time()
    common = {"data": args.data, "epochs": args.epochs, "device": args.device}
    print(f"teacher {args.teacher}:", file=sys.stderr)
    teacher = run({**common, "command": "train", "student": args.teacher, "method": "none"}, root / "teacher")
    top1: dict[str, list[float]] = {mode: [] for mode in modes}
    seconds: dict[str, float] = {mode: 0.0 for mode in modes}
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        for mode in modes:
            settings = {k: MODES[mode][k] for k in ("precision", "channels_last")}
            layers = {**common, **settings, "command": "distill", "teacher": teacher["weights"],
                      "student": args.student, "method": "kd", "seed": seed}
            with MODE_CONTEXT.get(mode, lambda workers: contextlib.nullcontext())(args.ref_workers):
                summary = run(layers, root / f"{mode}-seed{seed}")
            top1[mode].append(summary["top1"])
            seconds[mode] += summary["time_s"]
    stats = {mode: mean_std(values) for mode, values in top1.items()}
    difference = stats["fast"][0] - stats["reference"][0]
    pooled = math.sqrt((stats["fast"][1] ** 2 + stats["reference"][1] ** 2) / 2)
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": device_info(api.resolve_device(args.device)),
        "settings": {"data": args.data, "epochs": args.epochs, "seeds": seeds, "teacher": args.teacher,
                     "student": args.student, "method": "kd", "ref_workers": args.ref_workers},
        "teacher_top1": teacher["top1"],
        "difference": difference,
        "tolerance": 2 * pooled,
        "within_noise": abs(difference) <= 2 * pooled,
        "wall_s": time.time() - started,
    }
    for mode in modes:
        paired = [a - b for a, b in zip(top1[mode], top1["reference"])]
        report[mode] = {**MODES[mode], "top1": top1[mode], "mean": stats[mode][0], "std": stats[mode][1],
                        "train_time_s": seconds[mode]}
        if mode != "reference":
            # Same seed: same initial weights, so the per-seed difference is the sharper test.
            report[mode]["paired_difference"] = dict(zip(("mean", "std"), mean_std(paired)), per_seed=paired)
    (root / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{command}\n")
    print(f"{args.teacher} -> {args.student}, kd, {args.data}, {args.epochs} epochs, seeds {args.seeds}; "
          f"teacher top-1 {teacher['top1']:.2f}; {report['machine']}; {report['wall_s']:.0f} s in all\n")
    print("| mode | precision | data path | top-1 per seed | mean ± std | minus reference, per seed (mean ± std) | train time (s) |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        r = report[mode]
        per_seed = ", ".join(f"{v:.2f}" for v in r["top1"])
        paired = r.get("paired_difference")
        paired_text = f"{paired['mean']:+.2f} ± {paired['std']:.2f}" if paired else ""
        head = ", bf16 classifiers" if r.get("classifier") == "bf16" else ""
        print(f"| {mode} | {r['precision']}{', channels_last' if r['channels_last'] else ''}{head} | {r['loader']} | "
              f"{per_seed} | {r['mean']:.2f} ± {r['std']:.2f} | {paired_text} | {r['train_time_s']:.0f} |")
    verdict = "within" if report["within_noise"] else "NOT within"
    print(f"\ndifference fast - reference: {difference:+.2f} points, {verdict} 2 pooled std ({2 * pooled:.2f})")
    print(f"results: {root / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
