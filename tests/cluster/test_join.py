"""fedsim joins a Ray cluster instead of starting one (fedsim.runtime.cluster).

* Without a cluster: the join/start decision, the address form check, the address probe (refused, HTTP server,
  silent server, gRPC server), and what ``connect`` passes to ``ray.init`` (a fake ``ray``).
* With a real head (the ``head`` fixture of tests/cluster/conftest.py: ``ray start --head --block`` in a
  subprocess, its own temp dir and free ports; killed by its process group): ``ray job submit`` of ``python -m
  fedsim run tiny`` with no ``runtime.address`` succeeds, writes rounds.parquet, prints the dashboard line, keeps
  Ray's own log lines out of the job's output, and leaves the cluster up. The head runs with
  ``RAY_LOG_TO_STDERR=1`` (Ray's setting for container log collection), under which an unprepared driver writes
  its Ray C++ INFO lines and event-stats dumps into the job's output.
* ``fedsim run`` with an address where nothing answers exits 2 at once, naming ``runtime.address``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator

import pytest

from fedsim.cli import main
from fedsim.errors import UserError
from fedsim.runtime import cluster
from fedsim.runtime.cluster import Connection, Target, address_problem, plan, probe
from tests.cluster.ray_head import BIN, ROOT, free_port, working_dir

GLOG = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([DIWEF]) \d+ \d+\]")


# --- the decision, without Ray -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, env, initialized, expected",
    [
        ("", {}, False, Target("start")),
        ("", {"RAY_ADDRESS": "10.0.0.5:6379"}, False, Target("join", "10.0.0.5:6379", "RAY_ADDRESS")),
        ("auto", {"RAY_ADDRESS": "10.0.0.5:6379"}, False, Target("join", "10.0.0.5:6379", "RAY_ADDRESS")),
        ("auto", {}, False, Target("join", "auto", "runtime.address")),
        ("10.0.0.7:6379", {"RAY_ADDRESS": "10.0.0.5:6379"}, False, Target("join", "10.0.0.7:6379", "runtime.address")),
        (" ray://head:10001 ", {}, False, Target("join", "ray://head:10001", "runtime.address")),
        ("10.0.0.7:6379", {"RAY_ADDRESS": "10.0.0.5:6379"}, True, Target("attached")),
        ("", {}, True, Target("attached")),
    ],
)
def test_plan_joins_when_an_address_or_ray_address_is_given_and_starts_otherwise(address, env, initialized, expected):
    assert plan(address, env, initialized) == expected


@pytest.mark.parametrize(
    "address, env, key, words",
    [
        ("http://127.0.0.1:8265", {}, "runtime.address", "ray job submit"),
        ("https://head:8265", {}, "runtime.address", "host:6379"),
        ("", {"RAY_ADDRESS": "http://127.0.0.1:8265"}, "RAY_ADDRESS", "unset RAY_ADDRESS"),
        ("auto", {"RAY_ADDRESS": "http://127.0.0.1:8265"}, "RAY_ADDRESS", "ray job"),
        ("head", {}, "runtime.address", "not a cluster address"),
        ("ray://head", {}, "runtime.address", "not a cluster address"),
        ("gcs://head:6379", {}, "runtime.address", "unknown scheme"),
    ],
)
def test_plan_refuses_job_server_and_malformed_addresses_naming_the_key(address, env, key, words):
    with pytest.raises(UserError) as err:
        plan(address, env, False)
    assert str(err.value).startswith(f"{key}") and words in str(err.value)


def test_address_problem_accepts_the_forms_ray_init_joins():
    for ok in ("", "auto", "10.0.0.5:6379", "head.example.org:6379", "[fd00::2]:6379", "ray://10.0.0.5:10001"):
        assert address_problem(ok) is None, ok
    for bad in ("10.0.0.5", "10.0.0.5:0", "10.0.0.5:65536", "10.0.0.5:port", "ray://", "http://h:8265"):
        assert address_problem(bad), bad


def test_validate_reports_an_http_address_as_a_config_problem(capsys):
    assert main(["validate", "tiny", "--set", "runtime.address=http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err
    assert "runtime.address: 'http://127.0.0.1:8265' is an http:// address" in err and "ray job submit" in err


# --- the probe, against small local servers ------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Callable[[bytes | None], int]]:
    """``server(reply)``: a one-thread TCP server on 127.0.0.1 that answers each connection's first bytes with
    ``reply`` (None: never answers); returns its port."""
    socks: list[socket.socket] = []

    def start(reply: bytes | None) -> int:
        sock = socket.create_server(("127.0.0.1", 0))
        socks.append(sock)

        def serve() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                conn.recv(64)
                if reply is not None:
                    conn.sendall(reply)
                socks.append(conn)

        threading.Thread(target=serve, daemon=True).start()
        return sock.getsockname()[1]

    yield start
    for s in socks:
        s.close()


def test_probe_refuses_a_closed_port_at_once():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"^runtime.address: no Ray cluster answers at 127.0.0.1:{port} \("):
        probe(Target("join", f"127.0.0.1:{port}", "runtime.address"), timeout=60)
    assert time.monotonic() - t0 < 30  # refused at once, not after the 60 s timeout (slack for a loaded machine)


def test_probe_tells_the_dashboard_from_a_gcs(server):
    http = server(b"HTTP/1.0 400 Bad Request\r\n\r\n")
    with pytest.raises(UserError, match="an HTTP server answers at .* dashboard / job-server address"):
        probe(Target("join", f"127.0.0.1:{http}", "runtime.address"))
    grpc = server(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00")  # an HTTP/2 SETTINGS frame, as a gRPC server sends
    probe(Target("join", f"127.0.0.1:{grpc}", "runtime.address"))
    probe(Target("join", f"ray://127.0.0.1:{grpc}", "runtime.address"))


def test_probe_gives_up_on_a_silent_server_after_the_timeout(server):
    silent = server(None)
    t0 = time.monotonic()
    with pytest.raises(UserError, match="accepts connections but does not answer as a Ray cluster"):
        probe(Target("join", f"127.0.0.1:{silent}", "RAY_ADDRESS"), timeout=1)
    assert 0.9 <= time.monotonic() - t0 < 30  # waited the timeout, then gave up (slack for a loaded machine)


# --- what connect asks of Ray, with a fake ray module ---------------------------------------------------------------


class FakeRay(types.ModuleType):
    """Records ``init`` and ``shutdown`` calls; ``init`` returns a context with ``dashboard_url``."""

    def __init__(self, dashboard: str = "127.0.0.1:8265") -> None:
        super().__init__("ray")
        self.inits: list[dict] = []
        self.shutdowns = 0
        self.dashboard = dashboard

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(dashboard_url=self.dashboard)

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_connect_joins_without_resources_prints_the_dashboard_and_leaves_the_cluster_up(monkeypatch, capsys):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(cluster, "probe", lambda target, timeout=None: None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("RAY_LOG_TO_STDERR", "1")
    monkeypatch.delenv("RAY_BACKEND_LOG_LEVEL", raising=False)
    seen_level = []

    def init(**kwargs):
        seen_level.append(os.environ.get("RAY_BACKEND_LOG_LEVEL"))
        return FakeRay.init(fake, **kwargs)

    fake.init = init

    conn = cluster.connect("", cpus_needed=64)
    assert conn == Connection(started=False, dashboard_url="http://127.0.0.1:8265", address="10.0.0.5:6379")
    (kwargs,) = fake.inits
    assert kwargs["address"] == "10.0.0.5:6379"
    assert not {"num_cpus", "num_gpus", "include_dashboard", "resources"} & set(kwargs)
    assert seen_level == ["warning"] and "RAY_BACKEND_LOG_LEVEL" not in os.environ  # for ray.init only
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "fedsim: joined the Ray cluster at 10.0.0.5:6379 (from RAY_ADDRESS); dashboard: http://127.0.0.1:8265"
    ]
    cluster.disconnect(conn)
    assert fake.shutdowns == 0


def test_connect_starts_a_private_local_ray_and_disconnect_stops_it(monkeypatch, capsys):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    conn = cluster.connect("", cpus_needed=10_000)
    assert conn == Connection(started=True)
    (kwargs,) = fake.inits
    # "local": a new instance even where a `ray start` cluster left its address file
    assert kwargs["address"] == "local" and kwargs["num_cpus"] == 10_000 and kwargs["include_dashboard"] is False
    assert capsys.readouterr().err == ""
    cluster.disconnect(conn)
    assert fake.shutdowns == 1


def test_connect_turns_a_failed_join_into_a_user_error(monkeypatch):
    fake = FakeRay()

    def refuse(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")

    fake.init = refuse
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(cluster, "probe", lambda target, timeout=None: None)
    with pytest.raises(UserError, match=r"^runtime.address: could not join the Ray cluster at 10.0.0.5:6379"):
        cluster.connect("10.0.0.5:6379")


# --- a real cluster -------------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_a_submitted_run_joins_the_jobs_cluster_and_leaves_it_up(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    gcs, dash, proc = head.gcs, head.dashboard, head.proc
    address = head.address
    out = tmp_path / "run"
    job_id = f"fedsim-join-{os.getpid()}"
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
              "--working-dir", str(working_dir(tmp_path / "wd")), "--",
              "python", "-m", "fedsim", "run", "tiny", "--set", "runtime.backend=ray", "--set", "runtime.workers=2",
              "--set", "federation.rounds=1", "--out", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status} after 300 s:\n{client.get_job_logs(job_id)[-3000:]}"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert (out / "rounds.parquet").is_file() and (out / "summary.json").is_file()

    joined = [line for line in logs.splitlines() if line.startswith("fedsim: joined the Ray cluster at ")]
    assert len(joined) == 1, logs
    assert "(from RAY_ADDRESS)" in joined[0] and f"dashboard: http://127.0.0.1:{dash}" in joined[0]
    assert "round 1/1" in logs
    assert "[state-dump]" not in logs and "Event stats" not in logs, logs[-5000:]
    # under RAY_LOG_TO_STDERR the driver's Ray C++ logger is at warning: only its line saying so is left
    chatter = [line for line in logs.splitlines() if (m := GLOG.search(line)) and m.group(1) in "DI"]
    assert all("RAY_BACKEND_LOG_LEVEL" in line for line in chatter), chatter[:10]

    assert proc.poll() is None  # fedsim did not stop the cluster it joined
    probe(Target("join", f"127.0.0.1:{gcs}", "test"))  # its GCS still answers
    assert any(j.submission_id == job_id for j in client.list_jobs())


@pytest.mark.ray
def test_run_with_an_address_where_nothing_answers_exits_2_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsim", "run", "tiny", "--set", "runtime.backend=ray",
           "--set", "runtime.address=127.0.0.1:1", "--out", str(out)]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: runtime.address: no Ray cluster answers at 127.0.0.1:1 (connection refused)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # before any work: no run folder to block the corrected rerun
    assert elapsed < 60, elapsed  # Ray's own connect loop would take minutes
