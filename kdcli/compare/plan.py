"""The plan of a comparison: teacher/student pairs x seeds x methods, each a resolved RunConfig with its
own run folder under one parent, checked before anything trains; and the state of each run folder."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from kdcli.config import RECORDED_FIELDS, RunConfig, build_config, load_preset, read_config_file
from kdcli.engine.rundir import RunDir
from kdcli.errors import KdError, did_you_mean, unknown
from kdcli.methods import method_class
from kdcli.methods.base import resolve_hparams
from kdcli.models import list_models
from kdcli.teachers import dataset_key, find_teacher, is_weights_path, release, teacher_digest
from kdcli.teachers.resolve import in_release
from kdcli.report import plural

DEFAULT_METHODS = ["none", "kd"]
GRID_KEYS = ("pairs", "methods", "seeds")
# Where and how fast a run trains, not what it learns: a finished run is reused across changes to these.
PLACE_FIELDS = {"out", "device", "workers", "data_dir", "download", "eval_batch_size", "compile"}
MAX_SEEDS = 1000
SEEDS_HINT = "write a count (--seeds 3 means seeds 0, 1, 2) or a list (--seeds 0,1,2)"


@dataclass(frozen=True)
class Job:
    """One run of a comparison: its name inside the parent folder and its resolved config (`out` set)."""

    name: str
    config: RunConfig


@dataclass(frozen=True)
class Plan:
    out: Path
    jobs: list[Job]
    description: str


@dataclass(frozen=True)
class Grid:
    """A preset's `[compare]` table: teacher/student pairs, methods, seeds (each may be empty)."""

    pairs: list[tuple[str, str]]
    methods: list[str]
    seeds: list[int]


def make_plan(
    flags: dict[str, Any],
    preset: str | None = None,
    methods: str | None = None,
    seeds: str | None = None,
    options: dict[str, Any] | None = None,
    out: str | None = None,
) -> Plan:
    """The runs to train: pairs x seeds x methods, each a resolved RunConfig, checked before any training.

    `flags` are RunConfig keys from the command line (teacher, student, data, epochs, ...) over the
    preset's flat keys; the preset's `[compare]` grid supplies pairs, methods and seeds, which
    --teacher/--student narrow and --methods/--seeds replace. A one-method preset (e.g.
    cifar100-dkd-res56-res20) gives its pair, and compares its method with the plain student.
    """
    layers = load_preset(preset) if preset else {}
    grid = parse_grid(layers.pop("compare", {}), preset)
    preset_method = layers.pop("method", None)
    default = ["none", preset_method] if preset_method not in (None, "none") else DEFAULT_METHODS
    names = parse_methods(methods) if methods is not None else grid.methods or default
    seed_list = parse_seeds(seeds) if seeds is not None else grid.seeds or [0]
    pairs, nested = choose_pairs(grid.pairs, flags.get("teacher"), flags.get("student"), layers)
    per_method = split_options([preset_options(layers.pop("options", {}), preset_method, names), options or {}], names)
    parent = Path(out) if out else default_parent(preset if nested else None, pairs[0])

    jobs: dict[str, Job] = {}
    for (teacher, student), seed, method in itertools.product(pairs, seed_list, names):
        baseline = not method_class(method).needs.teacher
        name = job_name(method, seed, teacher, student, nested, baseline)
        if name in jobs:  # the plain student is trained once and shared by every pair with that student
            continue
        config = build_config(layers, flags, {
            "command": "distill", "teacher": teacher, "student": student, "method": method, "seed": seed,
            "options": per_method[method], "out": str(parent / name),
        })
        jobs[name] = Job(name, replace(config, teacher=None, teacher_arch=None) if baseline else config)
    check_networks(list(jobs.values()))
    teacher, student = pairs[0]
    pair_text = plural(len(pairs), "pair") if nested else f"{teacher} -> {student}" if teacher else student
    shape = f"{plural(len(names), 'method')} x {plural(len(seed_list), 'seed')}"
    return Plan(parent, list(jobs.values()), f"{pair_text}, {shape}")


def short_name(teacher: str) -> str:
    """A store name as is; a checkpoint path as `folder/name` (`resnet32x4_vanilla/ckpt_epoch_240`)."""
    if not is_weights_path(teacher):
        return teacher
    path = Path(teacher)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def parse_grid(table: Any, source: str | None) -> Grid:
    if not isinstance(table, dict):
        raise KdError(f"preset {source}: compare must be a table", "write a [compare] table with pairs, methods and seeds")
    for key in table:
        if key not in GRID_KEYS:
            raise KdError(f"preset {source}: unknown key {key!r} in [compare]", did_you_mean(key, GRID_KEYS))
    pairs = table.get("pairs", [])
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in pairs
    ):
        raise KdError(f"preset {source}: [compare] pairs must be [teacher, student] name pairs",
                      'write pairs = [["resnet56", "resnet20"], ["vgg13", "vgg8"]]')
    return Grid(
        pairs=[(t, s) for t, s in pairs],
        methods=parse_methods(table["methods"]) if "methods" in table else [],
        seeds=parse_seeds(table["seeds"]) if "seeds" in table else [],
    )


def parse_methods(value: str | list[str]) -> list[str]:
    """`none,kd,sp` (or a TOML list) into known method names, in order, without repeats."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = list(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
    if not names:
        raise KdError("--methods names no method", "e.g. --methods none,kd,sp (see `kd list methods`)")
    for name in names:
        method_class(name)  # raises the did-you-mean error for an unknown name
    return names


def parse_seeds(value: str | int | list[int]) -> list[int]:
    """A count N (seeds 0..N-1) or an explicit list (`0,1,2`, a TOML list)."""
    try:
        if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, (bool, float)) for v in value)):
            raise TypeError(value)  # TOML true / 1.5 are no seeds
        if isinstance(value, list) or (isinstance(value, str) and "," in value):
            items = value if isinstance(value, list) else [v for v in value.split(",") if v.strip()]
            seeds = list(dict.fromkeys(int(v) for v in items))
        else:
            count = int(value)
            if count > MAX_SEEDS:  # a count, not a seed: range(10**9) would be the whole memory
                raise ValueError(value)
            seeds = list(range(count))
    except (TypeError, ValueError):
        raise KdError(f"--seeds {value!r} is invalid", f"{SEEDS_HINT}; at most {MAX_SEEDS} seeds") from None
    if not seeds or min(seeds) < 0 or max(seeds) > 2**63 - 1 or len(seeds) > MAX_SEEDS:
        raise KdError(f"--seeds {value!r} is invalid", SEEDS_HINT)
    return seeds


def choose_pairs(
    grid: list[tuple[str, str]], teacher: str | None, student: str | None, layers: dict[str, Any]
) -> tuple[list[tuple[str | None, str]], bool]:
    """(pairs, nested): the preset's grid, narrowed by --teacher or --student, or the one pair given."""
    if grid and not (teacher and student):
        chosen = [p for p in grid if teacher in (None, p[0]) and student in (None, p[1])]
        if not chosen:
            given = f"teacher {teacher}" if teacher else f"student {student}"
            raise KdError(f"no pair of the preset's [compare] grid has {given}",
                          "choose one of: " + ", ".join(f"{t} -> {s}" for t, s in grid))
        return chosen, True
    teacher = teacher or layers.get("teacher")
    student = student or layers.get("student")
    if not student:
        raise KdError(
            "kd compare needs a --student to train, or run folders to aggregate",
            "e.g. `kd compare --teacher resnet56 --student resnet20 --methods none,kd --seeds 3`, or `kd compare runs/`",
        )
    return [(teacher, student)], False


def split_options(layers: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Each method's options from option layers (later wins): `KEY=VALUE` goes to every distillation
    method that has KEY, `METHOD.KEY=VALUE` to METHOD only (so the plain `none` baseline stays plain)."""
    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    distillers = [m for m in methods if method_class(m).needs.teacher]
    for options in layers:
        for key, value in sorted(options.items(), key=lambda item: "." in item[0]):  # the specific form last
            method, _, name = key.rpartition(".")
            takers = [method] if method else [m for m in distillers if key in method_class(m).defaults]
            if method and method not in per_method:
                raise KdError(f"--set {key}: {method!r} is not among the compared methods",
                              "add it to --methods, or drop the option")
            if not takers:
                known = {k for m in distillers for k in method_class(m).defaults}
                known |= {f"{m}.{k}" for m in methods for k in method_class(m).defaults}
                raise unknown(f"option for methods {','.join(methods)}:", key, known, "kd list methods")
            for m in takers:
                per_method[m][name] = value
    for method, values in per_method.items():
        resolve_hparams(method_class(method), values)  # bad keys and values now, not hours into the grid
    return per_method


def preset_options(options: dict[str, Any], method: str | None, compared: list[str]) -> dict[str, Any]:
    """A one-method preset's [options] are that method's (a DKD preset's beta is not SP's beta);
    they are left out when that method is not compared."""
    if not method:
        return options
    return {f"{method}.{key}": value for key, value in options.items()} if method in compared else {}


def _slug(name: str | None) -> str:
    return dataset_key(short_name(name)) if name else "none"


def default_parent(preset: str | None, pair: tuple[str | None, str]) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = _slug(preset) if preset else f"{_slug(pair[0])}-{_slug(pair[1])}"
    return Path("runs") / f"compare-{tag}-{stamp}"


def job_name(method: str, seed: int, teacher: str | None, student: str, nested: bool, baseline: bool) -> str:
    """`<method>-seed<k>`; in a grid under `<teacher>-<student>/`, the plain student under `<student>/`."""
    leaf = f"{method}-seed{seed}"
    if not nested:
        return leaf
    return f"{_slug(student)}/{leaf}" if baseline else f"{_slug(teacher)}-{_slug(student)}/{leaf}"


def check_networks(jobs: list[Job]) -> None:
    """Unknown model names and teachers missing from the store, for the whole grid, before any training.

    With --download, missing CIFAR-100 teachers of the published release are fetched into the store here.
    """
    known = set(list_models())
    missing: dict[str, list[str]] = {}
    for job in jobs:
        c = job.config
        for name in (c.student, c.teacher):
            if name and not is_weights_path(name) and ":" not in name and name not in known:
                raise unknown("model", name, known, "kd list models")
        if method_class(c.method).needs.teacher and not c.teacher:
            raise KdError(
                f"method {c.method!r} needs a teacher",
                "pass --teacher NAME (see `kd list teachers`) or a checkpoint path, or compare only --methods none",
            )
        if c.teacher and not is_weights_path(c.teacher) and find_teacher(c.teacher, c.data) is None:
            names = missing.setdefault(c.data, [])
            if c.teacher not in names:
                names.append(c.teacher)
    download = any(job.config.download for job in jobs)
    for data, names in missing.items():
        published = [name for name in names if in_release(name, data)]
        if download and published == names:
            release.fetch(names)
            continue
        if len(names) == 1:
            hint = f"train one with `kd train {names[0]} --data {data}`, or pass --teacher PATH to a checkpoint"
        else:
            hint = f"train each with `kd train NAME --data {data}` (e.g. `kd train {names[0]} --data {data}`)"
        if published:
            hint = f"get the published {', '.join(published)} with `kd teachers fetch` (or add --download); " + hint
        raise KdError(f"no trained {', '.join(names)} for {data} in the teacher store", hint)


def run_state(job: Job) -> str:
    """'done' (summary.json), 'partial' (a checkpoint to resume) or 'new'; refuses a folder holding other settings."""
    run = RunDir(job.config.out)
    if not run.config.is_file():
        return "new"
    saved = build_config(read_config_file(run.config))
    changed = [
        f"{f.name} {getattr(saved, f.name)!r} (asked {getattr(job.config, f.name)!r})"
        for f in fields(RunConfig)
        if f.name not in PLACE_FIELDS | RECORDED_FIELDS and getattr(saved, f.name) != getattr(job.config, f.name)
    ]
    digest = teacher_digest(job.config.teacher, job.config.data) if saved.teacher_sha256 else None
    if saved.teacher_sha256 and digest != saved.teacher_sha256:
        changed.append(f"teacher {job.config.teacher} with sha256 {saved.teacher_sha256[:12]}... (now {(digest or 'none')[:12]}...)")
    if changed:
        raise KdError(f"{run.path} holds a run with other settings: {', '.join(changed)}",
                      "pass another --out, or delete that folder to train it again")
    if run.summary.is_file():
        return "done"
    return "partial" if run.last.is_file() else "new"
