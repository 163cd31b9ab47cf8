"""Parallel sweeps (cells as Ray tasks): a sweep over docs/extending.md's plugins from a folder that only this
process has on ``sys.path`` completes (the cell tasks get the modules shipped), with the same results as the same
sweep run one cell after another."""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
import yaml

from fedsim.sweep.runner import run_sweep
from fedsim.sweep.spec import load_sweep
from tests.test_plugins import MODULE, plugin_overrides, write_example


def test_a_parallel_sweep_ships_plugin_modules_and_matches_a_sequential_one(tmp_path, monkeypatch, ray_cluster):
    folder = tmp_path / "user_code"
    folder.mkdir()
    news = write_example(folder)
    monkeypatch.syspath_prepend(str(folder))  # not on PYTHONPATH: Ray's task processes do not see it
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    sweep = {"base": "tiny", "set": plugin_overrides(news), "grid": {"seed": [0, 1]}}
    path = tmp_path / "plugins.yaml"
    path.write_text(yaml.safe_dump(sweep))
    try:
        spec = load_sweep(path)
        run_sweep(spec, tmp_path / "parallel", parallel=2, progress=False, log=lambda _: None)
        run_sweep(spec, tmp_path / "sequential", parallel=1, progress=False, log=lambda _: None)
    finally:
        sys.modules.pop(MODULE, None)
    parallel = pq.read_table(tmp_path / "parallel" / "sweep.parquet").to_pylist()
    sequential = pq.read_table(tmp_path / "sequential" / "sweep.parquet").to_pylist()
    assert [r["status"] for r in parallel] == ["complete", "complete"], [r["error"] for r in parallel]
    assert [r["method"] for r in parallel] == [f"{MODULE}:MedianB"] * 2
    for a, b in zip(parallel, sequential, strict=True):
        assert a["cell"] == b["cell"] and a["final_accuracy"] == b["final_accuracy"]
        assert a["final_loss"] == b["final_loss"]
