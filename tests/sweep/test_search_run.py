"""A Tune search on tiny-bert: ASHA stops trials early, sweep.parquet lists every trial, `fedsim report` reads it,
and a killed search resumes (Tuner.restore) without rerunning the trials that had ended."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from fedsim.cli import main
from fedsim.report.build import make_report
from fedsim.runtime.tune_search import STATE_PERIOD_S
from fedsim.sweep.search_run import run_search, trial_folders
from fedsim.sweep.spec import load_sweep

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
ROUNDS, SAMPLES = 4, 6
# local_steps 24: trials of a few seconds, so the kill (1 s after the saved state first shows an ended trial) lands
# well before the search ends (with tiny's 3 steps the last trials could end within that second on an idle machine)
SEARCH = f"""
base: tiny
set: {{federation.rounds: {ROUNDS}, federation.local_steps: 24, data.synthetic_examples: 300}}
search:
  algorithm: optuna
  metric: final_eval_loss
  samples: {SAMPLES}
  scheduler: asha
  grace_period: 1
  reduction_factor: 2
  seed: 0
  max_concurrent: 1
  space:
    federation.lr: loguniform(1e-4, 1)
"""


def _ended_in_saved_state(experiment: Path) -> set[str]:
    """Trials the saved Tune experiment state (what a restore reads) records as ended."""
    for path in sorted(glob.glob(str(experiment / "experiment_state-*.json")), reverse=True)[:1]:
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):  # being written
            return set()
        trials = [json.loads(t[0]) for t in state["trial_data"]]
        return {t["trial_id"] for t in trials if t["status"] in ("TERMINATED", "ERROR")}
    return set()


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (the search's driver and the Ray it started; nothing else)."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the command: state, ppid, pgrp, session
            try:
                os.kill(int(Path(stat).parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _files(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}


@pytest.fixture(autouse=True)
def own_ray():
    """Each search starts its own local Ray (as from a shell): a Ray another test left initialised in this process
    (the session's ray_cluster) has worker processes without this test's PYTHONPATH and other trials' state."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_search_stops_trials_early_records_them_and_resumes_after_a_kill(tmp_path, capsys):
    path = tmp_path / "lr-search.yaml"
    path.write_text(SEARCH)
    out = tmp_path / "search"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim", "sweep", str(path), "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while not _ended_in_saved_state(out / "tune") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        # the state file just appeared: Tune is copying the experiment's files into <out>/tune right now. Kill
        # between two saves (every STATE_PERIOD_S), as a kill at a random moment almost always lands
        time.sleep(STATE_PERIOD_S / 2)
    finally:
        _kill_session(proc.pid)
        proc.wait()
    ended = _ended_in_saved_state(out / "tune")
    assert ended, "no trial ended before the deadline"
    assert len(ended) < SAMPLES, "the search finished before it could be killed"
    before = {cid: _files(out / "cells" / cid) for cid in ended}
    folders = trial_folders(out)

    capsys.readouterr()
    logs: list[str] = []
    rows = run_search(load_sweep(path), out, log=logs.append)
    printed = capsys.readouterr().out
    assert any("continuing the Tune experiment" in line for line in logs)
    for cid in ended:  # ended trials were not run again
        assert f"trial {cid} started" not in printed
        assert _files(out / "cells" / cid) == before[cid]

    table = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [r["cell"] for r in table] == [r["cell"] for r in rows] and len(table) == SAMPLES
    assert ended <= {r["cell"] for r in table}
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(r["cell"] for r in table)
    lost = folders - {r["cell"] for r in table}  # trials that started after the last saved state: folders removed
    assert any(f"removed the folders of {len(lost)} trial(s)" in line for line in logs) == bool(lost)
    assert {r["status"] for r in table} <= {"complete", "stopped"}
    stopped = [r for r in table if r["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial early"
    for r in table:
        assert 1e-4 <= r["space:federation.lr"] <= 1 and r["search_metric"] == "final_eval_loss"
        assert r["search_value"] == pytest.approx(r["final_loss"])
        if r["status"] == "stopped":
            assert 1 <= r["stopped_at_round"] < ROUNDS and r["rounds_done"] == r["stopped_at_round"]
            assert not (out / r["run_dir"] / "summary.json").exists()
        else:
            assert r["stopped_at_round"] is None and r["rounds_done"] == ROUNDS
            summary = json.loads((out / r["run_dir"] / "summary.json").read_text())
            assert r["final_loss"] == summary["final_eval_loss"]
    assert any("best:" in line for line in logs)
    assert sorted(p.name for p in (out / "tb").iterdir()) == sorted(r["cell"] for r in table)  # HParams

    report = make_report([out], out).read_text()
    done = sum(r["status"] == "complete" for r in table)
    assert f"(search: {SAMPLES} trials, {done} complete, {len(stopped)} stopped early, 0 not complete)" in report
    assert f"`{stopped[0]['cell']}` (stopped" in report and "stopped early by the search's scheduler" in report


def test_random_search_without_scheduler_through_the_cli_records_a_failed_trial(tmp_path, capsys, monkeypatch):
    (tmp_path / "failing_source.py").write_text("def source(cfg, seed, arg=None):\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{tmp_path}")  # the trials' processes import it too
    path = tmp_path / "random.yaml"
    path.write_text(
        "base: tiny\nset: {federation.rounds: 2, data.synthetic_examples: 300}\n"
        "search: {algorithm: random, metric: best_eval_accuracy, samples: 2, seed: 0, "  # seed 0: r = 4, then 2
        "space: {federation.lr: uniform(0.05, 0.5), lora.r: choice([2, 4])}}\n"
        "rules: [{when: {lora.r: 2}, set: {data.source: 'failing_source:source'}}]\n"
    )
    out = tmp_path / "search"
    assert main(["sweep", str(path), "--out", str(out)]) == 1  # a failed trial
    table = pq.read_table(out / "sweep.parquet").to_pylist()
    assert sorted((r["space:lora.r"], r["status"]) for r in table) == [(2, "failed"), (4, "complete")]
    failed, done = sorted(table, key=lambda r: r["space:lora.r"])
    assert "RuntimeError: boom" in failed["error"] and "trial " + failed["cell"] + " FAILED" in capsys.readouterr().out
    cfg = yaml.safe_load((out / done["run_dir"] / "config.yaml").read_text())
    assert cfg["federation"]["lr"] == done["space:federation.lr"] and cfg["lora"]["r"] == 4
    assert cfg["runtime"]["backend"] == "local" and done["search_value"] == done["best_accuracy"]
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "(search: 2 trials, 1 complete, 0 stopped early, 1 not complete)" in text and "boom" in text
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    assert sorted(capsys.readouterr().out.splitlines()[-2:]) == [
        f"complete  {done['cell']}",
        f"failed  {failed['cell']}",
    ]
