"""The parameter server: owns the global adapter state and the method's server state.

Plain Python; :mod:`fedsim.runtime` runs it in-process or as a Ray actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedsim.config.schema import MethodConfig
from fedsim.methods.base import make_method
from fedsim.model.adapters import state_bytes
from fedsim.types import AdapterState, ClientUpdate, RoundPlan


@dataclass(frozen=True)
class AggregateInfo:
    round: int
    clients: int  # uploads folded into the new global state
    bytes_up: int


class ParameterServer:
    """Receives uploads for a round, aggregates them in client-id order."""

    def __init__(self, method_cfg: MethodConfig, seed: int, initial_state: AdapterState) -> None:
        self.method = make_method(method_cfg, seed)
        self._global = {k: v.detach().clone() for k, v in initial_state.items()}
        self._keys = sorted(self._global)
        self.server_state = self.method.init_server_state(self._global)
        self._plans: dict[int, RoundPlan] = {}
        self._pending: dict[int, ClientUpdate] = {}

    def plan(self, round: int) -> RoundPlan:
        if round not in self._plans:
            self._plans = {round: self.method.plan(round, self._keys, self.server_state)}
        return self._plans[round]

    def global_state(self) -> AdapterState:
        return self._global

    def receive(self, update: ClientUpdate) -> None:
        """Buffer one client's upload; a second upload from the same client in a round is an error."""
        if update.client_id in self._pending:
            raise ValueError(f"client {update.client_id} uploaded twice in one round")
        self._pending[update.client_id] = update

    def aggregate(self, round: int) -> AggregateInfo:
        """Fold the buffered uploads (sorted by client id) into the global state; no uploads = no change."""
        updates: Sequence[ClientUpdate] = [self._pending[c] for c in sorted(self._pending)]
        self._pending = {}
        plan = self.plan(round)
        if updates and plan.uploaded:
            self._global, self.server_state = self.method.aggregate(self._global, updates, plan, self.server_state)
        return AggregateInfo(round=round, clients=len(updates), bytes_up=sum(state_bytes(u.tensors) for u in updates))
