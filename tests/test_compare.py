"""kd compare: aggregate run folders, train a method x seed grid resumably, the benchmark preset, bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from kdcli import api
from kdcli import compare as comparison
from kdcli.config import build_config, load_preset, read_config_file
from kdcli.errors import KdError
from kdcli.models import default_lr
from kdcli.report import ConsoleReporter
from tests.conftest import TINY_DATA, _Silent, assert_clean_error

COMMON = ["--data", TINY_DATA, "--epochs", "2", "--batch-size", "32", "--device", "cpu"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def tiny_run(out: Path, **layers) -> dict:
    """A 2-epoch run on the tiny synthetic data (distill unless `command` says otherwise)."""
    base = {"command": "distill", "student": "resnet8", "data": TINY_DATA, "epochs": 2, "batch_size": 32,
            "device": "cpu"}
    return api.run(build_config(base, layers, {"out": str(out)}), reporter=_Silent())


@pytest.fixture
def teacher_weights(tmp_path) -> str:
    """A resnet8 teacher trained on the tiny data, outside the folders the tests aggregate."""
    return tiny_run(tmp_path / "teacher", command="train", method="none")["weights"]


def summaries(*folders: Path) -> list[dict]:
    return [json.loads((f / "summary.json").read_text()) for f in folders]


def curve(folder: Path) -> list[float]:
    return [json.loads(line)["val_top1"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---- collect mode ---------------------------------------------------------------------------

def test_collect_matches_hand_computation(kd, tmp_path, teacher_weights):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        tiny_run(runs / f"none-seed{seed}", method="none", seed=seed)
    for seed in (0, 1, 2):
        tiny_run(runs / "kd" / f"seed{seed}", method="kd", teacher=teacher_weights, seed=seed)
    tiny_run(runs / "kd-T2", method="kd", teacher=teacher_weights, options={"T": "2"})
    tiny_run(runs / "kd-T4", method="kd", teacher=teacher_weights, seed=5, options={"T": "4"})  # the default: plain kd
    unfinished = runs / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs / "kd-T2" / "config.toml", unfinished / "config.toml")

    result = kd("compare", runs, "--json")
    assert result.code == 0, result.stderr
    out = json.loads(result.stdout)  # --json: one JSON object on stdout, notes on stderr
    assert "unfinished" in result.stderr and out["unfinished"] == [str(unfinished)]
    rows = {r["label"]: r for r in out["rows"]}
    assert set(rows) == {"none", "kd", "kd (T=2)"} and out["runs"] == 7

    plain = summaries(runs / "none-seed0", runs / "none-seed1")
    kd_runs = summaries(*(runs / "kd" / f"seed{s}" for s in (0, 1, 2)), runs / "kd-T4")
    top1 = [s["top1"] for s in kd_runs]
    row = rows["kd"]
    assert row["runs"] == 4 and row["seeds"] == [0, 1, 2, 5]
    assert row["top1_mean"] == pytest.approx(sum(top1) / 4)
    assert row["top1_std"] == pytest.approx(statistics.stdev(top1))
    assert row["best_top1_mean"] == pytest.approx(statistics.fmean(s["best_top1"] for s in kd_runs))
    plain_mean = statistics.fmean(s["top1"] for s in plain)
    assert row["delta_top1"] == pytest.approx(row["top1_mean"] - plain_mean)
    assert rows["none"]["delta_top1"] == 0.0 and rows["none"]["agreement"] is None
    assert row["agreement"] == pytest.approx(statistics.fmean(s["agreement"] for s in kd_runs))
    assert row["teacher_top1"] == pytest.approx(kd_runs[0]["teacher_top1"])
    assert row["time_per_epoch_s"] == pytest.approx(statistics.fmean(s["time_per_epoch_s"] for s in kd_runs))
    assert row["method_params"] == kd_runs[0]["method_params"] == 0
    curves = [curve(runs / "kd" / f"seed{s}") for s in (0, 1, 2)] + [curve(runs / "kd-T4")]
    assert row["val_top1_curve"] == pytest.approx([statistics.fmean(c[i] for c in curves) for i in range(2)])
    assert rows["kd (T=2)"]["runs"] == 1 and rows["kd (T=2)"]["options"] == {"T": 2.0}

    # Ranked by top-1 last, the best flagged; the files hold the same result.
    means = [r["top1_mean"] for r in out["rows"]]
    assert means == sorted(means, reverse=True)
    assert [r["best"] for r in out["rows"]] == [True, False, False]
    assert json.loads((runs / "compare.json").read_text()) == out
    assert out["files"]["csv"] == str(runs / "compare.csv")
    table = list(csv.DictReader((runs / "compare.csv").open()))
    assert [r["method"] for r in table] == [r["method"] for r in out["rows"]]
    kd_line = next(r for r in table if r["method"] == "kd" and not r["options"])
    assert float(kd_line["top1_mean"]) == pytest.approx(row["top1_mean"], abs=1e-4)
    assert float(kd_line["delta_top1"]) == pytest.approx(row["delta_top1"], abs=1e-4)
    assert kd_line["seeds"] == "0 1 2 5" and kd_line["best"] in ("true", "false")
    markdown = (runs / "compare.md").read_text()
    assert "| teacher | method | runs | top-1 last | top-1 best | Δ vs student |" in markdown
    assert f"| {row['top1_mean']:.2f} ± {row['top1_std']:.2f} |" in markdown.replace("**", "")
    bold = [line for line in markdown.splitlines() if line.startswith("| **")]
    assert len(bold) == 1 and out["rows"][0]["label"] in bold[0]
    if HAS_MATPLOTLIB:
        assert (runs / "compare.png").read_bytes()[:4] == b"\x89PNG"

    human = kd("compare", runs)
    assert human.code == 0, human.stderr
    assert "kd compare: resnet8" in human.stdout and f"{row['top1_mean']:.2f} ± {row['top1_std']:.2f}" in human.stdout
    assert f"{row['delta_top1']:+.2f}" in human.stdout


def test_collect_two_teachers_gives_a_paper_table(kd, tmp_path, teacher_weights):
    other = tmp_path / "other" / "resnet8b.safetensors"
    other.parent.mkdir()
    shutil.copy(teacher_weights, other)
    runs = tmp_path / "runs"
    tiny_run(runs / "none", method="none")
    tiny_run(runs / "kd-a", method="kd", teacher=teacher_weights)
    tiny_run(runs / "kd-b", method="kd", teacher=str(other))
    report = tmp_path / "report"
    result = kd("compare", runs / "none", runs / "kd-a", runs / "kd-b", "--out", report, "--json")
    assert result.code == 0, result.stderr
    out = json.loads(result.stdout)
    assert {(r["teacher"], r["method"]) for r in out["rows"]} == {(None, "none"), (teacher_weights, "kd"), (str(other), "kd")}
    markdown = (report / "compare.md").read_text()
    assert "per teacher → student pair" in markdown
    assert " teacher/model → resnet8 |" in markdown and " other/resnet8b → resnet8 |" in markdown
    assert not (runs / "compare.md").exists()  # --out decides where the files go


def test_collect_without_matplotlib_skips_the_plot(kd, tmp_path, monkeypatch):
    tiny_run(tmp_path / "runs" / "a", method="none")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if the `plot` extra were not installed
    result = kd("compare", tmp_path / "runs", "--json")
    assert result.code == 0, result.stderr
    assert "matplotlib is not installed" in result.stderr
    assert json.loads(result.stdout)["files"]["png"] is None and not (tmp_path / "runs" / "compare.png").exists()


# ---- run mode -------------------------------------------------------------------------------

def test_run_mode_resumes_an_interrupted_grid_and_reuses_finished_runs(kd, tmp_path, monkeypatch):
    assert kd("train", "resnet8", *COMMON, "--out", tmp_path / "teacher").code == 0  # in the teacher store
    out = tmp_path / "cmp"
    args = ["compare", "--teacher", "resnet8", "--student", "resnet8", "--methods", "none,kd", "--seeds", "2",
            *COMMON, "--out", out]
    started: list[str] = []

    class InterruptTheFourthRun(ConsoleReporter):
        def start(self, *a):
            started.append(self.title)
            super().start(*a)

        def epoch_end(self, metrics):
            super().epoch_end(metrics)
            if len(started) == 4 and metrics["epoch"] == 1:
                raise KeyboardInterrupt  # Ctrl-C after the checkpoint of epoch 1

    monkeypatch.setattr(api, "ConsoleReporter", InterruptTheFourthRun)
    first = kd(*args)
    assert first.code == 130 and "Traceback" not in first.stderr
    assert "error: interrupted during kd-seed1" in first.stderr and f"--out {out}" in first.stderr
    done = ["none-seed0", "kd-seed0", "none-seed1"]
    assert all((out / name / "summary.json").is_file() for name in done)
    assert (out / "kd-seed1" / "checkpoints" / "last.safetensors").is_file()
    assert not (out / "kd-seed1" / "summary.json").exists()
    mtimes = {name: (out / name / "summary.json").stat().st_mtime_ns for name in done}

    monkeypatch.setattr(api, "ConsoleReporter", ConsoleReporter)
    second = kd(*args, "--json")
    assert second.code == 0, second.stderr
    assert "(3 done already)" in second.stderr and "kd-seed1 (resuming)" in second.stderr
    assert "resumed at epoch 2" in second.stderr
    assert {name: (out / name / "summary.json").stat().st_mtime_ns for name in done} == mtimes  # not retrained
    assert [json.loads(line)["epoch"] for line in (out / "kd-seed1" / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    result = json.loads(second.stdout)
    assert result["out"] == str(out) and result["runs"] == 4
    kd_row, none_row = (next(r for r in result["rows"] if r["method"] == m) for m in ("kd", "none"))
    kd_top1 = [s["top1"] for s in summaries(out / "kd-seed0", out / "kd-seed1")]
    none_top1 = [s["top1"] for s in summaries(out / "none-seed0", out / "none-seed1")]
    assert kd_row["seeds"] == [0, 1] and none_row["teacher"] is None and kd_row["teacher"] == "resnet8"
    assert kd_row["top1_mean"] == pytest.approx(statistics.fmean(kd_top1))
    assert kd_row["top1_std"] == pytest.approx(statistics.stdev(kd_top1))
    assert kd_row["delta_top1"] == pytest.approx(statistics.fmean(kd_top1) - statistics.fmean(none_top1))
    assert {p.name for p in out.iterdir()} >= {"compare.json", "compare.csv", "compare.md", *done, "kd-seed1"}
    assert 'teacher = "resnet8"' not in (out / "none-seed0" / "config.toml").read_text()  # the plain student

    everything = {name: (out / name / "summary.json").stat().st_mtime_ns for name in [*done, "kd-seed1"]}
    third = kd(*args)
    assert third.code == 0 and "(4 done already)" in third.stderr
    assert {name: (out / name / "summary.json").stat().st_mtime_ns for name in everything} == everything
    # A finished folder trained with other settings is never mixed in silently.
    assert_clean_error(kd(*[a if a != "2" else "3" for a in args]), "other settings", "epochs 2 (asked 3)")


def test_a_failed_run_is_reported_and_the_grid_goes_on(kd, tmp_path):
    assert kd("train", "resnet8", *COMMON, "--out", tmp_path / "teacher").code == 0
    out = tmp_path / "cmp"
    # kd with a weight of 1e30 diverges; the plain student trains normally.
    result = kd("compare", "--teacher", "resnet8", "--student", "resnet8", "--methods", "none,kd", "--seeds", "0,1",
                "--set", "kd.kd=1e30", *COMMON, "--out", out, "--json")
    assert result.code == 1 and "Traceback" not in result.stderr
    assert "error: kd-seed0: training diverged" in result.stderr and "hint: " in result.stderr
    assert "goes on with the other runs" in result.stderr
    assert (out / "none-seed1" / "summary.json").is_file()  # trained after the failure
    report = json.loads(result.stdout)
    assert [f["run"] for f in report["failed"]] == ["kd-seed0", "kd-seed1"]
    assert all("diverged" in f["error"] and f["exit_code"] == 1 for f in report["failed"])
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["none"]["runs"] == 2 and rows["kd"]["runs"] == 0 and rows["kd"]["failed"] == ["kd-seed0", "kd-seed1"]
    assert json.loads((out / "compare.json").read_text())["failed"] == report["failed"]
    assert "## Failed runs" in (out / "compare.md").read_text()
    human = kd("compare", "--teacher", "resnet8", "--student", "resnet8", "--methods", "none,kd", "--seeds", "0,1",
               "--set", "kd.kd=1e30", *COMMON, "--out", out)
    assert human.code == 1 and "0 (2 failed)" in human.stdout and "failed: kd-seed0: training diverged" in human.stdout


def test_a_run_stopped_by_a_signal_says_how_to_continue_the_comparison(tmp_path):
    class StopOnFirstStep(_Silent):
        def step(self, *args):  # what the trainer raises after a first Ctrl-C has saved a checkpoint
            raise KdError("interrupted at step 1/4 of epoch 1", "resume with: kd distill --resume X", exit_code=130)

    plan = comparison.make_plan({"student": "resnet8", "data": TINY_DATA, "device": "cpu", "epochs": 1},
                                methods="none", out=str(tmp_path / "c"))
    with pytest.raises(KdError) as err:
        api.compare(plan=plan, reporter=StopOnFirstStep())
    assert err.value.exit_code == 130 and err.value.message.startswith("none-seed0: interrupted")
    assert f"--out {tmp_path / 'c'}" in err.value.hint and "kd distill" not in err.value.hint


def test_set_options_go_to_the_methods_that_have_them(tmp_path):
    plan = comparison.make_plan(
        {"teacher": str(tmp_path / "t.safetensors"), "student": "resnet8", "data": TINY_DATA},
        methods="none,kd,sp", seeds="2", options={"T": "2", "sp.beta": "10", "none.ce": "0.5"}, out=str(tmp_path / "c"),
    )
    options = {job.name: job.config.options for job in plan.jobs}
    assert options["none-seed1"] == {"ce": "0.5"}  # the baseline takes only none.KEY
    assert options["kd-seed0"] == {"T": "2"} and options["sp-seed1"] == {"T": "2", "beta": "10"}
    assert [job.name for job in plan.jobs][:3] == ["none-seed0", "kd-seed0", "sp-seed0"]
    assert all(job.config.out == str(tmp_path / "c" / job.name) for job in plan.jobs)
    later = comparison.make_plan({"teacher": "t/x.pth", "student": "resnet8"}, methods="kd",
                                 options={"kd.T": "3", "T": "5"}, out="c")
    assert later.jobs[0].config.options == {"T": "3"}  # METHOD.KEY is the more specific, whatever the order


def test_a_one_method_preset_compares_its_method_with_the_plain_student(monkeypatch):
    monkeypatch.setattr(comparison.plan, "find_teacher", lambda name, data: Path(f"/store/{name}.safetensors"))
    plan = comparison.make_plan({}, preset="cifar100-dkd-res56-res20", out="c")
    assert [job.name for job in plan.jobs] == ["none-seed0", "dkd-seed0"]
    dkd = plan.jobs[1].config
    assert (dkd.teacher, dkd.student, dkd.options["beta"], dkd.options["warmup"]) == ("resnet56", "resnet20", 2.0, 20)
    assert plan.jobs[0].config.options == {}
    # Its options are DKD's: they neither leak into other methods nor fail when DKD is not compared.
    other = comparison.make_plan({}, preset="cifar100-dkd-res56-res20", methods="kd,sp", out="c")
    assert all(job.config.options == {} for job in other.jobs)


# ---- the benchmark preset ---------------------------------------------------------------------

def test_cifar100_bench_preset_is_a_grid(monkeypatch):
    layers = load_preset("cifar100-bench")
    grid = layers["compare"]
    assert ["resnet56", "resnet20"] in grid["pairs"] and len(grid["pairs"]) == 13 and grid["seeds"] == 3
    config = build_config(layers)  # kd distill --preset cifar100-bench: the protocol, [compare] ignored
    assert config.epochs == 240 and config.milestones == [150, 180, 210] and config.lr is None

    monkeypatch.setattr(comparison.plan, "find_teacher", lambda name, data: Path(f"/store/{name}.safetensors"))
    plan = comparison.make_plan({}, preset="cifar100-bench", out="bench")
    methods, students = len(grid["methods"]), {s for _, s in grid["pairs"]}
    assert len(plan.jobs) == 3 * (13 * (methods - 1) + len(students))  # one plain student per student, shared
    names = {job.name for job in plan.jobs}
    assert {"resnet20/none-seed0", "resnet56-resnet20/kd-seed2", "vgg13-MobileNetV2/crcd-seed1"} <= names
    light = [job.config for job in plan.jobs if job.config.student == "MobileNetV2"]
    assert all(c.lr is None and c.data == "cifar100" for c in light) and default_lr("MobileNetV2") == 0.01

    narrowed = comparison.make_plan({"student": "resnet20", "epochs": 2}, preset="cifar100-bench",
                                    methods="none,kd", seeds="1", out="bench")
    assert {job.name for job in narrowed.jobs} == {
        "resnet20/none-seed0", "resnet56-resnet20/kd-seed0", "resnet110-resnet20/kd-seed0"}
    assert {job.config.epochs for job in narrowed.jobs} == {2}


def test_cifar100_bench_without_teachers_names_them_all(kd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = kd("compare", "--preset", "cifar100-bench")
    assert_clean_error(result, "no trained resnet56, resnet110, resnet32x4, wrn_40_2, vgg13, ResNet50 for cifar100")
    assert "kd train resnet56 --data cifar100" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing written before the check


def test_compare_table_in_config_files(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text('[comapre]\nmethods = ["kd"]\n')
    with pytest.raises(KdError, match="unknown key 'comapre'") as err:
        read_config_file(typo)
    assert "compare" in err.value.hint
    bad = tmp_path / "bad.toml"
    bad.write_text('[compare]\npair = [["resnet56", "resnet20"]]\n')
    with pytest.raises(KdError, match="unknown key 'pair' in \\[compare\\]") as err:
        comparison.make_plan({}, preset=str(bad))
    assert "pairs" in err.value.hint
    bad.write_text('[compare]\npairs = [["resnet56"]]\n')
    with pytest.raises(KdError, match="teacher, student"):
        comparison.make_plan({}, preset=str(bad))


# ---- bad input: one error line, a hint, exit 2, no traceback, nothing written ------------------

def test_bad_input(kd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    train = ["compare", "--teacher", "resnet8", "--student", "resnet8", *COMMON]
    assert_clean_error(kd(*train, "--methods", "none,kdd"), "unknown method 'kdd'")
    assert_clean_error(kd("compare", tmp_path / "nope"), "does not exist")
    assert_clean_error(kd("compare", empty), "no finished kd run")
    assert_clean_error(kd("compare", empty, "--teacher", "resnet8"), "--teacher cannot be combined")
    assert_clean_error(kd("compare"), "needs a --student")
    for seeds in ("x", "0", "1,-2"):
        assert_clean_error(kd(*train, "--seeds", seeds), "--seeds")
    assert_clean_error(kd(*train, "--set", "TT=1"), "unknown option")
    assert_clean_error(kd(*train, "--set", "sp.beta=1"), "'sp' is not among the compared methods")
    assert_clean_error(kd(*train, "--set", "kd.T=hot"), "T='hot'")
    assert_clean_error(kd("compare", "--student", "resnet8", "--methods", "kd", *COMMON), "needs a teacher")
    assert_clean_error(kd("compare", "--student", "resnet21", "--methods", "none", *COMMON), "unknown model 'resnet21'")
    missing = kd(*train, "--methods", "none,kd")
    assert_clean_error(missing, "no trained resnet8 for")
    assert "kd train resnet8 --data" in missing.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not list(empty.iterdir())


# ---- flags, structure, picture -----------------------------------------------------------------

def test_compare_takes_the_distill_flags_a_comparison_needs(kd, tmp_path):
    teacher = tmp_path / "resnet8_vanilla" / "ckpt.pth"  # never loaded: the plan is checked, then run
    plan = comparison.make_plan(
        {"teacher": str(teacher), "student": "resnet8", "data": TINY_DATA, "precision": "fp32", "compile": False,
         "workers": 0, "pretrained": False, "teacher_arch": "resnet8"},
        methods="none,kd", out=str(tmp_path / "c"),
    )
    none, kd_job = (job.config for job in plan.jobs)
    assert (kd_job.precision, kd_job.workers, kd_job.teacher_arch) == ("fp32", 0, "resnet8")
    assert (none.precision, none.teacher, none.teacher_arch) == ("fp32", None, None)  # the plain student has no teacher
    help_text = kd("compare", "--help").stdout
    for flag in ("--precision", "--pretrained", "--teacher-arch", "--workers", "--compile", "--jobs", "--devices", "--published"):
        assert flag in help_text
    result = kd("compare", "--student", "resnet8", "--methods", "none", *COMMON, "--precision", "fp32", "--out", tmp_path / "p", "--json")
    assert result.code == 0, result.stderr
    assert 'precision = "fp32"' in (tmp_path / "p" / "none-seed0" / "config.toml").read_text()


def test_compare_modules_never_import_the_api():
    """One-way flow: kdcli.api calls kdcli.compare; the worker entry point is the only caller of api beside it."""
    import ast

    package = Path(comparison.__file__).parent
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "kdcli.api" or n.startswith("kdcli.api.") for n in names), module.name


def test_plot_has_one_panel_per_pair_with_bands_and_bars(tmp_path):
    from kdcli.compare import render

    def row(label, teacher, runs=3, paper=None):
        return {"label": label, "teacher": teacher, "student": "resnet20", "data": "cifar100", "epochs": 3, "runs": runs,
                "method": label, "options": {}, "best": False, "top1_mean": 70.0, "top1_std": 0.5,
                "val_top1_curve": [60.0, 65.0, 70.0], "val_top1_curve_std": [1.0, 0.5, 0.5], "paper": paper}

    rows = [row("kd", "resnet56", paper={"top1": 70.66}), row("kd", "resnet110"), row("none", None)]
    panels = render.panels(rows)
    assert [title.split("\n")[0] for title, _ in panels] == ["resnet56 → resnet20", "resnet110 → resnet20"]
    assert all([r["label"] for r in chosen] == ["none", "kd"] for _, chosen in panels)  # the plain student in each
    if HAS_MATPLOTLIB:
        from matplotlib.axes import Axes

        drawn = []
        original = Axes.fill_between, Axes.bar, Axes.scatter
        try:
            Axes.fill_between = lambda self, *a, **k: drawn.append("band") or original[0](self, *a, **k)
            Axes.bar = lambda self, *a, **k: drawn.append(("bars", len(a[1]), tuple(k["yerr"]))) or original[1](self, *a, **k)
            Axes.scatter = lambda self, *a, **k: drawn.append(("published", a[1][0])) or original[2](self, *a, **k)
            assert render.plot(rows, tmp_path / "compare.png")
        finally:
            Axes.fill_between, Axes.bar, Axes.scatter = original
        assert drawn.count("band") == 4  # two methods x two panels, 3 seeds each
        assert drawn.count(("bars", 2, (0.5, 0.5))) == 2 and drawn.count(("published", 70.66)) == 1
        assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_teacher_architecture_for_published_matching(teacher_weights, tmp_path):
    from kdcli.compare.aggregate import teacher_arch

    assert teacher_arch("resnet56", {}) == "resnet56"  # a store name is the architecture
    assert teacher_arch(teacher_weights, {}) == "resnet8"  # a kd checkpoint records it
    assert teacher_arch("x/resnet32x4_vanilla/ckpt_epoch_240.pth", {}) == "resnet32x4"  # RepDistiller's folder
    assert teacher_arch("x/ckpt.pth", {"teacher_arch": "vgg13"}) == "vgg13"
    assert teacher_arch("x/ckpt.pth", {}) is None  # unknown: never matched to a published cell
