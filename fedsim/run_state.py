"""The driver's state between rounds, as one small frozen, saveable record (checkpointed as JSON)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsim.types import ClientResult


@dataclass(frozen=True)
class RunState:
    """What the driver carries from one round to the next (besides the server's and the store's state).

    ``round``: the last finished round (0 before round 1). ``trained``: ids of the clients that have finished local
    training at least once (local evaluation covers only those). ``eval``: the last evaluation's metrics.
    ``privacy``: the privacy tracker's JSON state. ``initial_eval``: the untrained model's global evaluation, made
    once before round 1 (``eval_loss``, ``eval_accuracy``, ``eval_perplexity``; empty in older checkpoints)."""

    round: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    best_accuracy: float | None = None
    eval: Mapping[str, float | int | None] = field(default_factory=dict)
    trained: frozenset[int] = frozenset()
    privacy: Mapping[str, Any] = field(default_factory=dict)
    initial_eval: Mapping[str, float | None] = field(default_factory=dict)

    def trained_with(self, results: Sequence[ClientResult]) -> frozenset[int]:
        """The clients that have trained once ``results`` (a round's) are in: those before plus its ``ok`` ones."""
        return self.trained | {r.client_id for r in results if r.status == "ok"}

    def after_round(
        self,
        round: int,
        results: Sequence[ClientResult],
        ev: Mapping[str, float | int | None],
        privacy: Mapping[str, Any],
    ) -> RunState:
        """The state once ``round`` is done: bytes added, clients that trained ok added, the evaluation ``ev``
        (empty = not evaluated this round: the last one stays) and the best accuracy updated."""
        acc = ev.get("eval_accuracy")
        best = self.best_accuracy if acc is None else max(self.best_accuracy or 0.0, float(acc))
        return dataclasses.replace(
            self,
            round=round,
            bytes_up=self.bytes_up + sum(r.bytes_up for r in results),
            bytes_down=self.bytes_down + sum(r.bytes_down for r in results),
            best_accuracy=best,
            eval=dict(ev) if ev else self.eval,
            trained=self.trained_with(results),
            privacy=dict(privacy),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "trained": sorted(self.trained),
            "eval": dict(self.eval),
            "initial_eval": dict(self.initial_eval),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], trained_fallback: Iterable[int] = ()) -> RunState:
        """Read :meth:`to_json`'s dict. Checkpoints written before RunState existed hold ``totals``, ``best_acc``
        and ``last_eval`` and no ``trained`` list: ``trained_fallback`` (the ids the clients table shows trained)
        stands in; ``round`` is then set by the caller."""
        if "totals" in d:  # an older checkpoint's driver dict
            return cls(
                round=int(d.get("round", 0)),
                bytes_up=int(d["totals"]["bytes_up"]),
                bytes_down=int(d["totals"]["bytes_down"]),
                best_accuracy=d.get("best_acc"),
                eval=dict(d.get("last_eval") or {}),
                trained=frozenset(int(c) for c in trained_fallback),
                privacy=dict(d.get("privacy") or {}),
            )
        return cls(
            round=int(d["round"]),
            bytes_up=int(d["bytes_up"]),
            bytes_down=int(d["bytes_down"]),
            best_accuracy=d.get("best_accuracy"),
            eval=dict(d.get("eval") or {}),
            trained=frozenset(int(c) for c in d.get("trained", trained_fallback)),
            privacy=dict(d.get("privacy") or {}),
            initial_eval=dict(d.get("initial_eval") or {}),
        )
