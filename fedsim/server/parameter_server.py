"""The parameter server: owns the global adapter state and the method's server state.

Plain Python; :mod:`fedsim.runtime` runs it in-process or as a Ray actor.

Streaming aggregation: uploads are folded into a per-round :class:`~fedsim.partial_sum.PartialSum` as they
arrive, either one client at a time (:meth:`ParameterServer.receive`) or as a worker's pre-summed partial
(:meth:`ParameterServer.receive_partial`). For ``linear`` methods that is a float64 running sum (memory: one copy of
the shared tensors, whatever the cohort size; the result does not depend on arrival order beyond float64 rounding);
non-linear methods (FlexLoRA, FedSVD, FedEx-LoRA, FLoRA: an SVD or a product must see every client's factors) keep
the round's uploads and get them in client-id order. ``analysis.similarity`` is streamed too (sums of unit vectors).
The run's privacy mechanism (:mod:`fedsim.privacy.mechanism`) turns the folded uploads into the new global state,
around the method's own aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedsim.config.schema import Config
from fedsim.methods.base import Method, make_method
from fedsim.partial_sum import PartialSum
from fedsim.privacy.mechanism import NoPrivacy, PrivacyMechanism
from fedsim.types import AdapterState, ClientUpdate, RoundPlan


@dataclass(frozen=True)
class AggregateInfo:
    round: int
    clients: int  # uploads folded into the new global state
    bytes_up: int
    similarity: list[dict[str, Any]] = field(default_factory=list)  # analysis.similarity rows (trained factors)
    messages: int = 0  # arrivals folded in: one per client (receive) or one per worker (receive_partial)


def new_partial(cfg: Config, method: Method, round: int) -> PartialSum:
    """An empty :class:`PartialSum` for ``round`` with this run's settings: float64 sums for linear methods
    (buffered uploads otherwise), unit-vector sums when ``analysis.similarity`` is on. Workers and the server must
    build theirs with this so they can merge."""
    return PartialSum(round, similarity=cfg.analysis.similarity, buffer=not method.capabilities.linear)


class ParameterServer:
    """Folds a round's uploads in as they arrive; ``aggregate(round)`` turns them into the new global state.

    ``privacy`` (the run's mechanism; default none) forms the new global state from the folded uploads: the
    method's aggregation, wrapped (client-level DP adds its one noise draw to the sum first).

    A client id may arrive once per round (a second arrival raises ValueError, also when it comes inside another
    worker's partial sum); :meth:`received_ids` tells the runtime whose uploads arrived (crash recovery re-runs
    the others). Uploads for a round that was already aggregated are rejected (ValueError).
    """

    def __init__(self, cfg: Config, initial_state: AdapterState, privacy: PrivacyMechanism | None = None) -> None:
        self.cfg = cfg
        self.method = make_method(cfg)
        self.privacy = privacy if privacy is not None else NoPrivacy()
        self._global = {k: v.detach().clone() for k, v in initial_state.items()}
        self._keys = sorted(self._global)
        self.server_state = self.method.init_server_state(self._global)
        self._plans: dict[int, RoundPlan] = {}
        self._open: dict[int, PartialSum] = {}  # round -> what arrived so far
        self._messages: dict[int, int] = {}  # round -> arrivals so far
        self._last_aggregated: int | None = None

    def plan(self, round: int) -> RoundPlan:
        """The method's plan of ``round``, computed from the server state at the first call for it and kept while
        ``round`` is one of the two newest rounds asked for: a round's evaluation, after its aggregation, reads the
        plan its training used even when the next round's plan was asked for in between (the Ray backend asks
        for it ahead)."""
        plan = self._plans.get(round)
        if plan is None:
            plan = self._plans[round] = self.method.plan(round, self._keys, self.server_state)
            self._plans = {r: self._plans[r] for r in sorted(self._plans)[-2:]}
        return plan

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
        self._plans, self._open, self._messages, self._last_aggregated = {}, {}, {}, None

    def _round(self, round: int) -> PartialSum:
        if self._last_aggregated is not None and round <= self._last_aggregated:
            raise ValueError(f"round {round} was already aggregated; its uploads arrived too late")
        if round not in self._open:
            self._open[round] = new_partial(self.cfg, self.method, round)
        return self._open[round]

    def receive(self, update: ClientUpdate, round: int, kept: AdapterState | None = None) -> None:
        """Fold one client's upload of ``round`` in (a second upload of that client in that round is an error);
        ``kept``: the tensors it keeps, folded into ``analysis.similarity`` only."""
        self._round(round).add(update, kept)
        self._messages[round] = self._messages.get(round, 0) + 1

    def receive_partial(self, partial: PartialSum) -> None:
        """Fold a worker's pre-summed uploads in (built with :func:`new_partial`). Raises ValueError when one of
        its clients already arrived in that round, or when its settings differ from the server's."""
        self._round(partial.round).merge(partial)
        self._messages[partial.round] = self._messages.get(partial.round, 0) + 1

    def received_ids(self, round: int) -> list[int]:
        """Sorted ids of the clients whose uploads for ``round`` arrived (and are not yet aggregated)."""
        return sorted(self._open[round].client_ids) if round in self._open else []

    def aggregate(self, round: int) -> AggregateInfo:
        """Turn what arrived for ``round`` into the new global state through the privacy mechanism; no uploads =
        no change (except client-level DP, whose noise is added every round)."""
        sums = self._open.pop(round, None) or new_partial(self.cfg, self.method, round)
        self._open = {r: p for r, p in self._open.items() if r > round}
        messages = self._messages.pop(round, 0)
        self._messages = {r: n for r, n in self._messages.items() if r > round}
        self._last_aggregated = round
        plan = self.plan(round)
        self._global, self.server_state = self.privacy.aggregate(
            self.method, self._global, sums, plan, self.server_state
        )
        return AggregateInfo(
            round=round,
            clients=len(sums),
            bytes_up=sums.bytes_up,
            similarity=sums.similarity_rows(plan.trained),
            messages=messages,
        )
