"""The parameter server and the client store in ONE Ray actor process, pinned to the driver's node.

They used to be two actors. Each actor is a process that starts a Python interpreter and imports torch (about
3 s of CPU here) before its first call; on a small job that start sat on the way to round 1, behind the workers'
own starts competing for the same cores. Both do little work per call (a fold of a worker's partial sum, a
client's kept tensors and ledger), never call each other, and sit on the driver's node, so one process serves
both: the driver and the workers keep two handles (``server`` and ``store``) that are the same actor.

:class:`ServerHome` holds a :class:`~fedsim.server.parameter_server.ParameterServer` and a
:class:`~fedsim.server.client_store.ClientStore` (plain objects, tested without Ray) and exposes every public
method of both under its own name (their names are disjoint: checked at import). Calls run one at a time, in the
order each caller sent them, as they did on either actor alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedsim.config.schema import Config
from fedsim.privacy.mechanism import PrivacyMechanism
from fedsim.server.client_store import ClientStore
from fedsim.server.parameter_server import ParameterServer
from fedsim.types import AdapterState


def public_methods(cls: type) -> set[str]:
    """Names of the public functions ``cls`` defines (properties and dunders excluded)."""
    return {name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}


SERVER_METHODS = frozenset(public_methods(ParameterServer))
STORE_METHODS = frozenset(public_methods(ClientStore))
if SERVER_METHODS & STORE_METHODS:  # pragma: no cover - a rename in either class would make calls ambiguous
    raise RuntimeError(f"ParameterServer and ClientStore share method names: {sorted(SERVER_METHODS & STORE_METHODS)}")


class ServerHome:
    """A parameter server and a client store behind one object (see the module doc).

    ``store_args``: ``(memory_mb, spill_dir)`` for the store (``RunSetup.client_store_args()``); the rest are the
    server's arguments."""

    def __init__(
        self,
        store_args: tuple[float | None, Any],
        cfg: Config,
        initial_state: AdapterState,
        privacy: PrivacyMechanism | None = None,
    ) -> None:
        self.store = ClientStore(*store_args)
        self.server = ParameterServer(cfg, initial_state, privacy)


def _forward(owner: str, name: str) -> Callable[..., Any]:
    def call(self: ServerHome, *args: Any, **kwargs: Any) -> Any:
        return getattr(getattr(self, owner), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = getattr(ParameterServer if owner == "server" else ClientStore, name).__doc__
    return call


for _name in sorted(SERVER_METHODS):
    setattr(ServerHome, _name, _forward("server", _name))
for _name in sorted(STORE_METHODS):
    setattr(ServerHome, _name, _forward("store", _name))
