"""Run folders -> table rows: one row per teacher/student/method/options/data/epochs, with mean ± std
over seeds, the paired deltas against the plain student and against kd, and the published value."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcli.compare import published
from kdcli.compare.stats import mean, paired_interval, std
from kdcli.config import read_config_file
from kdcli.engine.rundir import RunDir
from kdcli.errors import KdError
from kdcli.methods import method_class
from kdcli.methods.base import resolve_hparams
from kdcli.models import default_lr, list_models
from kdcli.teachers import is_weights_path, read_metadata

FOLDERS_HINT = "pass run folders (or folders holding them) written by kd distill, kd train or kd compare"


@dataclass(frozen=True)
class Record:
    path: Path  # the run folder
    summary: dict[str, Any]
    options: dict[str, Any]  # the run's --set values that differ from the method's defaults
    curve: list[float]  # val_top1 per epoch
    config: dict[str, Any]  # the run's config.toml (empty when missing)


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
        summary = json.loads(summary_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise KdError(f"cannot read {summary_path} ({exc})", "remove the damaged run folder or pass others") from None
    required = ("student", "method", "data", "top1", "best_top1")
    lacking = [k for k in required if k not in summary] if isinstance(summary, dict) else list(required)
    if lacking:
        raise KdError(f"{summary_path} is not a kd run summary (no {', '.join(lacking)})", FOLDERS_HINT)
    config = read_config_file(run.config) if run.config.is_file() else {}
    # main-stage epochs only: an init stage (AB, FT, FSP) would shift the curve against the others
    curve = [m["val_top1"] for m in run.read_metrics() if "val_top1" in m and m.get("stage", "main") == "main"]
    return Record(run.path, summary, changed_options(summary["method"], config.get("options", {})), curve, config)


def changed_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Only the options that differ from the method's defaults: `--set T=4` is plain kd."""
    try:
        cls = method_class(method)
        resolved = resolve_hparams(cls, options)
    except KdError:  # a method this version does not know: keep the options as written
        return dict(sorted(options.items()))
    return {k: resolved[k] for k in sorted(options) if resolved[k] != cls.defaults[k]}


def group_key(summary: dict[str, Any], options: dict[str, Any]) -> tuple:
    return (summary.get("teacher"), summary["student"], summary["method"], tuple(options.items()),
            summary["data"], summary.get("epochs"))


def aggregate(records: list[Record], failed: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Rows ranked within each student's section; `failed` runs ({key, run, error}) are counted in their row."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(group_key(r.summary, r.options), []).append(r)
    rows = [make_row(key, runs) for key, runs in groups.items()]
    by_key = {row["key"]: row for row in rows}
    for failure in failed:
        row = by_key.get(failure["key"])
        if row is None:
            row = by_key[failure["key"]] = empty_row(failure["key"])
            rows.append(row)
        row["failed"].append(failure["run"])
    for row in rows:
        del row["key"]
    return rank(rows)


def _label(method: str, options: dict[str, Any]) -> str:
    return method + (" (" + ", ".join(f"{k}={_option(v)}" for k, v in options.items()) + ")" if options else "")


def empty_row(key: tuple) -> dict[str, Any]:
    """The row of a group whose every run failed."""
    teacher, student, method, options, data, epochs = key
    row = {name: None for name in ROW_STATS}
    row.update({"key": key, "teacher": teacher, "student": student, "method": method, "options": dict(options),
                "label": _label(method, dict(options)), "data": data, "epochs": epochs, "runs": 0, "seeds": [],
                "failed": [], "best": False, "method_params": 0, "per_seed": {}, "best_per_seed": {},
                "val_top1_curve": [], "val_top1_curve_std": [], "run_dirs": []})
    return row


ROW_STATS = ("top1_mean", "top1_std", "best_top1_mean", "best_top1_std", "delta_top1", "delta_ci", "delta_kd",
             "agreement", "teacher_top1", "time_per_epoch_s", "student_params", "paper")


def make_row(key: tuple, records: list[Record]) -> dict[str, Any]:
    teacher, student, method, options, data, epochs = key
    runs = [r.summary for r in records]
    last = [s["top1"] for s in runs]
    best = [s["best_top1"] for s in runs]
    curve, spread = curve_band([r.curve for r in records])
    row = empty_row(key)
    row.update({
        "runs": len(runs),
        "seeds": sorted(s["seed"] for s in runs if s.get("seed") is not None),
        "top1_mean": mean(last), "top1_std": std(last),
        "best_top1_mean": mean(best), "best_top1_std": std(best),
        "agreement": mean(s.get("agreement") for s in runs),
        "teacher_top1": mean(s.get("teacher_top1") for s in runs),
        "time_per_epoch_s": mean(s.get("time_per_epoch_s") for s in runs),
        "method_params": max(s.get("method_params") or 0 for s in runs),
        "student_params": runs[0].get("student_params"),
        # Per seed (the mean where a seed occurs twice, e.g. two option spellings of the same run).
        "per_seed": _by_seed(runs, "top1"), "best_per_seed": _by_seed(runs, "best_top1"),
        "val_top1_curve": curve, "val_top1_curve_std": spread,
        "run_dirs": sorted(str(r.path) for r in records),
    })
    row["paper"] = paper_match(row, records)
    return row


def _by_seed(runs: list[dict[str, Any]], name: str) -> dict[int, float]:
    values: dict[int, list[float]] = {}
    for s in runs:
        if s.get("seed") is not None:
            values.setdefault(s["seed"], []).append(s[name])
    return {seed: mean(v) for seed, v in sorted(values.items())}


def _option(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def curve_band(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Epoch-wise mean and sample std over runs, as long as the shortest run."""
    length = min((len(c) for c in curves), default=0)
    columns = [[c[i] for c in curves] for i in range(length)]
    return [mean(c) for c in columns], [std(c) for c in columns]


def teacher_arch(teacher: str | None, config: dict[str, Any]) -> str | None:
    """The teacher's architecture: a store/zoo name is one; a checkpoint says it through --teacher-arch or
    RepDistiller's `<arch>_vanilla/` folder."""
    if teacher is None:
        return None
    if not is_weights_path(teacher):
        return teacher
    if config.get("teacher_arch"):
        return config["teacher_arch"]
    if teacher.endswith(".safetensors") and Path(teacher).is_file():
        try:
            return read_metadata(Path(teacher)).get("arch")  # a kd checkpoint records its architecture
        except KdError:
            return None
    folder = Path(teacher).parent.name
    arch = folder.removesuffix("_vanilla")
    return arch if folder.endswith("_vanilla") and arch in list_models() else None


def paper_match(row: dict[str, Any], records: list[Record]) -> dict[str, Any] | None:
    """The published cell for this row, and the delta against it when every run followed its protocol."""
    arch = teacher_arch(row["teacher"], records[0].config)
    if row["data"] != published.DATA or (row["teacher"] is not None and arch is None):
        return None
    cell = published.find_cell(arch, row["student"], row["method"], row["options"])
    if cell is None:
        return None
    found = sorted({d for r in records for d in published.deviations(cell, r.config, default_lr(row["student"]))})
    ours = {"last": row["top1_mean"], "best": row["best_top1_mean"]}.get(cell.selection)
    if found:
        note = "deviates from the paper's protocol: " + ", ".join(found)
    elif cell.protocol_note:
        note = cell.protocol_note
    elif ours is None:
        note = "the source does not say whether it reports the last or the best epoch"
    else:
        note = None
    return {"top1": cell.top1, "std": cell.std, "label": cell.label, "source": cell.source, "citation": cell.citation,
            "selection": cell.selection, "runs": cell.runs, "delta": None if note else ours - cell.top1, "note": note}


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sections per student (and data, epochs), best top-1 last first; deltas vs the section's plain student
    and vs kd with the same teacher, paired by seed."""
    sections_: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        sections_.setdefault(section_of(row), []).append(row)
    ordered = []
    for key in sorted(sections_, key=str):
        section = sorted(sections_[key], key=lambda r: (r["top1_mean"] is None, -(r["top1_mean"] or 0), r["label"], str(r["teacher"])))
        plain = [r for r in section if r["method"] == "none" and r["runs"]]
        base = next((r for r in plain if not r["options"]), plain[0] if plain else None)
        kd_rows = {r["teacher"]: r for r in section if r["method"] == "kd" and not r["options"] and r["runs"]}
        for row in section:
            if not row["runs"]:
                continue
            if base is not None:
                row["delta_top1"] = row["top1_mean"] - base["top1_mean"]
                row["delta_ci"] = None if row is base else paired_interval(row["per_seed"], base["per_seed"])
            kd_row = kd_rows.get(row["teacher"])
            if kd_row is not None and row is not kd_row and row["teacher"] is not None:
                row["delta_kd"] = paired_interval(row["per_seed"], kd_row["per_seed"])
        if section[0]["runs"]:
            section[0]["best"] = True
        ordered += section
    return ordered


def section_of(row: dict[str, Any]) -> tuple:
    return (row["student"], row["data"], row["epochs"])


def sections(rows: list[dict[str, Any]]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    return [(key, list(group)) for key, group in itertools.groupby(rows, key=section_of)]
