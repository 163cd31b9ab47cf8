"""The backend protocol the driver talks to (the factory is :mod:`fedsim.runtime.start`). No Ray import."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedsim.config.schema import Config
from fedsim.data.federated import FederatedData
from fedsim.model.build import BaseBlueprint
from fedsim.privacy.mechanism import NoPrivacy, PrivacyMechanism
from fedsim.server.checkpoint import Checkpoint
from fedsim.server.client_store import client_store_args
from fedsim.server.parameter_server import AggregateInfo
from fedsim.types import AdapterState, ClientResult, ClientTask, EvalResult, EvalTask, RoundPlan


@dataclass(frozen=True)
class RunSetup:
    """Everything a backend needs to start workers and the server."""

    cfg: Config
    blueprint: BaseBlueprint
    data: FederatedData
    initial_state: AdapterState
    privacy: PrivacyMechanism = NoPrivacy()  # the run's privacy mechanism (workers and server get it)
    run_dir: Path | None = None  # the run's output folder (the ClientStore spills under it); None = a temp folder

    def client_store_args(self) -> tuple[float, Path | None]:
        """(memory_mb, spill_dir): ``ClientStore(*setup.client_store_args())`` / ``ClientStoreActor.remote(*...)``."""
        return client_store_args(self.cfg, self.run_dir)


class Backend(Protocol):
    """Runs clients and the parameter server; the driver (simulation.py) only calls these."""

    def plan(self, round: int) -> RoundPlan: ...

    def train(self, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        """Train every task's client; uploads reach the server, kept state the ClientStore.

        Returns one result per task, sorted by client id (failed clients have status "failed")."""
        ...

    def aggregate(self, round: int) -> AggregateInfo: ...

    def evaluate(self, tasks: Sequence[EvalTask], round: int) -> list[EvalResult]:
        """Evaluate the global state (task.client_id None) or a client's personalised state."""
        ...

    def global_state(self) -> AdapterState: ...

    def kept_client_ids(self) -> list[int]: ...

    def kept_state(self, client_id: int) -> AdapterState | None: ...

    def checkpoint_state(self) -> Checkpoint:
        """Global, server and client-store state (round and driver fields left for the driver to fill)."""
        ...

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``: server and client store get its state."""
        ...

    def describe(self) -> str: ...

    @property
    def worker_count(self) -> int:
        """How many workers can take clients now (for ``worker_busy_frac``)."""
        ...

    def shutdown(self) -> None: ...


class BackendStart(Protocol):
    """A backend half-started from the config alone (:func:`fedsim.runtime.start.start_backend`); the driver builds
    the data and model meanwhile, then calls :meth:`complete` once (or :meth:`shutdown` when the inputs turned out
    bad)."""

    def complete(self, setup: RunSetup) -> Backend:
        """The running backend, finished with ``setup`` (same config, privacy mechanism and run folder as given to
        :func:`fedsim.runtime.start.start_backend`). Raises UserError as the backend's start does, after releasing
        what it started."""
        ...

    def shutdown(self) -> None:
        """Release whatever was started (a local Ray this process started is stopped)."""
        ...
