"""runtime.workers: auto on the local Ray of the tests (2 CPUs): the pool is sized from the free CPUs and the
results equal the one-process run's; runtime.gpus_per_worker: auto on a cluster without GPUs puts the workers on
CPU (and says so)."""

from __future__ import annotations

import pytest

from fedsim.simulation import run_simulation
from fedsim.validation import load_config
from tests.cluster.nodes import assert_same_results, results

SETTINGS = ["federation.rounds=2", "federation.local_steps=2", "federation.eval_every=2"]


@pytest.mark.ray
def test_auto_takes_the_free_cpus_and_changes_no_result(tmp_path, ray_cluster, capfd):
    auto = ["runtime.workers=auto", "runtime.gpus_per_worker=auto"]
    cfg, _ = load_config("tiny", [*SETTINGS, "runtime.backend=ray", *auto])
    seen = {}
    run_simulation(cfg, tmp_path / "auto", progress=False, inspect=lambda b: seen.update(desc=b.describe()))
    assert seen["desc"].startswith("ray backend (auto: 2 now, up to 4 workers x 1 CPU;"), seen  # no GPU share
    assert "runtime.gpus_per_worker: auto: no GPU in the cluster now; workers run on CPU" in capfd.readouterr().err
    cfg, _ = load_config("tiny", [*SETTINGS, "runtime.backend=local"])
    run_simulation(cfg, tmp_path / "local", progress=False)
    assert_same_results(results(tmp_path / "auto"), results(tmp_path / "local"))
