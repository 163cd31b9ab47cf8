"""fedsim report: table numbers, figures, determinism, sweeps and bad input."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import matplotlib.colors
import matplotlib.image as mpimg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsim.config.load import config_from_dict, dump_config
from fedsim.errors import UserError
from fedsim.metrics.tables import MetricTables
from fedsim.report import RECORD_COLUMNS, load_records, make_report, run_record
from fedsim.types import Role, RoundPlan

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query")


def write_run(
    d: Path,
    *,
    method: str,
    seed: int,
    accs: list[float],
    eps: float | None = None,
    partition: str = "dirichlet",
    wall: float = 2.0,
    bytes_up: int = 1000,
    bytes_down: int = 3000,
    extra: dict[str, Any] | None = None,
    analyses: bool = False,
    personal: list[float] | None = None,
) -> Path:
    """A finished run directory written with the real config and metric-table writers (``personal``: the
    personal_accuracy per round; default none recorded)."""
    privacy = {"mode": "sample", "epsilon": eps} if eps is not None else {"mode": "none"}
    cfg = config_from_dict(
        {"seed": seed, "method": {"name": method}, "privacy": privacy, "data": {"partition": {"kind": partition}}}
        | (extra or {})
    )
    dump_config(cfg, d / "config.yaml")
    tables = MetricTables(d)
    eps_path = [eps * t / len(accs) for t in range(1, len(accs) + 1)] if eps is not None else None
    for t, acc in enumerate(accs, start=1):
        row = {"round": t, "method": method, "eval_accuracy": acc, "bytes_up": 10, "bytes_down": 30}
        row["personal_accuracy"] = personal[t - 1] if personal else None
        row["epsilon_max"] = eps_path[t - 1] if eps_path else None
        tables.add_round(row, [])
        if analyses:
            shared, frozen = ("A", "B") if t % 2 else ("B", "A")
            roles = {f"{layer}.lora_{shared}": Role.SHARED for layer in LAYERS}
            tables.add_roles(RoundPlan(t, {**roles, **{f"{layer}.lora_{frozen}": Role.FROZEN for layer in LAYERS}}))
            tables.add_similarity(
                [{"round": t, "layer": layer, "factor": f, "similarity": 0.1 * t, "clients": 3}
                 for layer in LAYERS for f in "AB"]
            )  # fmt: skip
    tables.flush()
    summary = {
        "method": method,
        "final_eval_accuracy": accs[-1],
        "best_eval_accuracy": max(accs),
        "final_eval_loss": 1.0 - accs[-1],
        "final_personal_accuracy": accs[-1] / 2,
        "privacy_mode": privacy["mode"],
        "epsilon": eps_path[-1] if eps_path else None,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "wall_s": wall,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


# (method, eps) -> per seed: accuracy per round
RUNS = {
    ("fedavg_lora", None): {0: [0.30, 0.50, 0.61], 1: [0.35, 0.55, 0.58]},
    ("ffa_lora", None): {0: [0.40, 0.60, 0.70], 1: [0.20, 0.66, 0.64], 2: [0.31, 0.52, 0.67]},
    ("ffa_lora", 4.0): {0: [0.25, 0.40, 0.45], 1: [0.28, 0.44, 0.41]},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    out = []
    for (method, eps), seeds in RUNS.items():
        for seed, accs in seeds.items():
            d = root / f"{method}_{eps}_{seed}"
            wall = 1.0 + seed + len(accs) * accs[-1]
            up = 1000 * (seed + 1)
            out.append(write_run(d, method=method, seed=seed, accs=accs, eps=eps, wall=wall, bytes_up=up,
                                 analyses=method == "ffa_lora"))  # fmt: skip
    return out


def results_rows(md: str) -> list[dict[str, str]]:
    """The Results table as dicts keyed by header."""
    block = md.split("## Results\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in block[0].strip("|").split(" | ")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")), strict=True)) for line in block[2:]]


def parse_pm(text: str) -> tuple[float, float | None]:
    parts = [float(x) for x in text.split("±")]
    return parts[0], (parts[1] if len(parts) > 1 else None)


def linked_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4)


def test_table_is_mean_and_std_over_seeds(runs: list[Path], tmp_path: Path) -> None:
    md = make_report(runs, tmp_path / "rep", machine="test box").read_text()
    rows = results_rows(md)
    assert len(rows) == len(RUNS)
    for (method, eps), seeds in RUNS.items():
        privacy = "none" if eps is None else f"ε={eps:g} (sample)"
        (row,) = [r for r in rows if r["Method"] == method and r["Privacy"] == privacy]
        assert row["Task"] == "synthetic" and row["Partition"] == "dirichlet(0.5)"
        assert int(row["Seeds"]) == len(seeds)
        picks = (("Final acc. (%)", lambda a: a[-1]), ("Best acc. (%)", max), ("Local acc. (%)", lambda a: a[-1] / 2))
        for col, pick in picks:
            vals = [100 * pick(a) for a in seeds.values()]
            mean, std = parse_pm(row[col])
            assert mean == pytest.approx(statistics.mean(vals), abs=0.006)
            assert std == pytest.approx(statistics.stdev(vals), abs=0.006)
        walls = [1.0 + s + len(a) * a[-1] for s, a in seeds.items()]
        assert float(row["Wall s / run"]) == pytest.approx(statistics.mean(walls), abs=0.051)
        mb = statistics.mean((1000 * (s + 1) + 3000) / 1e6 for s in seeds)
        assert float(row["MB up+down / run"]) == pytest.approx(mb, rel=1e-2)
        assert row["ε spent"] == ("–" if eps is None else f"{eps:.3g}")
    # report order: no-DP settings first, then by epsilon; methods alphabetical within a setting
    assert [(r["Privacy"], r["Method"]) for r in rows] == [
        ("none", "fedavg_lora"), ("none", "ffa_lora"), ("ε=4 (sample)", "ffa_lora")
    ]  # fmt: skip
    assert "Machine: test box" in md
    assert md.count("| complete |") == sum(len(s) for s in RUNS.values())  # one Runs row per run, wall time in it


def test_every_figure_exists_and_is_a_png(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    md = make_report(runs, out).read_text()
    links = linked_images(md)
    assert all("/" not in link for link in links)  # relative, next to report.md
    assert sorted(links) == sorted(p.name for p in out.glob("*.png"))
    prefixes = {link.split("__")[0] for link in links}
    # no "choices" heatmap: the runs with a roles table are ffa_lora's, which does not choose factors per layer
    assert prefixes == {"accuracy", "epsilon", "bytes", "similarity"}
    assert sum(link.startswith("similarity") for link in links) == 2  # ffa_lora without and with DP
    for link in links:
        assert_png(out / link)


def test_same_inputs_give_identical_files(runs: list[Path], tmp_path: Path) -> None:
    a = make_report(runs, tmp_path / "a", machine="m")
    b = make_report(runs, tmp_path / "b", machine="m")
    assert a.read_bytes() == b.read_bytes()
    for png in sorted((tmp_path / "a").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "b" / png.name).read_bytes(), png.name
    assert b"tEXt" not in png.read_bytes()  # no Software / date text chunks


def test_run_record_fields(runs: list[Path]) -> None:
    dp = next(p for p in runs if p.name.startswith("ffa_lora_4.0"))
    rec = run_record(dp)
    assert set(rec) == set(RECORD_COLUMNS)
    assert rec["status"] == "complete" and rec["method"] == "ffa_lora" and rec["privacy_mode"] == "sample"
    assert rec["epsilon_target"] == 4.0 and rec["epsilon_spent"] == pytest.approx(4.0)
    assert rec["partition"] == "dirichlet(0.5)" and rec["task"] == "synthetic"
    assert run_record(dp, base=dp.parent)["run_dir"] == dp.name
    plain = run_record(next(p for p in runs if p.name.startswith("fedavg")))
    assert plain["epsilon_target"] is None and plain["epsilon_spent"] is None


def make_sweep(root: Path) -> Path:
    """A sweep folder: three complete cells (two seeds of rank 4, one of rank 8) and one failed cell."""
    rows = []
    for cell, seed, r, status in (("c0", 0, 4, "complete"), ("c1", 1, 4, "complete"), ("c2", 0, 8, "complete"),
                                  ("c3", 1, 8, "failed")):  # fmt: skip
        d = root / "cells" / cell
        d.mkdir(parents=True)
        if status == "complete":
            write_run(d, method="fedsa_lora", seed=seed, accs=[0.5, 0.6 + 0.1 * seed + r / 100], partition="iid",
                      extra={"lora": {"r": r}})  # fmt: skip
            rec = run_record(d, base=root) | {"error": None}
        else:
            rec = {c: None for c in RECORD_COLUMNS} | {"cell": cell, "run_dir": f"cells/{cell}", "status": "failed"}
            rec["error"] = "DataError: data.source: boom"
        rows.append(rec | {"grid:lora.r": r})
    pq.write_table(pa.Table.from_pylist(rows), root / "sweep.parquet")
    return root


def test_sweep_directory(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path / "sweep")
    records = load_records([sweep])
    assert [r["status"] for r in records] == ["complete", "complete", "complete", "failed"]
    md = make_report([sweep], tmp_path / "rep").read_text()
    rows = results_rows(md)
    assert [(r["lora.r"], r["Seeds"]) for r in rows] == [("4", "2"), ("8", "1")]  # rank splits the groups
    mean, std = parse_pm(rows[0]["Final acc. (%)"])
    assert mean == pytest.approx(100 * statistics.mean([0.64, 0.74]), abs=0.006) and std is not None
    assert parse_pm(rows[1]["Final acc. (%)"]) == (pytest.approx(68.0, abs=0.006), None)
    assert "4 cells, 3 complete, 1 not complete" in md
    assert re.search(r"\| c3 \|.*\| failed \|", md)
    assert "- `c3` (failed, " in md and "DataError: data.source: boom" in md


def test_bad_inputs_name_the_path(tmp_path: Path, runs: list[Path]) -> None:
    with pytest.raises(UserError, match="at least one"):
        make_report([], tmp_path / "rep")
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=re.escape(str(missing)) + ": not found"):
        make_report([missing], tmp_path / "rep")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UserError, match=re.escape(str(plain)) + ": neither a run directory"):
        make_report([runs[0], plain], tmp_path / "rep")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((runs[0] / "config.yaml").read_text())
    with pytest.raises(UserError, match=re.escape(str(unfinished)) + ": has config.yaml but no summary.json"):
        make_report([unfinished], tmp_path / "rep")
    failed_sweep = tmp_path / "failed_sweep"
    (failed_sweep / "cells").mkdir(parents=True)
    row = {c: None for c in RECORD_COLUMNS} | {"cell": "c0", "run_dir": "cells/c0", "status": "failed"}
    pq.write_table(pa.Table.from_pylist([row]), failed_sweep / "sweep.parquet")
    with pytest.raises(UserError, match=re.escape(str(failed_sweep)) + ": no complete run"):
        make_report([failed_sweep], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()  # nothing written on bad input


def test_report_over_real_runs(tmp_path: Path) -> None:
    """Two real 2-round AS-LoRA runs (tiny preset, local backend) with the similarity analysis on."""
    from fedsim.simulation import run_simulation
    from fedsim.validation import load_config

    dirs = []
    for seed in (0, 1):
        sets = ["federation.rounds=2", "runtime.backend=local", "method.name=as_lora", "analysis.similarity=true"]
        cfg, _ = load_config("tiny", [*sets, f"seed={seed}"])
        run_simulation(cfg, tmp_path / f"run{seed}", progress=False)
        dirs.append(tmp_path / f"run{seed}")
    out = tmp_path / "rep"
    md = make_report(dirs, out).read_text()
    (row,) = results_rows(md)
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    mean, _ = parse_pm(row["Final acc. (%)"])
    assert mean == pytest.approx(100 * statistics.mean(s["final_eval_accuracy"] for s in summaries), abs=0.006)
    links = linked_images(md)
    assert {link.split("__")[0] for link in links} == {"accuracy", "bytes", "similarity", "choices"}
    for link in links:
        assert_png(out / link)


def test_per_method_settings_do_not_split_figures():
    from fedsim.report.groups import group_records

    def rec(method: str, seed: int, lr: float, r: int = 8) -> dict:
        settings = {"federation.lr": lr, "lora.r": r}
        return {"status": "complete", "task": "t", "partition": "iid", "privacy_mode": "none",
                "epsilon_target": None, "noise_multiplier": None, "method": method, "seed": seed,
                "path": f"{method}-{seed}-{r}", "settings": settings}  # fmt: skip

    tuned = [rec("a", s, 0.5) for s in (0, 1)] + [rec("b", s, 2.0) for s in (0, 1)]
    groups, extra = group_records(tuned)
    assert extra == ["federation.lr"] and len(groups) == 2
    assert {g.panel_key for g in groups} == {("t", "iid", ())}  # one figure for both methods
    assert {g.tuned for g in groups} == {(("federation.lr", "0.5"),), (("federation.lr", "2"),)}
    swept = tuned + [rec("a", s, 0.5, r=4) for s in (0, 1)]  # lora.r varies within method a: a real condition
    groups, extra = group_records(swept)
    assert extra == ["federation.lr", "lora.r"]
    assert {g.panel_key for g in groups} == {("t", "iid", (("lora.r", "4"),)), ("t", "iid", (("lora.r", "8"),))}


def accuracy_figure_curves(runs: list[Path], out: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[float]]:
    """Build the report; return the accuracy figure's curves as {legend label: y values (%)} (one panel)."""
    from fedsim.report import plots

    figures = []
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: (figures.append((path.name, fig)), save(fig, path))[1])
    md = make_report(runs, out).read_text()
    (fig,) = [f for name, f in figures if name.startswith("accuracy")]
    (ax,) = fig.axes
    legend = fig.legends[0]
    by_color = {matplotlib.colors.to_hex(line.get_color()): list(line.get_ydata()) for line in ax.get_lines()}
    curves = {
        text.get_text(): by_color[matplotlib.colors.to_hex(handle.get_color())]
        for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)
    }
    assert "(personalised)" in md and "`personal_accuracy`" in md  # the caption says what the curves are
    return curves


def test_accuracy_curve_is_personalised_for_methods_that_keep_client_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsim.methods.base import get_method

    assert get_method("fedsa_lora").capabilities.keeps_client_state
    assert not get_method("ffa_lora").capabilities.keeps_client_state
    runs = [
        write_run(tmp_path / "sa", method="fedsa_lora", seed=0, accs=[0.2, 0.2, 0.2], personal=[0.5, 0.6, 0.7]),
        write_run(tmp_path / "ffa", method="ffa_lora", seed=0, accs=[0.3, 0.4, 0.5], personal=[0.9, 0.8, 0.9]),
    ]
    curves = accuracy_figure_curves(runs, tmp_path / "rep", monkeypatch)
    assert curves.keys() == {"fedsa_lora (personalised)", "ffa_lora"}
    assert curves["fedsa_lora (personalised)"] == pytest.approx([50.0, 60.0, 70.0])  # personal_accuracy
    assert curves["ffa_lora"] == pytest.approx([30.0, 40.0, 50.0])  # eval_accuracy, not its personal_accuracy


def test_accuracy_curve_falls_back_to_global_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A method the registry does not know (an old run of a removed method), and a keeps-state method whose runs
    recorded no personalised accuracy: the global eval_accuracy, without the (personalised) mark."""
    old = write_run(tmp_path / "old", method="ffa_lora", seed=0, accs=[0.3, 0.4, 0.5], personal=[0.9, 0.8, 0.9])
    cfg = old / "config.yaml"
    cfg.write_text(cfg.read_text().replace("name: ffa_lora", "name: removed_lora"))
    no_personal = write_run(tmp_path / "sa", method="fedsa_lora", seed=0, accs=[0.2, 0.25, 0.3])
    curves = accuracy_figure_curves([old, no_personal], tmp_path / "rep", monkeypatch)
    assert curves.keys() == {"fedsa_lora", "removed_lora"}
    assert curves["fedsa_lora"] == pytest.approx([20.0, 25.0, 30.0])
    assert curves["removed_lora"] == pytest.approx([30.0, 40.0, 50.0])
