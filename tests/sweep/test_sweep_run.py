"""fedsim sweep + report on a tiny grid; an interrupted sweep resumes without redoing finished cells."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pyarrow.parquet as pq
import pytest

from fedsim.errors import UserError
from fedsim.report.build import make_report
from fedsim.sweep.runner import run_sweep
from fedsim.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[2]
GRID = """
base: tiny
set: {{federation.rounds: {rounds}, federation.local_steps: {steps}, data.synthetic_examples: 300}}
grid:
  method.name: [fedavg_lora, ffa_lora]
  seed: [0, 1]
"""


def _sweep_file(tmp_path: Path, rounds: int = 2, steps: int = 3) -> Path:
    path = tmp_path / "tiny-grid.yaml"
    path.write_text(GRID.format(rounds=rounds, steps=steps))
    return path


def test_sweep_then_report(tmp_path):
    spec = load_sweep(_sweep_file(tmp_path))
    out = tmp_path / "sweep"
    rows = run_sweep(spec, out, progress=False, log=lambda _: None)
    table = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [r["cell"] for r in table] == [c.cell_id for c in spec.cells] == [r["cell"] for r in rows]
    for row in table:
        summary = json.loads((out / row["run_dir"] / "summary.json").read_text())
        assert row["status"] == "complete" and row["error"] is None
        assert row["final_accuracy"] == summary["final_eval_accuracy"]
        assert row["wall_s"] == summary["wall_s"] and row["bytes_up"] == summary["bytes_up"]
        assert row["grid:method.name"] == row["method"] and row["grid:seed"] == row["seed"]

    report = make_report([out], out)
    text = report.read_text()
    for method in ("fedavg_lora", "ffa_lora"):
        accs = [r["final_accuracy"] for r in table if r["method"] == method]
        mean, std = 100 * np.mean(accs), 100 * np.std(accs, ddof=1)
        line = next(x for x in text.splitlines() if x.startswith("|") and f"| {method} |" in x)
        assert f"{mean:.2f} ± {std:.2f}" in line and "| 2 |" in line
    pngs = sorted(out.glob("*.png"))
    assert {p.name.split("__")[0] for p in pngs} >= {"accuracy", "bytes"}  # no DP here: no epsilon plot
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.name in text
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and float(img.std()) > 0


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path):
    path = _sweep_file(tmp_path, rounds=3, steps=8)
    spec = load_sweep(path)
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim", "sweep", str(path), "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = out / "cells" / spec.cells[0].cell_id / "summary.json"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {c.cell_id: (out / "cells" / c.cell_id / "summary.json") for c in spec.cells}
    finished = {cid: p.stat().st_mtime_ns for cid, p in done.items() if p.exists()}
    assert spec.cells[0].cell_id in finished
    assert len(finished) < len(spec.cells), "the sweep finished before it could be killed"

    logs: list[str] = []
    rows = run_sweep(spec, out, progress=False, log=logs.append)
    assert all(r["status"] == "complete" for r in rows) and len(rows) == len(spec.cells)
    assert f"{len(finished)} complete, {len(spec.cells) - len(finished)} to run" in logs[0]
    for cid, mtime in finished.items():
        assert done[cid].stat().st_mtime_ns == mtime  # not redone


def test_changed_sweep_refuses_stale_cells(tmp_path):
    out = tmp_path / "sweep"
    spec = load_sweep(_sweep_file(tmp_path))
    run_sweep(dataclasses.replace(spec, cells=spec.cells[:1]), out, progress=False, log=lambda _: None)
    changed = load_sweep(_sweep_file(tmp_path, rounds=1))
    before = (out / "sweep.parquet").read_bytes()
    with pytest.raises(UserError, match="different config"):
        run_sweep(changed, out, progress=False, log=lambda _: None)
    assert (out / "sweep.parquet").read_bytes() == before  # nothing written


def test_other_runtime_resources_keep_finished_cells(tmp_path):
    out = tmp_path / "sweep"
    spec = load_sweep(_sweep_file(tmp_path))
    run_sweep(dataclasses.replace(spec, cells=spec.cells[:1]), out, progress=False, log=lambda _: None)
    first = out / "cells" / spec.cells[0].cell_id / "summary.json"
    mtime = first.stat().st_mtime_ns
    path = tmp_path / "tiny-grid.yaml"
    path.write_text(
        path.read_text().replace(
            "data.synthetic_examples: 300", "data.synthetic_examples: 300, runtime.cpus_per_worker: 2"
        )
    )
    more = load_sweep(path)
    assert more.cells[0].config.runtime.cpus_per_worker == 2 != spec.cells[0].config.runtime.cpus_per_worker
    logs: list[str] = []
    run_sweep(dataclasses.replace(more, cells=more.cells[:2]), out, progress=False, log=logs.append)
    assert "1 complete, 1 to run" in logs[0] and first.stat().st_mtime_ns == mtime  # not stale, not redone
