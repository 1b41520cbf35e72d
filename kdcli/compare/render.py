"""What a comparison looks like: Rich tables, compare.csv, compare.md (section tables and a paper-style
methods x pairs table) and compare.png (validation curves with ±std bands, final top-1 bars)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdcli.compare.aggregate import section_of, sections
from kdcli.compare.plan import short_name
from kdcli.engine.checkpoint import atomic_write
from kdcli.errors import KdError
from kdcli.methods import method_class
from kdcli.report import fmt, stderr, stdout

HEADERS = ["teacher", "method", "runs", "top-1 last", "top-1 best", "Δ vs student", "95% CI", "Δ vs kd (95% CI)",
           "agreement", "s/epoch", "extra params"]
PAPER_HEADERS = ["paper", "Δ paper"]
CSV_COLUMNS = [
    "teacher", "student", "method", "options", "data", "epochs", "runs", "seeds", "failed", "top1_mean", "top1_std",
    "best_top1_mean", "best_top1_std", "delta_top1", "delta_ci_low", "delta_ci_high", "delta_kd", "delta_kd_low",
    "delta_kd_high", "paper_top1", "paper_selection", "paper_source", "delta_paper", "paper_note", "agreement",
    "teacher_top1", "time_per_epoch_s", "method_params", "student_params", "best",
]
LEGEND = (
    "Top-1 (%) on the validation split, mean ± std (sample, n - 1) over seeds; runs: n seeds. Δ vs student: "
    "against the plain student (`none`) trained the same way. The same seed gives the same student "
    "initialisation and batch order for every method, so deltas are paired by seed: 95% CI is the "
    "t-interval of the per-seed differences (n >= 2), * when it excludes 0. paper: the published value "
    "for this teacher, student and method (last or best epoch, as its source reports), Δ paper against the "
    "same selection of ours, shown only when the runs follow the source's protocol. Agreement: student/teacher "
    "top-1 agreement (%); extra params: the method's trainable parameters beyond the student. Best row in bold."
)


# ---- cells ---------------------------------------------------------------------------------------

def interval(ci: dict[str, Any] | None, with_mean: bool = False) -> str:
    if ci is None:
        return "-"
    text = f"[{ci['low']:+.2f}, {ci['high']:+.2f}]" + ("*" if ci["excludes_zero"] else "")
    return f"{ci['mean']:+.2f} {text}" if with_mean else text


def mean_std(row: dict[str, Any], name: str) -> str:
    if row[f"{name}_mean"] is None:
        return "-"
    mean = f"{row[f'{name}_mean']:.2f}"
    return f"{mean} ± {row[f'{name}_std']:.2f}" if row["runs"] > 1 else mean


def runs_cell(row: dict[str, Any]) -> str:
    return str(row["runs"]) + (f" ({len(row['failed'])} failed)" if row["failed"] else "")


def paper_cells(row: dict[str, Any]) -> list[str]:
    paper = row["paper"]
    if paper is None:
        return ["-", "-"]
    value = f"{paper['top1']:.2f}" + (f" ± {paper['std']:.2f}" if paper["std"] is not None else "")
    delta = f"{paper['delta']:+.2f}" if paper["delta"] is not None else ("deviates" if "deviates" in paper["note"] else "n/a")
    return [f"{value} ({paper['selection']}, {paper['source']})", delta]


def cells(row: dict[str, Any], with_paper: bool = False) -> list[str]:
    """The human-readable cells of one row (Rich table and markdown alike)."""
    teacher = "-"
    if row["teacher"] is not None:
        teacher = short_name(row["teacher"])
        if row["teacher_top1"] is not None:
            teacher += f" ({fmt(row['teacher_top1'])})"
    delta = "-" if row["delta_top1"] is None else f"{row['delta_top1']:+.2f}"
    values = [
        teacher, row["label"], runs_cell(row), mean_std(row, "top1"), mean_std(row, "best_top1"), delta,
        interval(row["delta_ci"]), interval(row["delta_kd"], with_mean=True),
        fmt(row["agreement"]), fmt(row["time_per_epoch_s"]), f"{row['method_params']:,}",
    ]
    return values + paper_cells(row) if with_paper else values


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """Why a published value has no delta, one line per row that has one."""
    return [f"{row['label']} ({short_name(row['teacher']) if row['teacher'] else 'plain student'}): {row['paper']['note']}"
            for row in rows if row["paper"] and row["paper"]["note"]]


def _title(key: tuple) -> str:
    student, data, epochs = key
    return f"{student} on {data}, {epochs} epochs"


def _has_paper(rows: list[dict[str, Any]]) -> bool:
    return any(r["paper"] for r in rows)


# ---- terminal ------------------------------------------------------------------------------------

def print_tables(result: dict[str, Any], console: Console = stdout) -> None:
    """One Rich table per student section, best row highlighted; failed runs and paper notes below."""
    for key, rows in sections(result["rows"]):
        with_paper = _has_paper(rows)
        table = Table(title=f"kd compare: {_title(key)}", title_justify="left",
                      caption="paired by seed; * = 95% CI excludes 0", caption_justify="left")
        for number, header in enumerate(HEADERS + PAPER_HEADERS * with_paper):
            # In a narrow terminal, numbers wrap at their spaces ("70.12 ±" / "0.31") and names keep a width.
            table.add_column(header, justify="left" if number < 2 else "right", min_width=8 if number < 2 else None)
        for row in rows:
            style = "bold green" if row["best"] else "red" if row["failed"] else None
            table.add_row(*(Text(c) for c in cells(row, with_paper)), style=style)
        console.print(table)
        for line in notes(rows):
            console.print(f"note: {line}", markup=False, soft_wrap=True)
    for failed in result.get("failed", []):
        console.print(f"failed: {failed['run']}: {failed['error']}", style="red", markup=False, soft_wrap=True)


def print_published(tables: list[dict[str, Any]], console: Console = stdout) -> None:
    """`kd compare --published`: each source's table, methods x pairs, with its citation."""
    for source in tables:
        runs = f", {source['runs']} runs" if source["runs"] else ""
        table = Table(title=f"published CIFAR-100 top-1 (%): {source['source']} ({source['selection']} epoch{runs})",
                      caption=source["citation"], title_justify="left", caption_justify="left")
        table.add_column("method")
        for pair in source["pairs"]:
            table.add_column(pair, justify="right")
        for row in source["rows"]:
            table.add_row(row["label"], *(row["values"].get(p, "-") for p in source["pairs"]))
        console.print(table)


# ---- files ---------------------------------------------------------------------------------------

def write_outputs(result: dict[str, Any], folder: Path) -> None:
    """compare.csv, .md, .png (with matplotlib) and .json into `folder`; records their paths in result["files"]."""
    files: dict[str, str | None] = {kind: str(folder / f"compare.{kind}") for kind in ("json", "csv", "md", "png")}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "compare.csv", to_csv(result["rows"]))
        _write(folder / "compare.md", to_markdown(result["rows"], result.get("failed", [])))
        if not plot(result["rows"], folder / "compare.png"):
            files["png"] = None
            stderr.print("note: matplotlib is not installed, so no compare.png (pip install 'kdcli[plot]')", markup=False, soft_wrap=True)
        result["files"] = files
        _write(folder / "compare.json", json.dumps(result, indent=2, default=str) + "\n")
    except OSError as exc:
        raise KdError(f"cannot write the comparison to {folder} ({exc.strerror})", "pass a writable --out folder") from None
    written = ", ".join(Path(p).name for p in files.values() if p)
    stderr.print(f"wrote {written} to {folder}", markup=False, soft_wrap=True)


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def csv_record(row: dict[str, Any]) -> dict[str, Any]:
    ci, kd, paper = row["delta_ci"] or {}, row["delta_kd"] or {}, row["paper"] or {}
    return {**row, "delta_ci_low": ci.get("low"), "delta_ci_high": ci.get("high"), "delta_kd": kd.get("mean"),
            "delta_kd_low": kd.get("low"), "delta_kd_high": kd.get("high"), "paper_top1": paper.get("top1"),
            "paper_selection": paper.get("selection"), "paper_source": paper.get("source"),
            "delta_paper": paper.get("delta"), "paper_note": paper.get("note")}


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        record = csv_record(row)
        writer.writerow([_csv_value(record[c]) for c in CSV_COLUMNS])
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


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*")


def _md_row(values: list[str], bold: bool = False) -> str:
    return "| " + " | ".join(f"**{_md(v)}**" if bold and v else _md(v) for v in values) + " |"


def to_markdown(rows: list[dict[str, Any]], failed: list[dict[str, Any]] = ()) -> str:
    lines = ["# kd compare", "", LEGEND, ""]
    for key, section in sections(rows):
        headers = HEADERS + PAPER_HEADERS * _has_paper(section)
        lines += [f"## {_md(_title(key))}", "", _md_row(headers), "|---|---|" + "---:|" * (len(headers) - 2)]
        lines += [_md_row(cells(row, _has_paper(section)), bold=row["best"]) for row in section]
        lines += [""] + [f"- {_md(n)}" for n in notes(section)] + ([""] if notes(section) else [])
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{f['run']}`: {_md(f['error'])}" for f in failed] + [""]
    lines += paper_table(rows)
    sources = {(r["paper"]["source"], r["paper"]["citation"]) for r in rows if r["paper"]}
    if sources:
        lines += ["Published values: " + "; ".join(f"{name}: {citation}" for name, citation in sorted(sources)), ""]
    return "\n".join(lines)


def paper_table(rows: list[dict[str, Any]]) -> list[str]:
    """Methods x teacher -> student pairs as in the RepDistiller/CRD tables, each cell `ours (paper)`;
    ours is the same selection (last or best epoch) as the published value, else top-1 last."""
    pairs = sorted({(r["teacher"], *section_of(r)) for r in rows if r["teacher"] is not None and r["runs"]}, key=str)
    if not pairs:
        return []
    settings = {pair[2:] for pair in pairs}
    headers = [f"{short_name(t)} → {s}" + (f" ({d}, {e} ep)" if len(settings) > 1 else "") for t, s, d, e in pairs]
    cell = {(r["teacher"], *section_of(r), r["label"]): r for r in rows if r["runs"]}
    plain = {section_of(r): r for r in rows if r["method"] == "none" and not r["options"] and r["runs"]}
    labels = sorted({r["label"] for r in rows if r["teacher"] is not None}, key=lambda l: (_year(l), l))
    teacher_row = ["teacher"] + [fmt(next((r["teacher_top1"] for r in rows if (r["teacher"], *section_of(r)) == p), None))
                                 for p in pairs]
    table = [[label] + [cell.get((*pair, label)) for pair in pairs] for label in labels]
    table.insert(0, ["student"] + [plain.get(pair[1:]) for pair in pairs])
    best = [max((line[i + 1] for line in table if line[i + 1]), key=lambda r: r["top1_mean"], default=None)
            for i in range(len(pairs))]
    lines = ["## Top-1 (%) per teacher → student pair: ours (paper)", "",
             "Ours: mean ± std over seeds, of the last epoch, or of the best epoch where the published value "
             "is a best-epoch one; (paper) where a published value exists; † where our runs deviate from its protocol; "
             "◀ the best in its column.",
             "", _md_row(["", *headers]), "|---|" + "---:|" * len(pairs), _md_row(teacher_row)]
    for name, *found in table:
        values = [ours_and_paper(r, r is best[i]) for i, r in enumerate(found)]  # _md_row escapes markup
        lines.append(_md_row([name, *values]))
    return lines + [""]


def ours_and_paper(row: dict[str, Any] | None, best: bool) -> str:
    if row is None:
        return "-"
    paper = row["paper"]
    name = "best_top1" if paper and paper["selection"] == "best" else "top1"
    ours = mean_std(row, name)
    if paper:
        ours += f" ({paper['top1']:.2f}{'†' if paper['note'] and 'deviates' in paper['note'] else ''})"
    return f"{ours} ◀" if best else ours


def _year(label: str) -> int:
    try:
        return method_class(label.split(" ")[0]).year
    except KdError:
        return 0


# ---- picture ------------------------------------------------------------------------------------

def panels(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """One panel per teacher -> student pair (with its section's plain student); a section without
    teachers is one panel of its own."""
    out = []
    for key, section in sections(rows):
        plain = [r for r in section if r["teacher"] is None and r["runs"]]
        teachers = list(dict.fromkeys(r["teacher"] for r in section if r["teacher"] is not None and r["runs"]))
        for teacher in teachers:
            chosen = plain + [r for r in section if r["teacher"] == teacher and r["runs"]]
            out.append((f"{short_name(teacher)} → {key[0]}\n{key[1]}, {key[2]} epochs", chosen))
        if not teachers and plain:
            out.append((f"{key[0]}\n{key[1]}, {key[2]} epochs", plain))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """compare.png: per pair, the mean validation curve of each method with a ±std band over seeds, and a
    bar chart of final top-1 (mean, error bar = std) with the published value as a marker. False without
    matplotlib."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    groups = panels(rows)
    figure = Figure(figsize=(12, 4.2 * max(1, len(groups))), layout="constrained")
    axes = figure.subplots(max(1, len(groups)), 2, squeeze=False, width_ratios=[3, 2])
    labels = dict.fromkeys(r["label"] for _, chosen in groups for r in chosen)
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # a method has one colour in every panel
    for (curves, bars), (title, chosen) in zip(axes, groups):
        _curves(curves, title, chosen, colours, MaxNLocator)
        _bars(bars, chosen, colours)
    figure.savefig(path, dpi=110)
    return True


def _curves(ax, title: str, rows: list[dict[str, Any]], colours: dict[str, str], locator) -> None:
    for row in rows:
        curve, spread = row["val_top1_curve"], row["val_top1_curve_std"]
        epochs = range(1, len(curve) + 1)
        colour = colours[row["label"]]
        ax.plot(epochs, curve, color=colour, label=f"{row['label']} (n={row['runs']})", linewidth=2.2 if row["best"] else 1.3)
        if row["runs"] > 1:
            ax.fill_between(epochs, [m - s for m, s in zip(curve, spread)], [m + s for m, s in zip(curve, spread)],
                            color=colour, alpha=0.2, linewidth=0)
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(locator(integer=True))
    ax.set_ylabel("validation top-1 (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _bars(ax, rows: list[dict[str, Any]], colours: dict[str, str]) -> None:
    positions = range(len(rows))
    means = [r["top1_mean"] for r in rows]
    errors = [r["top1_std"] if r["runs"] > 1 else 0.0 for r in rows]
    ax.bar(positions, means, yerr=errors, capsize=5, color=[colours[r["label"]] for r in rows], alpha=0.85)
    marked = False
    for i, row in enumerate(rows):
        paper = row["paper"]
        if paper:
            ax.scatter([i], [paper["top1"]], marker="D", s=60, color="black", zorder=3,
                       label=None if marked else "published (its source's last/best)")
            marked = True
    low = min([m - e for m, e in zip(means, errors)] + [r["paper"]["top1"] for r in rows if r["paper"]])
    high = max([m + e for m, e in zip(means, errors)] + [r["paper"]["top1"] for r in rows if r["paper"]])
    margin = max(1.0, (high - low) * 0.25)
    ax.set_ylim(max(0.0, low - margin), min(101.0, high + margin))
    ax.set_xticks(list(positions), [r["label"] for r in rows], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("final top-1 (%), mean ± std")
    ax.set_title("final top-1 (last epoch)" + (", ◆ published" if marked else ""), fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    if marked:
        ax.legend(fontsize="small")
    if math.isclose(low, high):
        ax.set_ylim(low - 1, high + 1)
