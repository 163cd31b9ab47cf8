"""The backend factory: :func:`start_backend` picks the backend ``runtime.backend`` names. Separate from the protocol's
module (:mod:`fedsim.runtime.backend`), which the backends import: the backends depend on the protocol, the factory on
the backends. Ray is imported only when ``runtime.backend`` is ``ray``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsim.config.schema import Config
from fedsim.privacy.mechanism import PrivacyMechanism
from fedsim.runtime.backend import Backend, BackendStart, RunSetup


@dataclass(frozen=True)
class LocalStart:
    """The in-process backend has nothing to start before its inputs exist."""

    def complete(self, setup: RunSetup) -> Backend:
        from fedsim.runtime.local import LocalBackend

        return LocalBackend(setup)

    def shutdown(self) -> None:
        pass


def start_backend(cfg: Config, privacy: PrivacyMechanism, run_dir: Path | None) -> BackendStart:
    """Begin starting the backend ``runtime.backend`` names with what needs only the config: for ``ray``, Ray itself
    and the worker actors, whose processes import torch / transformers / PEFT while the caller builds the data and
    model (:meth:`fedsim.runtime.ray_backend.RayBackend.begin`); returns once they are created. Call it from the
    main thread (Ray ties the processes it starts to the thread that starts them). Raises UserError when the
    cluster cannot hold the workers. Ray is imported only for ``ray``."""
    if cfg.runtime.backend == "local":
        return LocalStart()
    from fedsim.runtime.ray_backend import RayBackend

    return RayBackend.begin(cfg, privacy, run_dir)
