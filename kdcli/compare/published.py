"""The published CIFAR-100 top-1 tables shipped with kd (kdcli/compare/published/*.toml, one file per
source), and which published cell a compared row corresponds to.

A cell is only compared with a run that used the same dataset, teacher, student, method (and the
options that define the variant, e.g. KD+LS) and the source's protocol; the delta uses the accuracy the
source reports (last or best epoch). Anything else is shown as a deviation, never as a delta.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from kdcli.errors import KdError

DATA = "cifar100"
# Files in the order their values are preferred when several sources give the same cell.
SOURCES = ("repdistiller", "crd_kd", "mdistiller", "ctkd", "logit_std", "dist", "nd_readme")
SELECTIONS = ("last", "best", "unknown")


@dataclass(frozen=True)
class Cell:
    """One published value: a method (with the options that define its variant) on one teacher -> student pair."""

    source: str  # file stem, e.g. "repdistiller"
    citation: str
    selection: str  # "last", "best" or "unknown" epoch
    runs: int | None  # runs behind the value; None where the source does not say
    teacher: str | None  # None for the plain student (`none`)
    student: str
    method: str  # a kdcli method name, or "teacher" for the teacher's own accuracy
    label: str  # the source's name for the row, e.g. "CRD+KD"
    options: dict[str, Any]
    top1: float
    std: float | None
    protocol: dict[str, Any]
    tuned: tuple[str, ...] = ()  # options the source sets per pair: any value of them still matches
    protocol_note: str | None = None  # why a delta cannot be trusted even for a matching run
    pair_label: str = field(default="", compare=False)


@cache
def load_sources() -> dict[str, list[Cell]]:
    """Every shipped source's cells, by file stem (read once)."""
    folder = resources.files("kdcli.compare") / "published"
    return {name: _read_source(name, tomllib.loads((folder / f"{name}.toml").read_text())) for name in SOURCES}


def _read_source(name: str, table: dict[str, Any]) -> list[Cell]:
    if table["selection"] not in SELECTIONS:
        raise ValueError(f"{name}.toml: selection must be one of {SELECTIONS}")
    pairs = [tuple(p.split(">")) for p in table["pairs"]]
    cells = []
    for row in table["rows"]:
        stds = row.get("std", [None] * len(pairs))
        for (teacher, student), top1, std in zip(pairs, row["top1"], stds, strict=True):
            if math.isnan(top1):
                continue
            cells.append(Cell(
                source=name, citation=table["citation"], selection=table["selection"], runs=table.get("runs"),
                teacher=None if row["method"] == "none" else teacher, student=student, method=row["method"],
                label=row["label"], options=dict(row.get("options", {})), top1=top1, std=std,
                protocol=dict(table["protocol"]), tuned=tuple(row.get("tuned", table.get("tuned", ()))),
                protocol_note=row.get("protocol_note"), pair_label=f"{teacher} → {student}",
            ))
    return cells


def all_cells() -> list[Cell]:
    return [cell for cells in load_sources().values() for cell in cells]


def find_cell(teacher: str | None, student: str, method: str, options: dict[str, Any]) -> Cell | None:
    """The published cell for this row (first source in SOURCES order), or None.

    `options` are the run's options that differ from the method's defaults: each must be one the
    cell defines (with the same value) or one its source tunes per pair.
    """
    for cell in all_cells():
        if (cell.teacher, cell.student, cell.method) != (teacher, student, method):
            continue
        if any(options.get(k) != v for k, v in cell.options.items()):
            continue
        if all(k in cell.options or k in cell.tuned for k in options):
            return cell
    return None


def deviations(cell: Cell, config: dict[str, Any], default_lr: float) -> list[str]:
    """How a run's resolved config departs from the cell's protocol (empty: it follows it)."""
    protocol = cell.protocol
    found = []
    if config.get("data") != DATA:
        found.append(f"data {config.get('data')} (paper {DATA})")
    for key in ("epochs", "batch_size"):
        if key in protocol and config.get(key) != protocol[key]:
            found.append(f"{key.replace('_', ' ')} {config.get(key)} (paper {protocol[key]})")
    milestones = config.get("milestones")
    if milestones is None and config.get("epochs") == 240:
        milestones = [150, 180, 210]  # the default schedule scaled to 240 epochs
    if "milestones" in protocol and milestones != protocol["milestones"]:
        found.append(f"lr milestones {milestones or 'scaled'} (paper {protocol['milestones']})")
    lr = config.get("lr") or default_lr
    if protocol.get("lr", default_lr) != lr:
        found.append(f"lr {lr:g} (paper {protocol.get('lr', default_lr):g})")
    for key, paper in (("momentum", 0.9), ("weight_decay", 5e-4), ("lr_decay", 0.1)):
        if key in config and config[key] != paper:
            found.append(f"{key.replace('_', ' ')} {config[key]:g} (paper {paper:g})")
    return found


def published_table(student: str | None = None, teacher: str | None = None) -> list[dict[str, Any]]:
    """Every source as {source, citation, selection, runs, pairs, rows: [{label, values}]}, narrowed to a
    student and/or teacher; sources with nothing left are dropped."""
    out = []
    for name, cells in load_sources().items():
        chosen = [c for c in cells if student in (None, c.student) and teacher in (None, c.pair_label.split(" → ")[0])]
        if not chosen:
            continue
        pairs = list(dict.fromkeys(c.pair_label for c in chosen))
        rows: dict[str, dict[str, Any]] = {}
        for c in chosen:
            value = f"{c.top1:.2f}" + (f" ± {c.std:.2f}" if c.std is not None else "")
            rows.setdefault(c.label, {"label": c.label, "method": c.method, "options": c.options, "values": {}})
            rows[c.label]["values"][c.pair_label] = value
        first = chosen[0]
        out.append({"source": name, "citation": first.citation, "selection": first.selection, "runs": first.runs,
                    "pairs": pairs, "rows": list(rows.values())})
    if not out:
        what = " and ".join(f"{k} {v}" for k, v in (("teacher", teacher), ("student", student)) if v)
        known = sorted({c.student for c in all_cells()})
        raise KdError(f"no published CIFAR-100 number for {what}", "students with published numbers: " + ", ".join(known))
    return out
