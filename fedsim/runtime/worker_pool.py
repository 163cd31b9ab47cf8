"""The Ray backend's pool of worker actors: which are up, which are down (restarting), how items are handed to the
ones that are up, and how a down worker comes back.

A worker whose call fails because its process died (``RayActorError``: a crash, or its node lost) is *down*: it
gets no new item; the pool probes it every :data:`PROBE_INTERVAL_S` seconds with ``ready(reset=True)`` (whatever it
had not flushed is dropped) until Ray has restarted it (up again) or reports it dead for good (dropped). The caller
(:class:`fedsim.runtime.ray_backend.RayBackend`) decides what to re-run; the pool only tracks the workers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from fedsim.errors import RunStopped

#: seconds between probes of a worker that Ray is restarting (a call to a restarting actor fails at once)
PROBE_INTERVAL_S = 0.5


@dataclass
class _Down:
    """A worker that failed a call: ``probe`` is its ``ready(reset=True)`` call in flight, or None until
    ``retry_at`` (monotonic seconds) when the last probe found it still restarting."""

    probe: Any
    retry_at: float = 0.0


class WorkerPool:
    """Worker actors not dead for good (``workers``), each up or down.

    ``shared`` (the :class:`fedsim.runtime.actors.Shared` refs) must be set before the first probe; ``stopped``
    turns a reason into the RunStopped message (how to resume)."""

    def __init__(self, timeout_s: float, stopped: Callable[[str], str]) -> None:
        self.workers: list[Any] = []
        self.shared: Any = None
        self._down: dict[Any, _Down] = {}
        self._timeout_s = timeout_s
        self._stopped = stopped

    # --- membership --------------------------------------------------------------------------------------------

    def add(self, workers: Sequence[Any]) -> None:
        """New workers, up (the caller builds their models before they take items)."""
        self.workers.extend(workers)

    def add_building(self, workers: Sequence[Any]) -> None:
        """New workers that take items only once their model is built (their ``ready`` call is their probe)."""
        self.workers.extend(workers)
        for worker in workers:
            self._down[worker] = _Down(worker.ready.remote(self.shared))

    def is_down(self, worker: Any) -> bool:
        return worker in self._down

    @property
    def up(self) -> list[Any]:
        return [w for w in self.workers if w not in self._down]

    @property
    def any_down(self) -> bool:
        return bool(self._down)

    def mark_down(self, worker: Any) -> None:
        if worker in self.workers:
            self._down[worker] = _Down(worker.ready.remote(self.shared, True))

    def drop(self, worker: Any, why: str = "") -> None:
        """Forget a worker for good (Ray says it is dead, or it cannot build its model)."""
        if worker in self.workers:
            self.workers.remove(worker)
        self._down.pop(worker, None)
        if why:
            print(f"fedsim: a Ray worker was dropped: {why.strip().splitlines()[-1][:300]}", file=sys.stderr)
        try:
            ray.kill(worker, no_restart=True)
        except Exception:
            pass

    # --- probes ------------------------------------------------------------------------------------------------

    def _answer(self, worker: Any, probe: Any) -> bool:
        """Handle the finished probe of a down worker; True when the worker is up again."""
        try:
            ray.get(probe)
        except ray.exceptions.ActorDiedError:  # out of restarts (or killed): dead for good
            self.drop(worker)
            return False
        except ray.exceptions.RayActorError:  # still restarting (its bundle may wait for room): ask again later
            self._down[worker] = _Down(None, time.monotonic() + PROBE_INTERVAL_S)
            return False
        except ray.exceptions.RayError as exc:  # it came up but could not build its model
            self.drop(worker, str(exc))
            return False
        self._down.pop(worker, None)
        return True

    def _probes(self) -> dict[Any, Any]:
        """probe ref -> worker for every down worker, sending the probes that are due."""
        now = time.monotonic()
        for worker, down in self._down.items():
            if down.probe is None and now >= down.retry_at:
                down.probe = worker.ready.remote(self.shared, True)
        return {d.probe: w for w, d in self._down.items() if d.probe is not None}

    def poll(self) -> None:
        """Without waiting: bring back the down workers whose probes have answered."""
        probes = self._probes()
        if probes:
            ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=0)
            for ref in ready:
                self._answer(probes[ref], ref)

    def settle(self, settle_s: float) -> None:
        """Wait up to ``settle_s`` seconds for down (restarting, joining) workers to come back."""
        deadline = time.monotonic() + settle_s
        while self._down and time.monotonic() < deadline:
            time.sleep(PROBE_INTERVAL_S / 2)
            self.poll()

    # --- work --------------------------------------------------------------------------------------------------

    def dispatch(self, items: Sequence[Any], submit: Callable[[Any, Any], Any]) -> list[tuple[Any, Any]]:
        """Hand items to idle workers in the given order; returns (item, result or exception).

        A worker whose call fails because its process died (RayActorError) is down: it gets no new item until a
        probe answers (Ray restarts it, in its bundle); one that is dead for good is dropped. Raises RunStopped
        when no worker answers for the pool's timeout (``runtime.placement_timeout_s``), or none is left."""
        self.poll()
        queue = list(items)
        in_flight: dict[Any, tuple[Any, Any]] = {}
        done: list[tuple[Any, Any]] = []
        idle = self.up
        stalled: float | None = None
        while queue or in_flight:
            while queue and idle:
                worker = idle.pop(0)
                item = queue.pop(0)
                in_flight[submit(worker, item)] = (item, worker)
            probes = self._probes()
            if not in_flight:  # work left and no worker up: wait for one, within the timeout
                if not self.workers:
                    raise RunStopped(self._stopped("every Ray worker actor died and could not be restarted"))
                stalled = stalled or time.monotonic()
                if time.monotonic() - stalled > self._timeout_s:
                    why = f"no Ray worker answered for runtime.placement_timeout_s = {self._timeout_s:g} s"
                    raise RunStopped(self._stopped(why))
            waiting = not in_flight or any(d.probe is None for d in self._down.values())
            ready, _ = ray.wait([*in_flight, *probes], num_returns=1, timeout=PROBE_INTERVAL_S if waiting else None)
            for ref in ready:
                if ref in probes:
                    if self._answer(probes[ref], ref):
                        idle.append(probes[ref])
                        stalled = None
                    continue
                item, worker = in_flight.pop(ref)
                try:
                    res, alive = ray.get(ref), True
                except ray.exceptions.RayActorError as exc:
                    res, alive = exc, False
                except ray.exceptions.RayError as exc:  # the call raised; the worker is fine
                    res, alive = exc, True
                done.append((item, res))
                if alive:
                    idle.append(worker)
                else:
                    self.mark_down(worker)
        return done

    def call_up(self, call: Callable[[Any], Any]) -> list[tuple[Any, Any]]:
        """``call(worker)`` (a Ray call) on every worker that is up, then (worker, result) for those that answer;
        a worker whose process died under the call (or is restarting) is marked down and left out."""
        calls = [(w, call(w)) for w in self.up]
        out = []
        for worker, ref in calls:
            try:
                out.append((worker, ray.get(ref)))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self.mark_down(worker)
        return out
