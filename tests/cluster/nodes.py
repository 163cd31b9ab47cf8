"""Helpers for the multi-node tests: free ports, killing what a test cluster left, comparing two runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

#: rounds.parquet columns that measure time, not the training
WALL_CLOCK = {"wall_s", "worker_busy_frac"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_leftovers(temp_dir: str) -> None:
    """SIGKILL, by PID, every process whose command line names ``temp_dir`` (a test cluster's own temp dir)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmd and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Kill the head's process group, then any process of this head left outside it (its temp dir in the
    command line), by PID."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    kill_leftovers(temp_dir)


def results(run: Path) -> tuple[list[dict], dict]:
    """(rounds.parquet rows without the wall-clock columns, the final adapter's tensors) of a run folder."""
    table = pq.read_table(run / "rounds.parquet").to_pylist()
    rows = [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in table]
    return rows, load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_results(got: tuple[list[dict], dict], want: tuple[list[dict], dict]) -> None:
    """Same metrics in every round (to 1e-6) and the same final adapter (to 1e-6)."""
    rows, adapter = got
    want_rows, want_adapter = want
    assert [r["round"] for r in rows] == [r["round"] for r in want_rows]
    for r, w in zip(rows, want_rows, strict=True):
        for key, value in w.items():
            if isinstance(value, float):
                assert r[key] == pytest.approx(value, abs=1e-6, rel=0, nan_ok=True), (r["round"], key)
            else:
                assert r[key] == value, (r["round"], key)
    assert sorted(adapter) == sorted(want_adapter)
    for key, tensor in want_adapter.items():
        assert adapter[key] == pytest.approx(tensor, abs=1e-6), key
