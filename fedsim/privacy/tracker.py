"""Driver-side privacy bookkeeping: the run's mechanism and per-client DP settings in, epsilon columns and summary out.

The mechanism (:mod:`fedsim.privacy.mechanism`) is built here once, before round 1 (its calibration is the only
expensive part), and shipped to the workers and the server. The per-client ledgers live in the ClientStore and are
charged by the worker that trains the client; the tracker reads the epsilons the clients report, or, under
client-level DP, asks the mechanism's accountant. Which method/mode combinations work is checked with the config
(each method's declared capabilities), not here.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from fedsim.config.schema import Config
from fedsim.privacy.budget import ClientPrivacy, plan_client_privacy, planned_steps
from fedsim.privacy.mechanism import ClientLevelDP, make_mechanism
from fedsim.types import ClientResult


class PrivacyTracker:
    """Plans DP settings (raises ConfigError before any training) and tracks the epsilon spent."""

    def __init__(self, cfg: Config, client_sizes: Sequence[int]) -> None:
        """Raises ConfigError (naming the key) for a delta above 1/N of the smallest client or an unreachable
        target epsilon."""
        self.cfg = cfg
        self.mode = cfg.privacy.mode
        self.clients: list[ClientPrivacy] = plan_client_privacy(cfg, client_sizes) if self.mode == "sample" else []
        self.mechanism = make_mechanism(cfg)
        self._eps: dict[int, float] = {}  # client id -> cumulative epsilon (sample mode)
        self._round_eps: float | None = None  # client mode: epsilon after the rounds so far
        self.exhausted = 0

    def task_fields(self, client_id: int) -> dict[str, float]:
        """Extra ClientTask fields for one client (its sigma and sampling rate in sample mode)."""
        if self.mode != "sample":
            return {}
        c = self.clients[client_id]
        return {"noise_multiplier": c.noise_multiplier, "sample_rate": c.sample_rate}

    def observe(self, round: int, results: Sequence[ClientResult]) -> dict[str, float | None]:
        """Record a round; returns epsilon_max / epsilon_median over all clients so far (None without DP)."""
        self.exhausted += sum(r.status == "budget_exhausted" for r in results)
        if self.mode == "sample":
            for r in results:
                if r.epsilon is not None:
                    self._eps[r.client_id] = r.epsilon
            vals = list(self._eps.values())
            return {"epsilon_max": max(vals, default=0.0), "epsilon_median": statistics.median(vals) if vals else 0.0}
        if isinstance(self.mechanism, ClientLevelDP):
            self._round_eps = self.mechanism.epsilon(round)
            return {"epsilon_max": self._round_eps, "epsilon_median": self._round_eps}
        return {"epsilon_max": None, "epsilon_median": None}

    def state(self) -> dict[str, Any]:
        """What :meth:`observe` has accumulated (JSON-able), for a checkpoint."""
        return {
            "eps": {str(c): e for c, e in self._eps.items()},
            "round_eps": self._round_eps,
            "exhausted": self.exhausted,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self._eps = {int(c): float(e) for c, e in state.get("eps", {}).items()}
        self._round_eps = state.get("round_eps")
        self.exhausted = int(state.get("exhausted", 0))

    def client_epsilon(self, result: ClientResult) -> float | None:
        return self._round_eps if self.mode == "client" else result.epsilon

    def summary(self) -> dict[str, Any]:
        pr = self.cfg.privacy
        if self.mode == "none":
            return {"privacy_mode": "none", "epsilon": None}
        eps_max = max(self._eps.values(), default=0.0) if self.mode == "sample" else self._round_eps
        out: dict[str, Any] = {
            "privacy_mode": self.mode,
            "epsilon": eps_max,
            "epsilon_target": pr.epsilon,
            "delta": pr.delta,
            "accountant": pr.accountant,
            "budget_respected": pr.epsilon is None or (eps_max or 0.0) <= pr.epsilon + 1e-9,
        }
        if self.mode == "sample":
            sig = [c.noise_multiplier for c in self.clients]
            out.update(
                steps_basis=pr.steps_basis,
                planned_steps_per_client=planned_steps(self.cfg),
                noise_multiplier_min=min(sig),
                noise_multiplier_max=max(sig),
                clip=pr.clip,
                budget_exhausted_client_rounds=self.exhausted,
            )
        else:
            out.update(noise_multiplier=getattr(self.mechanism, "noise_multiplier", None), client_clip=pr.client_clip)
        return out
