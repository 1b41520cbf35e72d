"""Training throughput of kd's distill step against a RepDistiller-style reference loop, in one run.

    .venv/bin/python benchmarks/throughput.py --device cpu --pairs resnet110:resnet20 --methods kd \
        --batch-sizes 64 --out results.json

Per configuration (teacher:student pair x method x batch size) three variants train on the same
device, on the same CIFAR-100-sized synthetic set (`synthetic:classes=100,n=64000,size=32`: 51,200
uint8 training images in memory, no download):

- `reference`: the loop as RepDistiller writes it (train_student.py / helper/loops.py): a torch
  DataLoader over the uint8 HWC array, PIL images through RandomCrop(32, 4) + RandomHorizontalFlip +
  ToTensor + Normalize, fp32, NCHW, teacher forward under no_grad in eval mode, student forward,
  CE*0.1 + KD*0.9 (T=4) for kd, CE + 0.8*CRD for crd (embed heads, two memory banks, per-sample
  negatives drawn with np.random.choice in the dataset's __getitem__), SGD(0.05, momentum 0.9,
  wd 5e-4), loss.item() and top-1/top-5 meters every step.
- `kd`: the objects `kdcli.api.run` builds (device-resident TensorLoader with its batched
  augmentation, the method, the teacher with its BatchNorm folded into its convolutions, the
  Trainer with both final classifiers in fp32 under bf16) with the product defaults `--precision auto` and channels_last; timed through `Trainer._train_epoch` itself (the epoch's last K batches, via the
  loader's resume offset), so the loop is exactly the one `kd distill` runs, without evaluation.
- `kd_fp32`: the same with `--precision fp32` (channels_last kept).

Any registered method can be timed (e.g. `--methods kd,crd,mlkd`); the reference loop exists for
kd and crd only, so other methods get no reference column. With kd in the run, every row also
reports its step time relative to kd's at the same pair, batch size and precision
(`step_vs_kd`: kd's images/s over the method's, 1.0 = as fast as kd).

Timing: after warm-up, `--windows` rounds; each round times one window of `--steps` steps of every
variant in turn (interleaved, so a change in machine load hits all variants alike), synchronising
CUDA at the window's ends. Reported: the median images/s over the windows and kd / reference.
Teachers are randomly initialised (throughput does not depend on the weights).

Caveat of the interleaving: the reference's DataLoader workers keep prefetching while the other
variants run, so each reference window starts with up to `prefetch_factor * workers` batches ready,
which favours the reference slightly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdcli import api
from kdcli.config import build_config
from kdcli.data import build_data
from kdcli.data.registry import DataBundle
from kdcli.engine import backend
from kdcli.engine.precision import resolve_precision
from kdcli.engine.trainer import EpochSums, Trainer
from kdcli.methods import method_class
from kdcli.models import create_model
from kdcli.report import SilentReporter
from reference import (
    CRDLoss, DistillKL, Meter, ReferenceInstance, ReferenceInstanceSample, accuracy, hwc_arrays, reference_transform,
)

DEFAULT_PAIRS = "resnet110:resnet20,resnet32x4:resnet8x4"
CIFAR100_SIZED = "synthetic:classes=100,n=64000,size=32"  # 51,200 train images: divisible by 64 and 256
QUICK_DATA = "synthetic:classes=10,n=200,size=16"
CRD_K = 16384  # nce_k, CRD's default
REFERENCE_METHODS = ("kd", "crd")  # the methods the reference loop implements
CIFAR100_TRAIN, PAPER_EPOCHS = 50_000, 240  # for the projected length of a paper-protocol run
LR = 0.05


# ---- the reference: RepDistiller's train_distill ---------------------------------------------------


def cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


class ReferenceRunner:
    """train_distill of RepDistiller for one (teacher, student, method, batch size)."""

    def __init__(self, bundle: DataBundle, teacher: str, student: str, method: str, batch_size: int,
                 device: torch.device, workers: int, crd_k: int, seed: int = 0):
        self.device = device
        data, targets = hwc_arrays(bundle.train.images), bundle.train.labels.tolist()
        transform = reference_transform(bundle.mean, bundle.std, bundle.input_size[0])
        self.crd = method == "crd"
        dataset = (ReferenceInstanceSample(data, targets, transform, crd_k) if self.crd
                   else ReferenceInstance(data, targets, transform))
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                 generator=torch.Generator().manual_seed(seed))
        self.batches = cycle(self.loader)
        torch.manual_seed(seed)
        self.model_t = create_model(teacher, num_classes=bundle.num_classes).to(device).eval()
        self.model_s = create_model(student, num_classes=bundle.num_classes).to(device).train()
        trainable = [self.model_s]
        self.criterion_div = DistillKL(4.0)
        if self.crd:
            x = torch.zeros(2, 3, *bundle.input_size, device=device)
            with torch.no_grad():
                s_dim = self.model_s(x, features=True)[2].shape[1]
                t_dim = self.model_t(x, features=True)[2].shape[1]
            self.criterion_kd = CRDLoss(s_dim, t_dim, len(dataset), crd_k).to(device)
            trainable.append(self.criterion_kd)
            self.gamma, self.alpha, self.beta = 1.0, 0.0, 0.8  # -r 1 -a 0 -b 0.8
        else:
            self.gamma, self.alpha, self.beta = 0.1, 0.9, 0.0  # -r 0.1 -a 0.9 -b 0
        params = [p for m in trainable for p in m.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)
        self.losses, self.top1, self.top5 = Meter(), Meter(), Meter()
        self.steps = 0

    def run(self, steps: int) -> int:
        """Train `steps` steps; returns the number of images."""
        images = 0
        for _ in range(steps):
            data = next(self.batches)
            if self.crd:
                input, target, index, contrast_idx = data
                contrast_idx = contrast_idx.to(self.device)
            else:
                input, target, index = data
            input = input.float().to(self.device)
            target, index = target.to(self.device), index.to(self.device)
            feat_s, logit_s = self._features(self.model_s, input)
            with torch.no_grad():
                feat_t, logit_t = self._features(self.model_t, input)
                feat_t = [f.detach() for f in feat_t]
            loss_cls = F.cross_entropy(logit_s, target)
            loss_div = self.criterion_div(logit_s, logit_t)
            loss_kd = self.criterion_kd(feat_s[-1], feat_t[-1], index, contrast_idx) if self.crd else 0
            loss = self.gamma * loss_cls + self.alpha * loss_div + self.beta * loss_kd
            acc1, acc5 = accuracy(logit_s, target, topk=(1, 5))
            self.losses.update(loss.item(), input.size(0))
            self.top1.update(acc1[0], input.size(0))
            self.top5.update(acc5[0], input.size(0))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            images += input.size(0)
        return images

    @staticmethod
    def _features(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """RepDistiller's `model(x, is_feat=True)`: ([stem, stages..., pooled], logits)."""
        logits, features, embedding = model(x, features=True)
        return [*features, embedding], logits


# ---- kd: the objects api.run builds, timed through the trainer's own epoch loop ---------------------


class KdRunner:
    """`kd distill` for one configuration and precision, built as kdcli.api.run builds it.

    The teacher has random weights (api.run would load them); nothing is written to disk.
    """

    def __init__(self, bundle: DataBundle, teacher: str, student: str, method: str, batch_size: int,
                 device: torch.device, precision: str, crd_k: int, seed: int = 0):
        options = {"K": crd_k} if method == "crd" else {}
        config = build_config({"command": "distill", "teacher": teacher, "student": student, "method": method,
                               "data": bundle.name, "batch_size": batch_size, "device": str(device),
                               "precision": precision, "seed": seed, "options": options})
        cls = method_class(config.method)
        self.device = device
        torch.manual_seed(config.seed)
        teacher_model = create_model(teacher, num_classes=bundle.num_classes)
        student_model, teacher_model, method_obj, train_loader, val_loader = api.build_training(
            config, cls, bundle, teacher_model, device)
        schedule = api.schedule_of(config)
        self.precision = resolve_precision(config.precision, device)
        self.channels_last = config.channels_last
        self.trainer = Trainer(student_model, teacher_model, method_obj, train_loader, val_loader, schedule,
                               run=None, reporter=SilentReporter(), save_weights=None, device=device,
                               precision=self.precision, compile=config.compile)
        self.num_batches = train_loader.num_batches
        self.epoch = 0

    def run(self, steps: int) -> int:
        """The last `steps` batches of a fresh epoch through Trainer._train_epoch; returns the number of images."""
        if steps > self.num_batches:
            raise SystemExit(f"--steps {steps} exceeds the {self.num_batches} batches of an epoch; use fewer steps")
        self.epoch += 1
        with backend.run_backend(self.precision):  # the switches Trainer.fit sets (TF32, cudnn.benchmark)
            result = self.trainer._train_epoch(self.epoch, EpochSums(steps=self.num_batches - steps))
        return int(result["train_samples"])


# ---- measurement --------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[int], int], steps: int, device: torch.device) -> float:
    """images/s of one window of `steps` steps."""
    sync(device)
    started = time.perf_counter()
    images = run(steps)
    sync(device)
    return images / (time.perf_counter() - started)


@dataclass
class Variant:
    name: str
    runner: ReferenceRunner | KdRunner
    windows: list[float]

    def summary(self) -> dict:
        out = {"images_per_s": statistics.median(self.windows), "windows": [round(w, 2) for w in self.windows]}
        if isinstance(self.runner, KdRunner):
            out.update(precision=self.runner.precision, channels_last=self.runner.channels_last, loader="TensorLoader")
        else:
            out.update(precision="fp32", channels_last=False, loader=f"DataLoader+PIL, {self.runner.loader.num_workers} workers")
        return out


def measure(args, bundle: DataBundle, teacher: str, student: str, method: str, batch_size: int,
            device: torch.device) -> dict:
    variants = []
    if method in REFERENCE_METHODS:
        variants.append(Variant("reference", ReferenceRunner(bundle, teacher, student, method, batch_size, device,
                                                             args.ref_workers, args.crd_k), []))
    for precision in args.kd_precisions.split(","):
        name = "kd" if precision == "auto" else f"kd_{precision}"
        variants.append(Variant(name, KdRunner(bundle, teacher, student, method, batch_size, device, precision, args.crd_k), []))
    for v in variants:
        v.runner.run(args.warmup)
    sync(device)
    for _ in range(args.windows):
        for v in variants:
            v.windows.append(timed(v.runner.run, args.steps, device))
    result = {"teacher": teacher, "student": student, "method": method, "batch_size": batch_size, "reference": None}
    for v in variants:  # the reference, when there is one, comes first
        result[v.name] = v.summary()
        if v.name != "reference":
            if result["reference"] is not None:
                result[f"ratio_{v.name}"] = result[v.name]["images_per_s"] / result["reference"]["images_per_s"]
            result[v.name]["projected_240_epochs_min"] = projected_minutes(result[v.name]["images_per_s"])
    return result


def add_step_vs_kd(results: list[dict], kd_names: list[str]) -> None:
    """Each row's step time over kd's (same pair, batch size, precision), when kd was measured."""
    kd_rows = {(r["teacher"], r["student"], r["batch_size"]): r for r in results if r["method"] == "kd"}
    for r in results:
        kd = kd_rows.get((r["teacher"], r["student"], r["batch_size"]))
        if kd is not None:
            for name in kd_names:
                r[name]["step_vs_kd"] = kd[name]["images_per_s"] / r[name]["images_per_s"]


def projected_minutes(images_per_s: float) -> float:
    """Minutes of training (evaluation excluded) for 240 epochs of CIFAR-100's 50,000 images."""
    return PAPER_EPOCHS * CIFAR100_TRAIN / images_per_s / 60


def device_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": str(device), "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            **{k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown_table(results: list[dict], kd_names: list[str]) -> str:
    head = ["teacher -> student", "method", "batch", "reference img/s"]
    for name in kd_names:
        head += [f"{name} img/s", f"{name} / ref", f"{name} 240 ep (min)", f"{name} step / method kd's"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        reference = f"{r['reference']['images_per_s']:.1f}" if r["reference"] else "-"
        row = [f"{r['teacher']} -> {r['student']}", r["method"], str(r["batch_size"]), reference]
        for name in kd_names:
            ratio = f"{r[f'ratio_{name}']:.2f}x" if f"ratio_{name}" in r else "-"
            vs_kd = f"{r[name]['step_vs_kd']:.2f}x" if "step_vs_kd" in r[name] else "-"
            row += [f"{r[name]['images_per_s']:.1f} ({r[name]['precision']})", ratio,
                    f"{r[name]['projected_240_epochs_min']:.0f}", vs_kd]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="teacher:student,...")
    parser.add_argument("--methods", default="kd,crd")
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--kd-precisions", default="auto,fp32", help="kd variants: --precision values")
    parser.add_argument("--data", default=CIFAR100_SIZED, help="an in-memory kd dataset spec")
    parser.add_argument("--ref-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the reference (RepDistiller: 8; default min(8, cores))")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--crd-k", type=int, default=CRD_K, help="CRD negatives per sample (both sides)")
    parser.add_argument("--quick", action="store_true", help="tiny everything, for the test suite")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.windows, args.warmup = 2, 2, 1
        args.pairs, args.batch_sizes, args.data, args.ref_workers, args.crd_k = "resnet14:resnet8", "16", QUICK_DATA, 0, 32
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = api.resolve_device(args.device)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    bundle = build_data(args.data)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    kd_names = ["kd" if p == "auto" else f"kd_{p}" for p in args.kd_precisions.split(",")]
    results = []
    for teacher, student in pairs:
        for method in args.methods.split(","):
            for batch_size in map(int, args.batch_sizes.split(",")):
                print(f"{teacher} -> {student} {method} batch {batch_size} ...", file=sys.stderr, flush=True)
                r = measure(args, bundle, teacher, student, method, batch_size, device)
                results.append(r)
                print(markdown_table([r], kd_names).splitlines()[-1], file=sys.stderr, flush=True)
    add_step_vs_kd(results, kd_names)
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": started,
        "machine": device_info(device),
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "settings": {"data": bundle.name, "train_images": len(bundle.train), "steps": args.steps,
                     "windows": args.windows, "warmup": args.warmup, "ref_workers": args.ref_workers,
                     "crd_k": args.crd_k},
        "results": results,
    }
    print(markdown_table(results, kd_names))
    print(f"\n{report['machine']}; load average before {report['load_avg_before']}, after {report['load_avg_after']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
