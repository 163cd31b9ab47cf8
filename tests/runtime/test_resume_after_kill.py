"""SIGKILL the driver of a Ray run mid-run, `fedsim resume`, and the metrics equal an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedsim.simulation import run_simulation
from fedsim.validation import load_config

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [
    "method.name=fedsa_lora",  # kept per-client state must survive
    "privacy.mode=sample",
    "privacy.epsilon=8",
    "privacy.accountant=rdp",  # fast calibration: the subprocesses must reach round 2 in time on a loaded machine
    "federation.rounds=6",
    "federation.local_steps=6",
    "federation.eval_every=1",
    "runtime.checkpoint_every=1",
]
METRICS = ("round", "train_loss", "eval_loss", "eval_accuracy", "personal_accuracy", "epsilon_max", "bytes_up")


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fedsim", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in METRICS} for r in pq.read_table(run_dir / "rounds.parquet").to_pylist()]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    sets = [x for s in SETTINGS for x in ("--set", s)]
    proc = _cli("run", "tiny", *sets, "--set", "runtime.backend=ray", "--out", str(out), start_new_session=True)
    latest = out / "checkpoints" / "LATEST"
    deadline, reached = time.time() + 900, False
    while proc.poll() is None and time.time() < deadline:
        reached = latest.is_file() and latest.read_text().strip() >= "round-000002"
        if reached:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    if not reached:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not write its round-2 checkpoint within 900 s (machine overloaded?)")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    assert not (out / "summary.json").exists()

    resumed = _cli("resume", str(out), start_new_session=True)
    _, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err.decode()[-3000:]

    cfg, _ = load_config("tiny", [*SETTINGS, "runtime.backend=local"])  # same results whatever the backend
    full = tmp_path / "full"
    run_simulation(cfg, full, progress=False)
    got, want = _metrics(out), _metrics(full)
    assert [r["round"] for r in got] == list(range(1, 7))
    for a, b in zip(got, want, strict=True):
        for k in METRICS:
            assert (a[k] is None and b[k] is None) or abs(a[k] - b[k]) <= 1e-6, (a["round"], k, a[k], b[k])
