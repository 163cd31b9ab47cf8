"""A first Ray run prints no error-level log line (`fedsim run tiny` on the Ray backend, in a subprocess).

What counts as an error-level line (after stripping ANSI colour codes), anywhere in the combined stdout/stderr:

* a Ray C++ (glog-style) log line of level E (error) or F (fatal): ``[2026-01-02 03:04:05,678 E 123 456]
  core_worker.cc:2465: ...``, also when Ray forwards it from another process with a prefix such as
  ``(raylet)`` or ``(WorkerActor pid=123)``;
* a Python logging line of level ERROR or CRITICAL (Ray's format ``2026-01-02 03:04:05,678\tERROR worker.py:1 --``,
  or the bare ``ERROR:name:message`` of ``logging.basicConfig``): the upper-case word ERROR or CRITICAL;
* a Python traceback (``Traceback (most recent call last):``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fedsim

ANSI = re.compile(r"\x1b\[[0-9;]*m")
GLOG_ERROR = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [EF] \d+ \d+\]")
PY_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b")
TRACEBACK = "Traceback (most recent call last)"


def error_lines(text: str) -> list[str]:
    """The error-level lines of ``text`` (see the module docstring)."""
    out = []
    for line in ANSI.sub("", text).splitlines():
        if GLOG_ERROR.search(line) or PY_ERROR.search(line) or TRACEBACK in line:
            out.append(line)
    return out


def test_the_matcher_finds_ray_and_python_error_lines_and_nothing_else():
    hits = [
        "[2026-11-28 18:34:47,656 E 3558 3558] core_worker.cc:2465: Actor with class name: 'WorkerActor' and ID: "
        "'22461d2b' has constructor arguments in the object store and max_restarts > 0.",
        "\x1b[33m(raylet)\x1b[0m [2026-11-28 18:34:47,656 E 3558 3600] node_manager.cc:1: something failed",
        "(WorkerActor pid=4242) [2026-11-28 18:34:47,656 F 4242 4242] logging.cc:1: fatal",
        "2026-11-28 18:34:47,656\tERROR worker.py:421 -- Unhandled error (suppress with ...)",
        "ERROR:fedsim:boom",
        "Traceback (most recent call last):",
    ]
    misses = [
        "[2026-11-28 18:34:47,656 W 3558 3558] core_worker.cc:1: a warning",
        "[2026-11-28 18:34:47,656 I 3558 3558] core_worker.cc:1: information",
        "2026-11-28 18:34:47,656\tWARNING worker.py:1 -- a warning",
        "round 1/1  loss 1.2911  acc 0.2500  elapsed 0s  eta 0s",
        "  failed_client_rounds     0",
        "ray.exceptions.RayActorError is handled by the driver",
    ]
    assert error_lines("\n".join(hits + misses)) == [ANSI.sub("", h) for h in hits]


@pytest.mark.ray
def test_a_first_ray_run_prints_no_error_level_line(tmp_path):
    env = dict(os.environ)
    root = str(Path(fedsim.__file__).resolve().parents[1])  # this checkout's fedsim, not another install's
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "fedsim", "run", "tiny", "--set", "runtime.backend=ray", "--set",
           "federation.rounds=1", "--out", str(tmp_path / "run"), "--overwrite"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout
    assert "round 1/1" in proc.stdout
    assert "backend: ray" in (tmp_path / "run" / "config.yaml").read_text()  # the tiny preset's default is local
    assert error_lines(proc.stdout) == [], proc.stdout
