"""Runs submitted as Ray jobs write to S3 and survive a stopped job (issue 13's storage acceptance lines).

On a real ``ray start --head`` (the ``head`` fixture) and a real S3 server on 127.0.0.1 (SeaweedFS, the ``s3``
fixture): ``ray job submit -- python -m fedsim run tiny --set runtime.backend=ray --set runtime.workers=2 --out
s3://...`` ends SUCCEEDED and ``fedsim report s3://...`` reads it back; a second such job is stopped with ``ray job
stop`` (its request) once a checkpoint of round >= 1 is committed in S3 (``checkpoints/LATEST`` polled), and a
submitted ``fedsim resume s3://...`` ends SUCCEEDED with the uninterrupted run's rounds.parquet metrics (to 1e-6).

The jobs get the S3 settings (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION) through
``--runtime-env-json '{"env_vars": {...}}'``, as a user's job would on a cluster whose nodes have no credentials of
their own; TMPDIR points into the test's folder, so the staging folder of the stopped job is removed with it.
"""

from __future__ import annotations

import json
import math
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsim.cli import main
from tests.cluster.ray_head import env_json, job_logs, job_status, stop_job, submit, wait_job, working_dir

ROUNDS = 8
RUN = ["python", "-m", "fedsim", "run", "tiny", "--set", "runtime.backend=ray", "--set", "runtime.workers=2",
       "--set", f"federation.rounds={ROUNDS}", "--set", "federation.eval_every=1"]  # fmt: skip
TIMING = {"wall_s", "worker_busy_frac"}  # wall-clock columns: differ between any two runs


def _rounds(s3, path: str) -> list[dict]:
    return pq.read_table(pa.BufferReader(s3.read(f"{path}/rounds.parquet"))).to_pylist()


def _assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    """Every column but the wall-clock ones: numbers to 1e-6, the rest (method, None) equal."""
    assert [r["round"] for r in got] == [r["round"] for r in want] == list(range(1, ROUNDS + 1))
    for a, b in zip(got, want, strict=True):
        for key in b.keys() - TIMING:
            if isinstance(b[key], (int, float)) and a[key] is not None:
                assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-6), (a["round"], key, a[key], b[key])
            else:
                assert a[key] == b[key], (a["round"], key, a[key], b[key])


def _stop_after_a_checkpoint(head, s3, job: str, prefix: str) -> bool:
    """Stop ``job`` as soon as S3's ``<prefix>/checkpoints/LATEST`` names round >= 1; whether it stopped mid-run
    (STOPPED, no summary.json) rather than finishing first."""
    latest = f"{s3.bucket}/{prefix}/checkpoints/LATEST"
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, job_logs(head, job)[-5000:]
        status = job_status(head, job)
        assert status in ("PENDING", "RUNNING", "SUCCEEDED"), job_logs(head, job)[-5000:]
        try:
            committed = s3.server.read(latest).decode().strip()
        except OSError:
            committed = ""
        if status == "SUCCEEDED" or committed not in ("", "round-000000"):
            break
        time.sleep(0.1)
    stop_job(head, job)
    return wait_job(head, job) == "STOPPED" and "summary.json" not in s3.files(prefix)


@pytest.mark.ray
@pytest.mark.slow
def test_submitted_runs_write_to_s3_and_a_stopped_job_resumes_to_the_same_metrics(head, s3, tmp_path):
    wd = working_dir(tmp_path / "wd")
    (tmp_path / "jobtmp").mkdir()
    env = env_json({**s3.server.env, "TMPDIR": str(tmp_path / "jobtmp")})
    tag = f"{os.getpid()}-{int(time.time())}"

    # 1. An uninterrupted submitted run to S3 and, at the same time, the same run to be stopped once a checkpoint of
    #    round >= 1 is committed (LATEST names it) and before it finishes (else again: never pass vacuously).
    full = s3.uri("full")
    submit(head, f"full-{tag}", wd, [*RUN, "--out", full], env)
    for attempt in range(3):
        prefix, job = f"stopped{attempt}", f"stopped-{attempt}-{tag}"
        submit(head, job, wd, [*RUN, "--out", s3.uri(prefix)], env)
        if _stop_after_a_checkpoint(head, s3, job, prefix):
            break
        print(f"attempt {attempt}: the run finished before the job was stopped")  # shown if the test fails
    else:
        pytest.fail("every run finished before the job was stopped")
    stopped_at = int(s3.read(f"{prefix}/checkpoints/LATEST").decode().strip().split("-")[1])
    assert 1 <= stopped_at < ROUNDS

    # 2. `fedsim resume s3://...` as a job (while the uninterrupted run may still be going) continues from the
    #    committed checkpoint to the uninterrupted result.
    resume = f"resume-{tag}"
    submit(head, resume, wd, ["python", "-m", "fedsim", "resume", s3.uri(prefix)], env)

    assert wait_job(head, f"full-{tag}") == "SUCCEEDED", job_logs(head, f"full-{tag}")[-5000:]
    assert "summary.json" in s3.files("full")
    assert main(["report", full, "--out", str(tmp_path / "report")]) == 0  # `fedsim report s3://...` reads it back
    assert f"`{full}` (run)" in (tmp_path / "report" / "report.md").read_text()

    assert wait_job(head, resume) == "SUCCEEDED", job_logs(head, resume)[-5000:]
    assert f"from round-{stopped_at:06d}" in job_logs(head, resume)
    assert json.loads(s3.read(f"{prefix}/summary.json"))["resumed_from_round"] == stopped_at
    _assert_same_metrics(_rounds(s3, prefix), _rounds(s3, "full"))
