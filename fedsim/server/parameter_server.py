"""The parameter server: owns the global adapter state and the method's server state.

Plain Python; :mod:`fedsim.runtime` runs it in-process or as a Ray actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsim.config.schema import Config
from fedsim.methods.base import make_method
from fedsim.metrics.similarity import similarity_rows
from fedsim.privacy.client_level import dp_fedavg_aggregate
from fedsim.seeding import torch_generator
from fedsim.types import AdapterState, ClientUpdate, RoundPlan, state_bytes


@dataclass(frozen=True)
class AggregateInfo:
    round: int
    clients: int  # uploads folded into the new global state
    bytes_up: int
    similarity: list[dict[str, Any]] = field(default_factory=list)  # analysis.similarity rows for uploaded factors


class ParameterServer:
    """Receives uploads for a round, aggregates them in client-id order.

    Client-level DP (``privacy.mode: client``): uploads are clipped deltas; the server adds their sum and ONE
    Gaussian noise draw (std ``server_noise_multiplier * privacy.client_clip``, seeded by (seed, round)) divided
    by the expected cohort size to the shared tensors (DP-FedAvg). Only linear methods are allowed there.
    """

    def __init__(self, cfg: Config, initial_state: AdapterState, server_noise_multiplier: float | None = None) -> None:
        self.cfg = cfg
        self.method = make_method(cfg)
        self.server_noise_multiplier = server_noise_multiplier
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

    def export_state(self) -> tuple[AdapterState, dict[str, Any]]:
        """(global state, the method's JSON-able server state): for a checkpoint."""
        return self._global, self.server_state

    def import_state(self, global_state: AdapterState, server_state: dict[str, Any]) -> None:
        """Continue from a checkpoint: replace the global and server state; nothing pending."""
        if sorted(global_state) != self._keys:
            raise ValueError("checkpoint global state has other adapter keys than this run's model")
        self._global = {k: v.detach().clone() for k, v in global_state.items()}
        self.server_state = server_state
        self._plans, self._pending = {}, {}

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
        if self.cfg.privacy.mode == "client" and plan.uploaded:
            self._global = dp_fedavg_aggregate(
                self._global,
                [u.tensors for u in updates],
                plan.uploaded,
                expected_clients=self.cfg.federation.clients_per_round,
                noise_multiplier=float(self.server_noise_multiplier or 0.0),
                clip=self.cfg.privacy.client_clip,
                generator=torch_generator(self.cfg.seed, "server_noise", round),
            )
        elif updates and plan.uploaded:
            self._global, self.server_state = self.method.aggregate(self._global, updates, plan, self.server_state)
        sim = (
            similarity_rows(round, [u.tensors for u in updates], plan.uploaded) if self.cfg.analysis.similarity else []
        )
        return AggregateInfo(
            round=round,
            clients=len(updates),
            bytes_up=sum(state_bytes(u.tensors) + 4 * len(u.signals) for u in updates),
            similarity=sim,
        )
