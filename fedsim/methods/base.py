"""The method interface and registry (ARCHITECTURE.md §3).

A method is pure torch over :data:`fedsim.types.AdapterState`: it decides each tensor's
:class:`~fedsim.types.Role` per round (``plan``), what a client trains from (``client_start``)
and how uploads become the new global state (``aggregate``). No model, no Ray.
"""

from __future__ import annotations

import difflib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from fedsim.config.schema import Config
from fedsim.errors import ConfigError
from fedsim.methods.partial_sum import PartialSum
from fedsim.model.keys import factor_of
from fedsim.types import AdapterState, ClientUpdate, Role, RoundPlan, SignalContext

ServerState = dict[str, Any]

_REGISTRY: dict[str, type[Method]] = {}
_METHOD_MODULES = (
    "fedavg_lora",
    "ffa_lora",
    "fedsa_lora",
    "as_lora",
    "rolora",
    "flexlora",
    "fedsvd",
    "fedex_lora",
    "flora",
)


class Method(ABC):
    """Base class. Subclasses set ``name`` (via :func:`register_method`) and implement ``role``."""

    name: ClassVar[str] = ""
    #: aggregation is a weighted mean of the SHARED uploads (plus weighted means of scalar signals), so the runtime
    #: streams it: workers pre-sum their clients' uploads into a :class:`PartialSum`, the server merges those and
    #: calls :meth:`aggregate_sums`. ``linear = False`` methods get the buffered uploads in ``aggregate``.
    linear: ClassVar[bool] = True
    #: clients keep state between rounds, so personalised evaluation is meaningful
    personal: ClassVar[bool] = False
    #: clients upload scalar signals besides tensors (must come from privatised gradients: sample-level DP only)
    uses_signals: ClassVar[bool] = False
    #: the global state carries "<layer>.base_residual" tensors that every worker folds into its frozen base
    folds_into_base: ClassVar[bool] = False

    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.cfg = cfg.method  # this method's settings (method.*)
        self.seed = cfg.seed
        self.rounds = cfg.federation.rounds

    def init_server_state(self, global_state: AdapterState) -> ServerState:
        """Server-side state beyond the global adapter (scores, schedules). Default: none."""
        return {}

    @abstractmethod
    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        """The role of one adapter tensor in ``round`` (1-based)."""

    def plan(self, round: int, keys: Sequence[str], server_state: ServerState) -> RoundPlan:
        return RoundPlan(round=round, roles={k: self.role(round, k, server_state) for k in keys})

    def client_start(
        self, global_state: AdapterState, kept_state: AdapterState | None, plan: RoundPlan
    ) -> AdapterState:
        """What a client trains from: the global state, with its own kept tensors where it has them."""
        start = dict(global_state)
        if kept_state:
            for key in plan.kept:
                if key in kept_state:
                    start[key] = kept_state[key]
        return start

    def broadcast_keys(self, plan: RoundPlan) -> list[str]:
        """Global tensors the server sends to each client of a round (counted in bytes_down).

        Default: the shared tensors (what aggregation changes). A method that also re-sets a client-frozen
        tensor at the server (FedSVD's A) adds it here."""
        return plan.uploaded

    def client_signal(self, plan: RoundPlan, grads: AdapterState, context: SignalContext) -> dict[str, float]:
        """Scalars a client uploads besides its tensors, computed ONLY from its last privatised gradients
        (``grads``: the trained tensors' gradients of the last local step, after DP-SGD noise when DP is on).
        Default: none."""
        return {}

    def needs_raw_loss(self, round: int) -> bool:
        """Whether ``client_signal`` in ``round`` needs ``context.raw_loss`` (raw-data losses, OUTSIDE the DP
        guarantee). Default: never. A method returning True must list the caveat in :meth:`privacy_caveats`."""
        return False

    @classmethod
    def privacy_caveats(cls, cfg: Config) -> list[str]:
        """Ways in which ``cfg`` makes uploads depend on more than DP-SGD output (printed as warnings at the start
        of a run and recorded in summary.json). Default: none."""
        return []

    def aggregate(
        self,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """The new global and server state from the round's uploads (in client-id order).

        Linear methods do not override this: it folds ``updates`` into a :class:`PartialSum` and calls
        :meth:`aggregate_sums`, so the buffered and the streamed path share one definition of the maths.
        ``linear = False`` methods override it. Raises ValueError for an empty cohort.
        """
        return self.aggregate_sums(global_state, PartialSum.of(plan.round, updates), plan, server_state)

    def aggregate_sums(
        self,
        global_state: AdapterState,
        sums: PartialSum,
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """For ``linear`` methods: the new global state from the round's folded uploads (float64
        ``sum_k w_k x_k``, ``sum_k w_k``, weighted signal sums). Default: weighted mean of every SHARED tensor;
        FROZEN and KEPT tensors unchanged. Raises ValueError for an empty cohort.
        """
        return sums.mean_of_keys(global_state, plan.uploaded), server_state


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("ffa_lora")``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        if cls.linear and cls.aggregate is not Method.aggregate:
            raise TypeError(
                f"method {name!r} is linear and overrides aggregate: override aggregate_sums instead (aggregate "
                "derives from it; the runtime streams linear methods), or declare linear = False"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _ensure_loaded() -> None:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"fedsim.methods.{mod}")


def available_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The registered class for ``name``; ConfigError (naming method.name and the known names) otherwise."""
    _ensure_loaded()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError([f"method.name: unknown method {name!r}; known methods: {', '.join(known)}.{hint}"])
    return _REGISTRY[name]


def make_method(cfg: Config) -> Method:
    """An instance of the method named by ``cfg.method.name`` (ConfigError if unknown)."""
    return get_method(cfg.method.name)(cfg)


def is_head(key: str) -> bool:
    return factor_of(key) == "head"
