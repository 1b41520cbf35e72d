"""kd compare's numbers: t quantiles and paired intervals against hand-computed values, the published
tables and how runs are matched to them, the same student initialisation for every method of a seed,
and the tables shipping in the wheel."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcli import api
from kdcli.compare import aggregate as agg
from kdcli.compare import published
from kdcli.compare.render import to_markdown
from kdcli.compare.stats import paired_interval, std, t_cdf, t_quantile
from kdcli.config import build_config, to_toml
from kdcli.data import build_data
from kdcli.methods import method_class
from kdcli.models import create_model
from tests.conftest import TINY_DATA, assert_clean_error

ROOT = Path(__file__).resolve().parents[1]


# ---- statistics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452)])
def test_t_quantile_matches_the_tables(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
    assert t_cdf(quantile, df) == pytest.approx(0.975, abs=1e-5)


def test_t_cdf_closed_forms():
    assert t_cdf(0.0, 5) == 0.5 and t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(1.0, 2) == pytest.approx(0.5 + 1 / (2 * math.sqrt(3)))  # df 2: 1/2 + t / (2 sqrt(2 + t^2))
    assert t_cdf(-2.0, 7) + t_cdf(2.0, 7) == pytest.approx(1.0)


def test_paired_interval_by_hand():
    # differences 2, 3, 1: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    ci = paired_interval({0: 72.0, 1: 74.0, 2: 73.0, 7: 99.0}, {0: 70.0, 1: 71.0, 2: 72.0})
    assert ci["seeds"] == [0, 1, 2] and ci["n"] == 3  # seed 7 has no partner: left out
    assert ci["mean"] == pytest.approx(2.0)
    assert (ci["low"], ci["high"]) == (pytest.approx(2 - 2.484138, abs=1e-5), pytest.approx(2 + 2.484138, abs=1e-5))
    assert not ci["excludes_zero"]
    # differences 1.0, 1.2, 0.8, 1.0: sd sqrt(0.08 / 3) = 0.163299, half 3.182446 * 0.163299 / 2 = 0.259849
    ci = paired_interval({0: 2.0, 1: 2.2, 2: 1.8, 3: 2.0}, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    assert (ci["low"], ci["high"]) == (pytest.approx(0.740151, abs=1e-5), pytest.approx(1.259849, abs=1e-5))
    assert ci["excludes_zero"]
    assert paired_interval({0: 1.0}, {0: 0.0}) is None  # one pair: no spread to estimate
    assert std([1.0]) == 0.0 and std([1.0, 3.0]) == pytest.approx(math.sqrt(2))


# ---- rows from run folders ------------------------------------------------------------------------

def fake_run(folder: Path, method: str, seed: int, top1: float, best: float | None = None, teacher: str | None = "resnet56",
             student: str = "resnet20", epochs: int = 240, options: dict | None = None, **config) -> None:
    """A finished run folder with the files kd writes (summary.json, config.toml, metrics.jsonl), no training."""
    layers = {"command": "distill", "student": student, "method": method, "data": "cifar100", "epochs": epochs,
              "seed": seed, "teacher": teacher, "options": options or {}, "out": str(folder), **config}
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(to_toml(build_config(layers)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val_top1": top1 - 3 + e}) + "\n" for e in (1, 2, 3)))
    summary = {"command": "distill", "teacher": teacher, "student": student, "method": method, "data": "cifar100",
               "epochs": epochs, "seed": seed, "top1": top1, "best_top1": best or top1, "method_params": 0}
    (folder / "summary.json").write_text(json.dumps(summary))


def rows_of(root: Path) -> dict[str, dict]:
    records, _ = agg.find_runs([root])
    return {r["label"]: r for r in agg.aggregate(records)}


def test_deltas_are_paired_by_seed_with_hand_computed_intervals(tmp_path):
    for seed, (plain, kd, crd) in enumerate([(70.0, 72.0, 73.0), (71.0, 74.0, 74.5), (72.0, 73.0, 74.5)]):
        fake_run(tmp_path / f"none{seed}", "none", seed, plain, teacher=None)
        fake_run(tmp_path / f"kd{seed}", "kd", seed, kd)
        fake_run(tmp_path / f"crd{seed}", "crd", seed, crd)
    rows = rows_of(tmp_path)
    kd, crd = rows["kd"], rows["crd"]
    assert kd["delta_top1"] == pytest.approx(2.0)
    assert (kd["delta_ci"]["low"], kd["delta_ci"]["high"]) == (pytest.approx(-0.484138, abs=1e-5), pytest.approx(4.484138, abs=1e-5))
    # crd - kd per seed: 1.0, 0.5, 1.5 -> mean 1.0, sd 0.5, half 4.302653 * 0.5 / sqrt(3) = 1.242069
    assert crd["delta_kd"]["mean"] == pytest.approx(1.0)
    assert crd["delta_kd"]["low"] == pytest.approx(1.0 - 1.242069, abs=1e-5)
    # crd - none: 3.0, 3.5, 2.5 -> mean 3, sd 0.5: [1.757931, 4.242069], excludes 0
    assert crd["delta_ci"]["low"] == pytest.approx(1.757931, abs=1e-5) and crd["delta_ci"]["excludes_zero"]
    assert rows["none"]["delta_ci"] is None and kd["delta_kd"] is None
    markdown = to_markdown(list(rows.values()))
    assert "[+1.76, +4.24]\\*" in markdown and "[-0.48, +4.48] |" in markdown
    assert "same student initialisation" in markdown


def test_a_run_on_the_protocol_gets_the_published_value_and_its_delta(tmp_path):
    for seed, top1 in enumerate((70.0, 71.0)):
        fake_run(tmp_path / f"kd{seed}", "kd", seed, top1, best=top1 + 1)
        fake_run(tmp_path / f"none{seed}", "none", seed, top1 - 1, teacher=None)
        fake_run(tmp_path / f"dkd{seed}", "dkd", seed, top1 + 1, best=top1 + 2, options={"beta": 2.0})  # tuned per pair
        fake_run(tmp_path / "short" / f"kd{seed}", "kd", seed, 60.0, epochs=30)
    rows = agg.aggregate(agg.find_runs([tmp_path])[0])
    by = {(r["label"], r["epochs"]): r for r in rows}
    kd = by[("kd", 240)]["paper"]
    assert (kd["top1"], kd["selection"], kd["source"]) == (70.66, "last", "repdistiller")
    assert kd["delta"] == pytest.approx(70.5 - 70.66) and kd["note"] is None
    dkd = by[("dkd (beta=2)", 240)]["paper"]  # mdistiller reports the best epoch: compared with our best
    assert dkd["top1"] == 71.97 and dkd["delta"] == pytest.approx(72.5 - 71.97)  # best: 72, 73
    assert by[("none", 240)]["paper"]["top1"] == 69.06
    short = by[("kd", 30)]["paper"]
    assert short["delta"] is None and "epochs 30 (paper 240)" in short["note"]
    markdown = to_markdown(rows)
    assert "| paper | Δ paper |" in markdown and "70.66 (last, repdistiller) | -0.16 |" in markdown
    assert "deviates from the paper's protocol: epochs 30 (paper 240)" in markdown
    assert "70.50 ± 0.71 (70.66)" in markdown and "60.00 ± 0.00 (70.66†) ◀" in markdown


def test_options_decide_the_variant_and_protocol_is_checked(tmp_path):
    fake_run(tmp_path / "crdkd", "crd", 0, 71.0, options={"kd": 1.0})
    fake_run(tmp_path / "ls", "kd", 0, 71.0, options={"logit_std": True})
    fake_run(tmp_path / "hot", "kd", 0, 71.0, options={"T": 8.0})  # RepDistiller's KD is T = 4
    fake_run(tmp_path / "lr", "sp", 0, 71.0, lr=0.1)
    fake_run(tmp_path / "mobile", "kd", 0, 66.0, student="MobileNetV2", teacher="vgg13")  # lr 0.01 by default
    rows = rows_of(tmp_path)
    assert rows["crd (kd=1)"]["paper"]["top1"] == 71.63
    assert rows["kd (logit_std=True)"]["paper"]["top1"] == 71.43  # KD+LS, best epoch, 4 runs
    assert rows["kd (logit_std=True)"]["paper"]["runs"] == 4
    assert rows["kd (T=8)"]["paper"] is None
    assert "lr 0.1 (paper 0.05)" in rows["sp"]["paper"]["note"]
    mobile = next(r for r in agg.aggregate(agg.find_runs([tmp_path / "mobile"])[0]))
    assert mobile["paper"]["top1"] == 67.37 and mobile["paper"]["note"] is None


def test_published_tables_are_complete_and_cited():
    sources = published.load_sources()
    assert list(sources) == list(published.SOURCES)
    cells = published.all_cells()
    assert all(c.citation and c.selection in published.SELECTIONS for c in cells)
    repdistiller = [c for c in sources["repdistiller"] if c.method not in ("teacher", "none")]
    assert {c.method for c in repdistiller} == {"kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd"}
    assert len({(c.teacher, c.student) for c in repdistiller}) == 13
    assert published.find_cell("resnet32x4", "resnet8x4", "crd", {}).top1 == 75.51
    assert published.find_cell("wrn_40_2", "wrn_40_1", "fsp", {}) is None  # N/A in the README
    assert published.find_cell("resnet32x4", "ShuffleV2", "dkd", {}).top1 == 77.07
    assert published.find_cell("resnet56", "resnet20", "dist", {}).std == 0.30
    names = {c.teacher for c in cells if c.teacher} | {c.student for c in cells}
    from kdcli.models import list_models

    assert names <= set(list_models())  # every pair is named as kd names its models
    known = {c.method for c in cells} - {"teacher"}
    for method in known:
        method_class(method)  # every published row names one of kd's methods


def test_kd_compare_published(kd):
    result = kd("compare", "--published", "--student", "resnet8x4", "--json")
    assert result.code == 0, result.stderr
    tables = {t["source"]: t for t in json.loads(result.stdout)["published"]}
    crd = next(r for r in tables["repdistiller"]["rows"] if r["label"] == "CRD")
    assert crd["values"] == {"resnet32x4 → resnet8x4": "75.51"} and tables["repdistiller"]["selection"] == "last"
    assert "CVPR 2024" in tables["logit_std"]["citation"]
    human = kd("compare", "--published", "--student", "resnet20")
    assert human.code == 0 and "72.34" in human.stdout and "RepDistiller README" in human.stdout
    assert_clean_error(kd("compare", "--published", "--student", "resnet18"), "no published CIFAR-100 number for student resnet18")


# ---- paired seeds: the same student initialisation for every method ----------------------------

def test_same_seed_same_student_initialisation_across_methods():
    bundle = build_data(TINY_DATA)
    device = torch.device("cpu")

    def initial_student(method: str, seed: int):
        config = build_config({"command": "distill", "student": "resnet8", "teacher": "t.safetensors" if method != "none" else None,
                               "method": method, "data": TINY_DATA, "seed": seed, "batch_size": 32})
        torch.manual_seed(1000 + len(method))  # what came before (a teacher built and loaded) must not matter
        teacher = create_model("resnet8", num_classes=bundle.num_classes).eval() if method != "none" else None
        student, _, _, loader, _ = api.build_training(config, method_class(method), bundle, teacher, device)
        return student.state_dict(), next(iter(loader)).y

    plain, kd, crd, other = initial_student("none", 0), initial_student("kd", 0), initial_student("crd", 0), initial_student("kd", 1)
    for weights, labels in (kd, crd):
        assert weights.keys() == plain[0].keys()
        assert all(torch.equal(weights[k], plain[0][k]) for k in weights)
        assert torch.equal(labels, plain[1])  # and the same first batch
    assert not all(torch.equal(other[0][k], plain[0][k]) for k in plain[0])


# ---- packaging ----------------------------------------------------------------------------------

def test_the_published_tables_ship_in_the_wheel(tmp_path):
    """setuptools' build_py lays out exactly what bdist_wheel packs (no `wheel` package needed here)."""
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {f"kdcli/compare/published/{s}.toml" for s in published.SOURCES} <= names
    assert "kdcli/compare/__init__.py" in names and "kdcli/compare_worker.py" in names


def test_pyproject_ships_the_published_tables():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "kdcli.compare" in project["packages"]
    assert "published/*.toml" in project["package-data"]["kdcli.compare"]
    assert {p.stem for p in (ROOT / "kdcli" / "compare" / "published").glob("*.toml")} == set(published.SOURCES)
