"""A real one-node Ray cluster for tests (``ray start --head --block`` in a subprocess) and `ray job` helpers.

The head gets its own short temp dir and free loopback ports, runs the venv's `ray` with the venv first on PATH (so
its jobs' ``python`` is the venv's) and ``RAY_LOG_TO_STDERR=1`` (Ray's setting for container log collection), and
is killed by its process group (then any leftover process naming its temp dir, by PID).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fedsim
from tests.cluster.nodes import free_port, kill_head

ROOT = Path(fedsim.__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv: `ray` and the `python` the cluster's jobs run
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class Head:
    gcs: int
    dashboard: int
    proc: subprocess.Popen
    temp_dir: str

    @property
    def address(self) -> str:
        """The job server's address (what `ray job submit --address` takes)."""
        return f"http://127.0.0.1:{self.dashboard}"


@contextmanager
def start_head(cpus: int = 2, timeout: float = 120) -> Iterator[Head]:
    """A one-node Ray cluster (``cpus`` CPUs, no GPU, dashboard on); yields when its job server answers."""
    temp_dir = tempfile.mkdtemp(prefix="fsj", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dash, client, agent = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_LOG_TO_STDERR="1")
    log = open(Path(temp_dir) / "head.log", "wb")  # closed in the finalizer
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={cpus}", "--num-gpus=0",
           f"--dashboard-port={dash}", "--include-dashboard=true", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            try:
                JobSubmissionClient(f"http://127.0.0.1:{dash}").list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, f"the head did not come up in {timeout:.0f} s"
                time.sleep(1)
        yield Head(gcs, dash, proc, temp_dir)
    finally:
        kill_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def working_dir(dest: Path) -> Path:
    """A job's --working-dir: fedsim/ (no caches) and pyproject.toml, well under Ray's upload limit."""
    shutil.copytree(ROOT / "fedsim", dest / "fedsim", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def submit(head: Head, job_id: str, wd: Path, entrypoint: Sequence[str], runtime_env_json: str | None = None) -> None:
    """`ray job submit --no-wait` of ``entrypoint`` with ``wd`` as the working dir (RAY_ADDRESS unset)."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.address, "--submission-id", job_id, "--no-wait",
           "--working-dir", str(wd)]  # fmt: skip
    if runtime_env_json is not None:
        cmd += ["--runtime-env-json", runtime_env_json]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([*cmd, "--", *entrypoint], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def job_status(head: Head, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(head.address).get_job_status(job_id).value)


def job_logs(head: Head, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address).get_job_logs(job_id)


def wait_job(head: Head, job_id: str, timeout: float = 300) -> str:
    """Wait until the job ends; return its final status (SUCCEEDED, FAILED or STOPPED)."""
    deadline = time.monotonic() + timeout
    while (status := job_status(head, job_id)) not in FINAL:
        assert time.monotonic() < deadline, f"job {status} after {timeout:.0f} s:\n{job_logs(head, job_id)[-3000:]}"
        time.sleep(1)
    return status


def stop_job(head: Head, job_id: str) -> None:
    """Stop the job as `ray job stop` does (the job server's stop request: SIGTERM to its driver), from this process
    (the CLI would first spend seconds importing Ray); does not wait."""
    from ray.job_submission import JobSubmissionClient

    JobSubmissionClient(head.address).stop_job(job_id)


def env_json(env: Mapping[str, str]) -> str:
    """A --runtime-env-json value that sets ``env`` for the job (its driver and its workers)."""
    import json

    return json.dumps({"env_vars": dict(env)})
