"""Runs on an autoscaling Ray cluster built on this machine: Ray's fake multi-node node provider (what
``ray.cluster_utils.AutoscalingCluster`` starts), whose head has no CPU and which starts with no worker nodes.

* ``runtime.workers: 2``: the pending placement group is the autoscaler's demand; it launches worker nodes and the
  run completes;
* ``runtime.workers: auto``: the pool starts with one worker (nothing fits yet), the run asks the autoscaler for
  ``clients_per_round`` workers' worth, and the pool grows between rounds as nodes join; the results equal a
  one-process run's.

``AutoscalingCluster.start`` and ``shutdown`` run ``ray stop --force``, which would kill every Ray on this machine,
and its config template is not in the Ray wheel; the fixture therefore writes the same kind of config and starts
the head itself (``ray start --head --block --autoscaling-config``, own ports and temp dir, ``RAY_FAKE_CLUSTER=1``)
and kills its process group (the fake worker nodes are started by the head's monitor, in that group) and any
process left naming its temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedsim.simulation import run_simulation
from fedsim.validation import load_config
from tests.cluster.nodes import assert_same_results, free_port, kill_head, results

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
SETTINGS = ["federation.rounds=3", "federation.local_steps=2", "federation.eval_every=3"]
WORKER_TYPE = "cpu2"  # each launched node: 2 logical CPUs; at most 2 of them


def _config(gcs_port: int) -> dict:
    """A fake-multinode cluster config: a head with no CPU, worker nodes of type WORKER_TYPE (0 to 2)."""
    return {
        "cluster_name": "fedsim-test",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",  # not the default 6379: other clusters may run here
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # idle nodes go after 6 s, so each test starts from zero worker nodes
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling():
    """The GCS address of a running autoscaling head (no worker nodes yet)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="fsa", dir="/tmp")
    (Path(temp_dir) / "ray").mkdir()  # RAY_TMPDIR/ray: where Ray writes the cluster-address file
    gcs = free_port()
    config = Path(temp_dir) / "autoscaling.json"
    config.write_text(json.dumps(_config(gcs)))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               RAY_TMPDIR=temp_dir)  # fmt: skip
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--num-cpus=0", "--num-gpus=0", f"--autoscaling-config={config}", f"--temp-dir={temp_dir}",
           "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "wb")  # closed in the finalizer
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_TMPDIR", temp_dir)
            mp.delenv("RAY_ADDRESS", raising=False)
            from ray._raylet import GcsClient

            deadline = time.monotonic() + 120
            while True:  # up once its monitor has published a status
                assert proc.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
                try:
                    if GcsClient(address=f"127.0.0.1:{gcs}").internal_kv_get(b"__autoscaling_status", None):
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, "the autoscaling head did not come up in 120 s"
                time.sleep(1)
            yield f"127.0.0.1:{gcs}"
    finally:
        ray.shutdown()
        kill_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _worker_nodes(address: str) -> int:
    """Live nodes other than the head."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR")
    return sum(1 for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"])


def _from_zero(address: str) -> None:
    """Wait until the autoscaler has ended every idle worker node (idle_timeout_minutes)."""
    deadline = time.monotonic() + 120
    while _worker_nodes(address):
        assert time.monotonic() < deadline, "idle worker nodes were not terminated in 120 s"
        time.sleep(1)


def _run(out: Path, address: str, *overrides: str) -> dict:
    cfg, _ = load_config("tiny", [*SETTINGS, "runtime.backend=ray", f"runtime.address={address}", *overrides])
    seen: dict = {}

    def inspect(backend) -> None:
        seen.update(pool=len(backend.workers), nodes=backend.worker_nodes(), started=backend.describe())

    run_simulation(cfg, out, progress=False, inspect=inspect)
    return seen


def test_fixed_workers_on_an_autoscaling_cluster_from_zero_nodes(autoscaling, tmp_path):
    _from_zero(autoscaling)
    seen = _run(tmp_path / "two", autoscaling, "runtime.workers=2", "runtime.placement_timeout_s=300")
    assert _worker_nodes(autoscaling) >= 1  # launched for the run
    assert seen["pool"] == 2 and len(seen["nodes"]) >= 1
    assert (tmp_path / "two" / "summary.json").is_file()


def test_auto_workers_start_with_one_and_grow_as_nodes_join(autoscaling, tmp_path):
    _from_zero(autoscaling)
    seen = _run(tmp_path / "auto", autoscaling, "runtime.workers=auto", "runtime.placement_timeout_s=300")
    assert _worker_nodes(autoscaling) >= 1
    # one worker at first (the head has no CPU), then the node launched for it had a free CPU in round 2
    assert "auto: 1 now, up to 4" in seen["started"] and seen["pool"] > 1, seen
    cfg, _ = load_config("tiny", [*SETTINGS, "runtime.backend=local"])
    run_simulation(cfg, tmp_path / "one-process", progress=False)
    assert_same_results(results(tmp_path / "auto"), results(tmp_path / "one-process"))
