"""`kd compare`: which method is best for a teacher/student pair, by how much, at what cost.

Run mode trains a grid of teacher/student pairs x seeds x methods under one parent folder, resumably:
finished runs (summary.json) are reused, interrupted ones continue from their last checkpoint.
Collect mode aggregates run folders that already exist. Either way the result is one table per
student (top-1 mean ± std over seeds, delta vs the plain student, agreement, cost), written as
compare.json, compare.csv, compare.md and a PNG of the validation curves.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdcli import api
from kdcli.config import RECORDED_FIELDS, RunConfig, build_config, load_preset, read_config_file
from kdcli.engine.checkpoint import atomic_write
from kdcli.engine.rundir import RunDir
from kdcli.errors import KdError, did_you_mean, unknown
from kdcli.methods import method_class
from kdcli.methods.base import resolve_hparams
from kdcli.models import list_models
from kdcli.report import fmt, stderr, stdout
from kdcli.teachers import dataset_key, find_teacher, is_weights_path, teacher_digest

DEFAULT_METHODS = ["none", "kd"]
GRID_KEYS = ("pairs", "methods", "seeds")
# Where and how fast a run trains, not what it learns: a finished run is reused across changes to these.
PLACE_FIELDS = {"out", "device", "workers", "data_dir", "download", "eval_batch_size"}
SEEDS_HINT = "write a count (--seeds 3 means seeds 0, 1, 2) or a list (--seeds 0,1,2)"
FOLDERS_HINT = "pass run folders (or folders holding them) written by kd distill, kd train or kd compare"
HEADERS = ["teacher", "method", "runs", "top-1 last", "top-1 best", "Δ vs student", "agreement", "s/epoch", "extra params"]
CSV_COLUMNS = [
    "teacher", "student", "method", "options", "data", "epochs", "runs", "seeds", "top1_mean", "top1_std",
    "best_top1_mean", "best_top1_std", "delta_top1", "agreement", "teacher_top1", "time_per_epoch_s",
    "method_params", "student_params", "best",
]


# ---- run mode: the plan ----------------------------------------------------------------------

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
    pair_text = _count(len(pairs), "pair") if nested else f"{teacher} -> {student}" if teacher else student
    shape = f"{_count(len(names), 'method')} x {_count(len(seed_list), 'seed')}"
    return Plan(parent, list(jobs.values()), f"{pair_text}, {shape}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
        if isinstance(value, list) or (isinstance(value, str) and "," in value):
            items = value if isinstance(value, list) else [v for v in value.split(",") if v.strip()]
            seeds = list(dict.fromkeys(int(v) for v in items))
        else:
            seeds = list(range(int(value)))
    except (TypeError, ValueError):
        raise KdError(f"--seeds {value!r} is invalid", SEEDS_HINT) from None
    if not seeds or min(seeds) < 0:
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
    return dataset_key(_short(name)) if name else "none"


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
    """Unknown model names and teachers missing from the store, for the whole grid, before any training."""
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
    for data, names in missing.items():
        if len(names) == 1:
            hint = f"train one with `kd train {names[0]} --data {data}`, or pass --teacher PATH to a checkpoint"
        else:
            hint = f"train each with `kd train NAME --data {data}` (e.g. `kd train {names[0]} --data {data}`)"
        raise KdError(f"no trained {', '.join(names)} for {data} in the teacher store", hint)


# ---- run mode: training ----------------------------------------------------------------------

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


def execute(plan: Plan, reporter=None) -> None:
    """Train every run of the plan that has no summary yet, one after another; stop at the first failure."""
    states = {job.name: run_state(job) for job in plan.jobs}  # settings clashes fail before any training
    todo = [job for job in plan.jobs if states[job.name] != "done"]
    stderr.print(f"kd compare: {plan.description}: {_count(len(plan.jobs), 'run')} in {plan.out}"
                 f" ({len(plan.jobs) - len(todo)} done already)", markup=False, soft_wrap=True)
    for number, job in enumerate(todo, start=1):
        resuming = states[job.name] == "partial"
        stderr.print(f"[{number}/{len(todo)}] {job.name}{' (resuming)' if resuming else ''}", markup=False)
        try:
            if resuming:
                api.resume(job.config.out, reporter=reporter)
            else:
                api.run(job.config, overwrite=True, reporter=reporter)
        except KdError as exc:
            hint = _continue_hint(plan) if exc.exit_code == 130 else exc.hint  # stopped by a signal
            raise KdError(f"{job.name}: {exc.message}", hint, exc.exit_code) from exc
        except KeyboardInterrupt:
            raise KdError(f"interrupted during {job.name}", _continue_hint(plan), exit_code=130) from None


def _continue_hint(plan: Plan) -> str:
    return (f"run the same kd compare command with --out {plan.out} to continue: "
            "finished runs are reused and this one resumes from its checkpoint")


# ---- collect mode: runs -> rows --------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    path: Path  # the run folder
    summary: dict[str, Any]
    options: dict[str, Any]  # the run's --set values that differ from the method's defaults
    curve: list[float]  # val_top1 per epoch


def find_runs(dirs: list[str | Path]) -> tuple[list[Record], list[Path]]:
    """Finished runs under `dirs` (recursively), and unfinished run folders (config.toml, no summary)."""
    summaries: dict[Path, Path] = {}
    unfinished: dict[Path, Path] = {}
    for given in dirs:
        root = Path(given)
        if not root.is_dir():
            raise KdError(f"{given} {'is not a folder' if root.exists() else 'does not exist'}", FOLDERS_HINT)
        found = sorted(root.glob("**/summary.json"))
        if not found:
            raise KdError(f"{given} holds no finished kd run (no summary.json in it)",
                          "finish its runs first (`kd distill --resume RUN`), or " + FOLDERS_HINT)
        summaries.update((p.resolve(), p) for p in found)
        unfinished.update((p.parent.resolve(), p.parent) for p in root.glob("**/config.toml")
                          if not (p.parent / "summary.json").is_file())
    return [read_record(p) for p in summaries.values()], list(unfinished.values())


def read_record(summary_path: Path) -> Record:
    run = RunDir(summary_path.parent)
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KdError(f"cannot read {summary_path} ({exc})", "remove the damaged run folder or pass others") from None
    required = ("student", "method", "data", "top1", "best_top1")
    lacking = [k for k in required if k not in summary] if isinstance(summary, dict) else list(required)
    if lacking:
        raise KdError(f"{summary_path} is not a kd run summary (no {', '.join(lacking)})", FOLDERS_HINT)
    options = read_config_file(run.config).get("options", {}) if run.config.is_file() else {}
    # main-stage epochs only: an init stage (AB, FT, FSP) would shift the curve against the others
    curve = [m["val_top1"] for m in run.read_metrics() if "val_top1" in m and m.get("stage", "main") == "main"]
    return Record(run.path, summary, changed_options(summary["method"], options), curve)


def changed_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Only the options that differ from the method's defaults: `--set T=4` is plain kd."""
    try:
        cls = method_class(method)
        resolved = resolve_hparams(cls, options)
    except KdError:  # a method this version does not know: keep the options as written
        return dict(sorted(options.items()))
    return {k: resolved[k] for k in sorted(options) if resolved[k] != cls.defaults[k]}


def aggregate(records: list[Record]) -> list[dict[str, Any]]:
    """One row per teacher/student/method/options/data/epochs, ranked within each student's section."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        s = r.summary
        key = (s.get("teacher"), s["student"], s["method"], tuple(r.options.items()), s["data"], s.get("epochs"))
        groups.setdefault(key, []).append(r)
    return rank([make_row(key, runs) for key, runs in groups.items()])


def make_row(key: tuple, records: list[Record]) -> dict[str, Any]:
    teacher, student, method, options, data, epochs = key
    runs = [r.summary for r in records]
    last = [s["top1"] for s in runs]
    best = [s["best_top1"] for s in runs]
    options = dict(options)
    label = method + (" (" + ", ".join(f"{k}={_option(v)}" for k, v in options.items()) + ")" if options else "")
    return {
        "teacher": teacher, "student": student, "method": method, "options": options, "label": label,
        "data": data, "epochs": epochs, "runs": len(runs),
        "seeds": sorted(s["seed"] for s in runs if s.get("seed") is not None),
        "top1_mean": statistics.fmean(last), "top1_std": _std(last),
        "best_top1_mean": statistics.fmean(best), "best_top1_std": _std(best),
        "delta_top1": None,
        "agreement": _mean(s.get("agreement") for s in runs),
        "teacher_top1": _mean(s.get("teacher_top1") for s in runs),
        "time_per_epoch_s": _mean(s.get("time_per_epoch_s") for s in runs),
        "method_params": max(s.get("method_params") or 0 for s in runs),
        "student_params": runs[0].get("student_params"),
        "best": False,
        "val_top1_curve": mean_curve([r.curve for r in records]),
        "run_dirs": sorted(str(r.path) for r in records),
    }


def _option(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _std(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one run; the tables then show the mean alone)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def mean_curve(curves: list[list[float]]) -> list[float]:
    """Epoch-wise mean over runs, as long as the shortest run."""
    length = min((len(c) for c in curves), default=0)
    return [statistics.fmean(c[i] for c in curves) for i in range(length)]


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sections per student (and data, epochs), best top-1 last first; delta vs the section's plain student."""
    sections: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        sections.setdefault(_section(row), []).append(row)
    ordered = []
    for key in sorted(sections, key=str):
        section = sorted(sections[key], key=lambda r: (-r["top1_mean"], r["label"], str(r["teacher"])))
        plain = [r for r in section if r["method"] == "none"]
        base = next((r for r in plain if not r["options"]), plain[0] if plain else None)
        for row in section:
            row["delta_top1"] = row["top1_mean"] - base["top1_mean"] if base else None
        section[0]["best"] = True
        ordered += section
    return ordered


def _section(row: dict[str, Any]) -> tuple:
    return (row["student"], row["data"], row["epochs"])


def sections(rows: list[dict[str, Any]]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    return [(key, list(group)) for key, group in itertools.groupby(rows, key=_section)]


# ---- the entry point -------------------------------------------------------------------------

def compare(
    run_dirs: list[str] | None = None, plan: Plan | None = None, out: str | None = None, reporter=None
) -> dict[str, Any]:
    """Train `plan` (resumably) and aggregate its runs, or aggregate `run_dirs`; write the compare.* files
    into the plan's parent folder, or into `out` / the first of `run_dirs`. Returns what compare.json holds."""
    if plan is not None:
        execute(plan, reporter)
        dirs, folder = [job.config.out for job in plan.jobs], plan.out
    elif run_dirs:
        dirs, folder = list(run_dirs), Path(out or run_dirs[0])
    else:
        raise KdError("no run folders to compare", "e.g. `kd compare runs/`")
    records, unfinished = find_runs(dirs)
    if unfinished:
        listed = ", ".join(str(p) for p in unfinished)
        stderr.print(f"note: left out {len(unfinished)} unfinished run(s) without summary.json: {listed} "
                     "(continue one with `kd distill --resume RUN`)", markup=False, soft_wrap=True)
    result = {
        "out": str(folder),
        "runs": len(records),
        "rows": aggregate(records),
        "unfinished": [str(p) for p in unfinished],
    }
    write_outputs(result, folder)
    return result


# ---- output: table, csv, markdown, plot ------------------------------------------------------

def write_outputs(result: dict[str, Any], folder: Path) -> None:
    """compare.csv, .md, .png (with matplotlib) and .json into `folder`; records their paths in result["files"]."""
    files: dict[str, str | None] = {kind: str(folder / f"compare.{kind}") for kind in ("json", "csv", "md", "png")}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "compare.csv", to_csv(result["rows"]))
        _write(folder / "compare.md", to_markdown(result["rows"]))
        if not plot_curves(result["rows"], folder / "compare.png"):
            files["png"] = None
            stderr.print("note: matplotlib is not installed, so no compare.png (pip install 'kdcli[plot]')", markup=False)
        result["files"] = files
        _write(folder / "compare.json", json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise KdError(f"cannot write the comparison to {folder} ({exc.strerror})", "pass a writable --out folder") from None
    written = ", ".join(Path(p).name for p in files.values() if p)
    stderr.print(f"wrote {written} to {folder}", markup=False, soft_wrap=True)


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_value(row[c]) for c in CSV_COLUMNS])
    return buffer.getvalue()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def cells(row: dict[str, Any]) -> list[str]:
    """The human-readable cells of one row (Rich table and markdown alike)."""
    teacher = "-"
    if row["teacher"] is not None:
        teacher = _short(row["teacher"])
        if row["teacher_top1"] is not None:
            teacher += f" ({fmt(row['teacher_top1'])})"
    delta = "-" if row["delta_top1"] is None else f"{row['delta_top1']:+.2f}"
    return [
        teacher, row["label"], str(row["runs"]), _mean_std(row, "top1"), _mean_std(row, "best_top1"), delta,
        fmt(row["agreement"]), fmt(row["time_per_epoch_s"]), f"{row['method_params']:,}",
    ]


def _short(teacher: str) -> str:
    """A store name as is; a checkpoint path as `folder/name` (`resnet32x4_vanilla/ckpt_epoch_240`)."""
    if not is_weights_path(teacher):
        return teacher
    path = Path(teacher)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def _mean_std(row: dict[str, Any], name: str) -> str:
    mean = f"{row[f'{name}_mean']:.2f}"
    return f"{mean} ± {row[f'{name}_std']:.2f}" if row["runs"] > 1 else mean


def _title(key: tuple) -> str:
    student, data, epochs = key
    return f"{student} on {data}, {epochs} epochs"


def print_tables(result: dict[str, Any], console: Console = stdout) -> None:
    """One Rich table per student section, best row highlighted."""
    for key, rows in sections(result["rows"]):
        table = Table(title=f"kd compare: {_title(key)}", title_justify="left")
        for number, header in enumerate(HEADERS):
            table.add_column(header, justify="left" if number < 2 else "right", no_wrap=number > 1)
        for row in rows:
            table.add_row(*(Text(c) for c in cells(row)), style="bold green" if row["best"] else None)
        _unwrapped(console, table).print(table)


def _unwrapped(console: Console, table: Table) -> Console:
    """In a pipe or a log (no terminal to fit), print the table at its natural width: one line per row."""
    if console.is_terminal:
        return console
    width = console.measure(table, options=console.options.update_width(10_000)).maximum
    return Console(file=console.file, width=max(console.width, width), highlight=False)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# kd compare",
        "",
        "Top-1 (%) on the validation split, mean ± std over seeds; Δ vs the plain student (`none`) trained "
        "the same way; agreement: student/teacher top-1 agreement (%); extra params: the method's trainable "
        "parameters beyond the student. Best row in bold.",
        "",
    ]
    for key, section in sections(rows):
        lines += [f"## {_md(_title(key))}", "", _md_row(HEADERS), "|---|---|" + "---:|" * (len(HEADERS) - 2)]
        lines += [_md_row(cells(row), bold=row["best"]) for row in section]
        lines.append("")
    lines += paper_table(rows)
    return "\n".join(lines)


def paper_table(rows: list[dict[str, Any]]) -> list[str]:
    """Methods x teacher -> student pairs (top-1 last), as in the RepDistiller/CRD tables; two pairs or more."""
    pairs = sorted({(r["teacher"], *_section(r)) for r in rows if r["teacher"] is not None}, key=str)
    if len(pairs) < 2:
        return []
    settings = {pair[2:] for pair in pairs}
    headers = [f"{_short(t)} → {s}" + (f" ({d}, {e} ep)" if len(settings) > 1 else "") for t, s, d, e in pairs]
    cell = {(r["teacher"], *_section(r), r["label"]): r for r in rows}
    plain = {_section(r): r for r in rows if r["method"] == "none" and not r["options"]}
    labels = sorted({r["label"] for r in rows if r["teacher"] is not None}, key=lambda l: (_year(l), l))
    teacher_row = ["teacher"] + [fmt(_mean(r["teacher_top1"] for r in rows if (r["teacher"], *_section(r)) == p))
                                 for p in pairs]
    table = [[label] + [cell.get((*pair, label)) for pair in pairs] for label in labels]
    table.insert(0, ["student"] + [plain.get(pair[1:]) for pair in pairs])
    best = [max((line[i + 1] for line in table if line[i + 1]), key=lambda r: r["top1_mean"], default=None)
            for i in range(len(pairs))]
    lines = ["## Top-1 last (%) per teacher → student pair", "", _md_row(["", *headers]),
             "|---|" + "---:|" * len(pairs), _md_row(teacher_row)]
    for name, *found in table:
        values = ["-" if r is None else f"**{_mean_std(r, 'top1')}**" if r is best[i] else _mean_std(r, "top1")
                  for i, r in enumerate(found)]
        lines.append(_md_row([name, *values]))
    return lines + [""]


def _year(label: str) -> int:
    try:
        return method_class(label.split(" ")[0]).year
    except KdError:
        return 0


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_row(values: list[str], bold: bool = False) -> str:
    cells_ = [f"**{_md(v)}**" if bold and v else _md(v) for v in values]
    return "| " + " | ".join(cells_) + " |"


def plot_curves(rows: list[dict[str, Any]], path: Path) -> bool:
    """Validation top-1 per epoch, mean over seeds, one panel per student section; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    groups = sections(rows)
    columns = min(3, len(groups))
    figure = Figure(figsize=(5.5 * columns, 4 * math.ceil(len(groups) / columns)), layout="constrained")
    axes = figure.subplots(math.ceil(len(groups) / columns), columns, squeeze=False).ravel()
    for ax, (key, section) in zip(axes, groups):
        teachers = {r["teacher"] for r in section if r["teacher"] is not None}
        for row in section:
            curve = row["val_top1_curve"]
            name = row["label"]
            if len(teachers) > 1 and row["teacher"] is not None:
                name = f"{_short(row['teacher'])}: {name}"
            ax.plot(range(1, len(curve) + 1), curve, label=name, linewidth=2.4 if row["best"] else 1.2)
        ax.set_title(_title(key), fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    figure.savefig(path, dpi=110)
    return True
