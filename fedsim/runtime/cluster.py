"""Start a local Ray or join a cluster: the one place that decides (the simulation backend and the sweep pool).

The decision (:func:`plan`, first match wins):

1. Ray is already initialised in this process (a test's fixture, a notebook, a sweep cell running as a Ray task):
   use it. Nothing is started, nothing is printed, nothing is shut down afterwards.
2. ``runtime.address`` is set: join that cluster. ``auto`` = the cluster Ray finds (``RAY_ADDRESS``, else the
   newest ``ray start`` on this machine); ``host:port`` = the head's GCS (``ray start --head --port``, default
   6379); ``ray://host:port`` = the head's Ray Client server (default 10001).
3. ``RAY_ADDRESS`` is set in the environment (``ray job submit`` sets it for the job's driver): join it.
4. Otherwise start a private local Ray (every CPU of this machine, or what the run needs if more; no dashboard),
   even if a ``ray start`` cluster runs on this machine (``runtime.address: auto`` joins that one).

Joining never passes resources or dashboard settings to ``ray.init`` and never shuts the cluster down
(:func:`disconnect` stops only a Ray that :func:`connect` started); it prints one line to stderr naming the
cluster and its dashboard URL. ``http(s)://`` addresses are the dashboard / job-server address that
``ray job submit --address`` takes, not something a driver can join: they are refused with a
:class:`~fedsim.errors.UserError` naming the key, as is an address where no Ray cluster answers. Before
``ray.init`` is called the address is probed (TCP connect, then one HTTP/2 preface to tell a gRPC server from an
HTTP one), so a wrong address fails within :data:`CONNECT_TIMEOUT_S` seconds instead of Ray's own retry loop
(measured with Ray 2.60 on ``127.0.0.1:1``: still retrying after 5 minutes).

Output: Ray's driver logger is set to WARNING; worker output is forwarded to the driver as Ray does by default
(fedsim's workers print nothing themselves; what comes through is a worker's Python warnings and tracebacks,
``raylet.err`` / ``gcs_server.err`` (crashes) and autoscaler events; ``RAY_LOG_TO_DRIVER=0`` turns it off).
Raylet ``[state-dump]`` lines go to ``raylet.out``, which is never forwarded. When the cluster logs to stderr
(``RAY_LOG_TO_STDERR=1``, usual in containers) the driver's own Ray C++ logger would write its INFO lines and
periodic event-stats dumps into the job's output: a joining driver sets ``RAY_BACKEND_LOG_LEVEL=warning`` for
itself (unless set), which leaves one INFO line saying so.

Fixed or autoscaling (:func:`cluster_kind`): every head runs Ray's autoscaler monitor, which writes the status
that ``ray status`` prints into the GCS key-value store. Without an autoscaling config (``ray start --head``
alone, ``ray.cluster_utils.Cluster``, KubeRay without autoscaling) the monitor's node provider is Ray's read-only
one, which names every node's type ``node_<node id>``; an autoscaler's provider names the types of its config
(``ray.head.default``, ``gpu-workers``). So: every type of the anonymous form = a fixed-size cluster (the Ray
backend then refuses, at once, a ``runtime.workers`` it can never hold); named types = autoscaling; no status
(not written yet, autoscaler v2, Ray Client) = unknown, and the backend waits ``runtime.placement_timeout_s``
for its placement group instead. (Ray's own ``get_cluster_config`` holds node-type max counts only where an
external autoscaler reports them; OSS Ray 2.60 leaves it empty.)

This module imports Ray only inside functions: :func:`address_problem` (used by the config checks) works
without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

from fedsim.errors import UserError
from fedsim.runtime.placement import capacity_problem, worker_bundle, zero_capacity_problem
from fedsim.runtime.ray_compat import autoscaler_status, available_resources_per_node, resolve_auto_address

if TYPE_CHECKING:
    from fedsim.config.schema import RuntimeConfig

KEY = "runtime.address"
ENV = "RAY_ADDRESS"
#: seconds to wait for a TCP connection to (and the first reply from) a cluster address before giving up
CONNECT_TIMEOUT_S = 5.0
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # a gRPC server answers it with an HTTP/2 frame
_HTTP_HINT = (
    "that is the dashboard / job-server address, which `ray job submit --address` takes; a driver joins the "
    "cluster's GCS instead: leave runtime.address empty when the run is submitted with `ray job submit` (the job "
    "gets RAY_ADDRESS), or give the head's GCS address host:6379 (`ray start --head --port`) or "
    "ray://host:10001 (Ray Client)"
)


@dataclass(frozen=True)
class Target:
    """What :func:`connect` will do.

    ``action``: ``attached`` (Ray is already initialised here), ``join`` or ``start``; ``address``: what goes to
    ``ray.init`` (``auto``, ``host:port``, ``ray://host:port``; empty unless joining); ``source``: where the
    address came from (``runtime.address`` or ``RAY_ADDRESS``; empty unless joining), named in error messages."""

    action: Literal["attached", "join", "start"]
    address: str = ""
    source: str = ""


@dataclass(frozen=True)
class Connection:
    """The outcome of :func:`connect`: ``started`` is True only when this process started a local Ray (then
    :func:`disconnect` shuts it down); ``dashboard_url`` is the joined cluster's dashboard (``http://...``), None
    when this call joined nothing or the cluster has no dashboard; ``address`` is the joined address."""

    started: bool
    dashboard_url: str | None = None
    address: str = ""


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` (IPv6 as ``[::1]:6379``) -> (host, port); None if it is not of that form."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        return None
    return host, int(port)


def address_problem(address: str, key: str = KEY) -> str | None:
    """The problem with ``address`` as a cluster address (one line naming ``key``), or None if it is empty,
    ``auto``, ``host:port`` or ``ray://host:port``. Checks the form only (no network, no Ray import)."""
    if not address or address == "auto":
        return None
    scheme, sep, rest = address.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        return f"{key}: {address!r} is an {scheme.lower()}:// address; {_HTTP_HINT}"
    if sep and scheme != "ray":
        return f"{key}: unknown scheme {scheme + '://'!r} in {address!r}; use auto, host:port or ray://host:port"
    if _host_port(rest if sep else address) is None:
        return (
            f"{key}: {address!r} is not a cluster address; use auto, host:port (the head's GCS, e.g. "
            "10.0.0.5:6379) or ray://host:port (Ray Client, e.g. ray://10.0.0.5:10001), or leave it empty to "
            "start a local Ray"
        )
    return None


def plan(address: str, environ: Mapping[str, str], initialized: bool) -> Target:
    """Decide between using the Ray of this process, joining a cluster and starting a local Ray (the order in the
    module docstring). Pure: reads only its arguments. Raises UserError when ``address`` (or ``RAY_ADDRESS``,
    when it decides) is not a usable cluster address."""
    if initialized:
        return Target("attached")
    address, env = address.strip(), environ.get(ENV, "").strip()
    if address and not (address == "auto" and env):
        problem = address_problem(address)
        if problem:
            raise UserError(problem)
        return Target("join", address, KEY)
    if env:  # runtime.address empty or auto: the cluster RAY_ADDRESS names (as ray.init reads it)
        problem = address_problem(env, f"{ENV} (environment)")
        if problem and "://" in env and env.split("://")[0].lower() in ("http", "https"):
            problem = (
                f"{ENV} (environment): {env!r} is a job-server address, meant for the `ray job` commands; a driver "
                "joins the cluster's GCS: unset RAY_ADDRESS to run locally, submit the run with `ray job submit` "
                "(the job's RAY_ADDRESS is then the GCS address), or set runtime.address to host:6379"
            )
        if problem:
            raise UserError(problem)
        return Target("join", env, ENV)
    return Target("start")


def _resolve(target: Target) -> tuple[str, int] | None:
    """(host, port) that ``target`` will connect to; ``auto`` is resolved as ``ray.init`` resolves it (None if
    this Ray has no such helper: then ``ray.init`` alone decides)."""
    address = target.address
    if address == "auto":
        try:  # Ray's own resolution: RAY_ADDRESS, then the newest `ray start`, then a running GCS process
            resolved = resolve_auto_address()
        except ConnectionError as exc:
            raise UserError(
                f"{target.source}: auto finds no running Ray cluster on this machine; start one with "
                "`ray start --head`, give the head's address (host:6379), or leave runtime.address empty to start "
                "a local Ray"
            ) from exc
        if resolved is None:
            return None
        address = resolved
    found = _host_port(address.split("://", 1)[-1])
    if found is None:
        raise UserError(f"{target.source}: {address!r} is not a cluster address")
    return found


def probe(target: Target, timeout: float | None = None) -> None:
    """Check that a Ray cluster can answer at ``target`` (a ``join`` target) before ``ray.init`` is called.

    Opens a TCP connection within ``timeout`` seconds (default :data:`CONNECT_TIMEOUT_S`) and sends one HTTP/2
    preface, to which a gRPC server (Ray's GCS, its Ray Client server) answers with an HTTP/2 frame at once.
    Raises UserError naming ``target.source`` when the connection fails or times out, when the server stays
    silent for ``timeout`` seconds, or when it answers as an HTTP/1 server (the dashboard, most likely). Any other
    reply, or a closed connection, passes, and ``ray.init`` takes over."""
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    found = _resolve(target)
    if found is None:
        return
    host, port = found
    fix = (
        "check the head's address and port (`ray start --head --port`, default 6379; Ray Client 10001) and that "
        "this machine can reach it, or leave runtime.address empty to start a local Ray"
    )
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            try:
                sock.sendall(_H2_PREFACE)
                reply: bytes | None = sock.recv(8)
            except TimeoutError:
                reply = None  # accepted, but silent
            except OSError:
                reply = b""  # closed on us: not enough to judge, ray.init decides
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
        if isinstance(exc, TimeoutError):
            why = f"no answer within {timeout:g} s"
        raise UserError(f"{target.source}: no Ray cluster answers at {host}:{port} ({why}); {fix}") from exc
    if reply is None:
        raise UserError(
            f"{target.source}: something at {host}:{port} accepts connections but does not answer as a Ray cluster "
            f"(no reply within {timeout:g} s); {fix}"
        )
    if reply.startswith(b"HTTP/"):
        raise UserError(f"{target.source}: an HTTP server answers at {host}:{port}, not a Ray cluster; {_HTTP_HINT}")


def check(address: str, runtime: Any = None) -> Target:
    """The preflight of a run on the Ray backend, before any data is read or file written: :func:`plan` with this
    process's environment, then :func:`probe` when it joins. With ``runtime`` (the run's ``RuntimeConfig``), a run
    that joins a cluster (or finds Ray initialised) also connects now and is refused when the cluster is fixed-size
    and can never hold ``runtime.workers`` (:func:`refuse_if_never_fits`; the backend
    checks again). Raises UserError (see those)."""
    import ray

    target = plan(address, os.environ, ray.is_initialized())
    if target.action == "join":
        probe(target)
    zero = getattr(runtime, "zero", None)
    if zero is not None and zero.stage > 0 and target.action == "start" and runtime.gpus_per_worker == 0:
        # the local Ray the run will start: this machine's CPUs (or what runtime.workers needs, if more)
        cpus = max(os.cpu_count() or 1, math.ceil(int(runtime.workers) * runtime.cpus_per_worker))
        bundle = worker_bundle(runtime.cpus_per_worker, 0.0, runtime.accelerator_type)
        problem = zero_capacity_problem(runtime, [{"CPU": float(cpus)}], bundle)
        if problem:
            raise UserError(problem)
    if runtime is not None and target.action != "start":
        connect(address)
        refuse_if_never_fits(runtime)
    return target


@contextmanager
def _driver_log_level() -> Iterator[None]:
    """While joining: the driver's Ray C++ logger at warning when Ray logs to stderr (see the module docstring),
    unless RAY_BACKEND_LOG_LEVEL is set; the environment is restored afterwards (the level is read at init)."""
    lower = os.environ.get("RAY_LOG_TO_STDERR") == "1" and "RAY_BACKEND_LOG_LEVEL" not in os.environ
    if lower:
        os.environ["RAY_BACKEND_LOG_LEVEL"] = "warning"
    try:
        yield
    finally:
        if lower:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


def _dashboard_url(context: Any) -> str | None:
    url = getattr(context, "dashboard_url", None) or None
    if url and "://" not in url:
        url = "http://" + url
    return url


def connect(address: str, cpus_needed: float = 0.0, *, err: TextIO | None = None) -> Connection:
    """Start a local Ray or join a cluster, as :func:`plan` decides (``address`` is ``runtime.address``).

    ``cpus_needed``: a started local Ray gets max(this machine's CPUs, ceil(cpus_needed)) CPUs (ignored when
    joining). A join prints one line to ``err`` (default stderr): the cluster's address and dashboard URL.
    Raises UserError, naming ``runtime.address`` or ``RAY_ADDRESS``, for an address that is malformed, an
    http(s):// address, or one where no Ray cluster answers or ``ray.init`` cannot connect."""
    import ray

    target = plan(address, os.environ, ray.is_initialized())
    if target.action == "attached":
        return Connection(started=False)
    if target.action == "start":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
        # address="local": a new instance even when `ray start` left a cluster address file on this machine
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
        return Connection(started=True)
    probe(target)
    try:
        with _driver_log_level():
            context = ray.init(address=target.address, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"{target.source}: could not join the Ray cluster at {target.address} ({type(exc).__name__}: {exc}); "
            "check the address, and that this machine runs the same Ray and Python versions as the cluster"
        ) from exc
    url = _dashboard_url(context)
    print(
        f"fedsim: joined the Ray cluster at {target.address} (from {target.source}); "
        f"dashboard: {url or 'none (the cluster runs without one)'}",
        file=err or sys.stderr,
        flush=True,
    )
    return Connection(started=False, dashboard_url=url, address=target.address)


def disconnect(connection: Connection) -> None:
    """Shut down the local Ray that :func:`connect` started; a joined (or already running) cluster is left
    alone."""
    if connection.started:
        import ray

        ray.shutdown()


ClusterKind = Literal["fixed", "autoscaling", "unknown"]
#: the node type Ray's read-only node provider gives every node of a cluster without an autoscaler
_READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]{56}$")
#: seconds to wait for the autoscaler monitor's first status (it writes one every 5 s, Ray's update interval)
STATUS_WAIT_S = 12.0


def kind_from_status(status: Mapping[str, Any] | None) -> ClusterKind:
    """Fixed or autoscaling, from the autoscaler monitor's status (see the module docstring). Pure."""
    report = (status or {}).get("autoscaler_report") or {}
    types = set((report.get("node_type_mapping") or {}).values()) | set(report.get("active_nodes") or {})
    if not types:
        return "unknown"
    return "fixed" if all(_READONLY_NODE_TYPE.match(str(t)) for t in types) else "autoscaling"


def cluster_kind(wait_s: float = STATUS_WAIT_S) -> ClusterKind:
    """Whether the cluster this process is connected to is fixed-size, autoscaling, or unknown (no readable
    autoscaler status). A head's monitor writes its first status a few seconds after the head starts, so a missing
    status is waited for up to ``wait_s`` seconds. Needs Ray initialised; never raises."""
    try:
        deadline = time.monotonic() + wait_s
        raw = autoscaler_status()
        while not raw and time.monotonic() < deadline:
            time.sleep(0.5)
            raw = autoscaler_status()
        return kind_from_status(json.loads(raw)) if raw else "unknown"
    except Exception:  # an older / newer Ray, Ray Client, a status in another shape: do not guess
        return "unknown"


def node_resources(free: bool) -> list[dict[str, float]]:
    """The resources of each live node: their totals, or (``free``) what is unreserved now. Needs Ray initialised."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if not free:
        return [dict(n.get("Resources") or {}) for n in alive]
    per_node = available_resources_per_node()
    return [dict(per_node.get(n["NodeID"], {})) for n in alive]


def refuse_if_never_fits(rt: RuntimeConfig, started: bool = False) -> ClusterKind:
    """The kind of the cluster this process is connected to (``started``: a Ray this run started, sized for it:
    fixed); raises UserError naming ``runtime.workers`` and the per-worker keys when it is fixed-size and can never
    hold the workers (:func:`fedsim.runtime.placement.capacity_problem`)."""
    kind: ClusterKind = "fixed" if started else cluster_kind()
    if kind == "fixed":
        gpus = 0.0 if rt.gpus_per_worker == "auto" else rt.gpus_per_worker  # auto: at most one GPU, maybe none
        bundle = worker_bundle(rt.cpus_per_worker, gpus, rt.accelerator_type)
        problem = capacity_problem(rt.workers, node_resources(free=False), bundle)
        if problem:
            raise UserError(problem)
    return kind
