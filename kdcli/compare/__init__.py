"""`kd compare`: which method is best for a teacher/student pair, by how much, at what cost.

Run mode trains a grid of teacher/student pairs x seeds x methods under one parent folder, resumably
and optionally N runs at once; collect mode aggregates run folders that already exist. Either way the
result is one table per student (mean ± std over seeds, paired deltas with 95% intervals, the published
value where one matches), written as compare.json, .csv, .md and .png.

One job per module, one way: plan (what to train) -> run (training it) -> aggregate + stats (rows) ->
published (the papers' numbers) -> render (tables, files, picture). kdcli.api calls this package;
nothing here imports the api (in-process training comes in as a Runner).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli.compare import aggregate
from kdcli.compare.plan import Job, Plan, make_plan, run_state
from kdcli.compare.published import published_table
from kdcli.compare.render import print_published, print_tables, write_outputs
from kdcli.compare.run import Runner, execute, parse_devices
from kdcli.errors import KdError
from kdcli.report import stderr

__all__ = ["Job", "Plan", "Runner", "compare", "make_plan", "parse_devices", "print_published", "print_tables",
           "published_table", "run_state"]


def compare(
    run_dirs: list[str] | None = None, plan: Plan | None = None, out: str | None = None, runner: Runner | None = None,
    reporter=None, jobs: int = 1, devices: list[str] | None = None,
) -> dict[str, Any]:
    """Train `plan` (resumably, `jobs` at once) and aggregate its runs, or aggregate `run_dirs`; write the
    compare.* files into the plan's parent folder, or into `out` / the first of `run_dirs`.

    Returns what compare.json holds; `failed` lists the runs that failed (the others still count).
    """
    failed: list[dict[str, Any]] = []
    if plan is not None:
        if runner is None:
            raise TypeError("training a plan needs a Runner (kdcli.api.compare passes one)")
        failed = execute(plan, runner, jobs=jobs, devices=devices, reporter=reporter)
        summaries = [Path(job.config.out) / "summary.json" for job in plan.jobs]
        records, unfinished, folder = [aggregate.read_record(p) for p in summaries if p.is_file()], [], plan.out
    elif run_dirs:
        records, unfinished = aggregate.find_runs(run_dirs)
        folder = Path(out or run_dirs[0])
    else:
        raise KdError("no run folders to compare", "e.g. `kd compare runs/`")
    if unfinished:
        listed = ", ".join(str(p) for p in unfinished)
        stderr.print(f"note: left out {len(unfinished)} unfinished run(s) without summary.json: {listed} "
                     "(continue one with `kd distill --resume RUN`)", markup=False, soft_wrap=True)
    result = {
        "out": str(folder),
        "runs": len(records),
        "paired": "deltas are paired by seed: the same seed gives the same student initialisation and batch order",
        "rows": aggregate.aggregate(records, failed),
        "unfinished": [str(p) for p in unfinished],
        "failed": [{k: v for k, v in f.items() if k != "key"} for f in failed],
    }
    write_outputs(result, folder)
    return result
