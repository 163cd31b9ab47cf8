"""Privacy mechanisms that compose with any method (pfl-research's postprocessor idea).

A mechanism is a small frozen object built once by the driver (its noise calibrated there) and handed to every
worker and to the parameter server. It has two sides behind one interface, so neither the worker, the server nor
the method knows which privacy mode a run uses:

* client side (the worker asks it around one client's local training): whether the client may still train
  (:meth:`PrivacyMechanism.exhausted`), the noise multiplier DP-SGD runs with (:meth:`dpsgd_noise`), the
  DP-noise level a method's signals must discount (:meth:`signal_noise_std`), what the client uploads
  (:meth:`upload`) and what its ledger is charged (:meth:`charge`);
* server side: how a round's folded uploads become the new global state (:meth:`aggregate`), wrapping the
  method's own :meth:`~fedsim.methods.base.Method.aggregate_sums` (or ``aggregate`` for non-linear methods).

Mechanisms:

* :class:`NoPrivacy` (``privacy.mode: none``): uploads as trained, the method's aggregation as it is.
* :class:`SampleLevelDP` (``sample``): each client runs Opacus DP-SGD with its own calibrated noise multiplier
  (carried by its :class:`~fedsim.types.ClientTask`) and its own ledger (a
  :class:`~fedsim.privacy.accounting.PrivacyLedger` in the ClientStore), charged for the steps it really took; a
  client whose next participation would pass ``privacy.epsilon`` does not train. Aggregation is the method's.
* :class:`ClientLevelDP` (``client``, DP-FedAvg, McMahan et al. 2018): the client uploads its delta (trained minus
  start) clipped jointly to ``privacy.client_clip`` with weight 1 (the ONE clip); the server adds ONE Gaussian
  draw N(0, (sigma * clip)^2) per coordinate, seeded by (seed, round), to the sum of the clipped deltas and divides
  by the FIXED expected cohort size m, then hands that privatised mean to the method's ``aggregate_sums`` (the
  ONE noise draw); its epsilon after t rounds comes from :meth:`ClientLevelDP.epsilon` (the ONE accountant).
  Sensitivity: adding or removing a client changes the clipped sum by at most ``clip``; dividing by the
  constant m is post-processing. The denominator never depends on the data (failed or silent clients do not
  change it), and the mechanism runs every round, uploads or not. Only methods whose aggregation is a weighted
  mean and that upload no signals support it (their ``capabilities``; checked when the config is checked).
  Accounting: ``rounds`` compositions of the subsampled Gaussian at rate clients_per_round / clients; a fixed-size
  cohort is accounted as Poisson sampling at that rate, as is usual for DP-FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from fedsim.partial_sum import PartialSum
from fedsim.privacy.accounting import PrivacyLedger, would_exceed
from fedsim.privacy.client_level import (
    client_level_epsilon,
    client_level_noise_multiplier,
    clip_update,
    gaussian_noise,
)
from fedsim.seeding import torch_generator
from fedsim.types import AdapterState, ClientTask, ClientUpdate, RoundPlan, ServerState

if TYPE_CHECKING:
    from fedsim.config.schema import Config

#: the (seed, purpose, round) stream of the server's DP-FedAvg noise
SERVER_NOISE = "server_noise"


class DeclaresLinearity(Protocol):
    """The part of a method's capabilities a mechanism reads: whether its aggregation is a weighted sum."""

    @property
    def linear(self) -> bool: ...


class Aggregator(Protocol):
    """What a mechanism needs of a method to aggregate (:class:`fedsim.methods.base.Method` satisfies it; privacy
    sits below methods in the layers, so it names the interface, not the class)."""

    @property
    def capabilities(self) -> DeclaresLinearity: ...

    def aggregate(
        self, global_state: AdapterState, updates: Sequence[ClientUpdate], plan: RoundPlan, server_state: ServerState
    ) -> tuple[AdapterState, ServerState]: ...

    def aggregate_sums(
        self, global_state: AdapterState, sums: PartialSum, plan: RoundPlan, server_state: ServerState
    ) -> tuple[AdapterState, ServerState]: ...


@dataclass(frozen=True)
class NoPrivacy:
    """``privacy.mode: none``; also the base of the other mechanisms (their shared defaults)."""

    mode = "none"

    # ------------------------------------------------------------------ client side
    def open_ledger(self, ledger_json: dict | None) -> PrivacyLedger | None:
        """The client's ledger (None when this mechanism keeps none)."""
        return None

    def exhausted(self, task: ClientTask, ledger: PrivacyLedger | None) -> bool:
        """Whether the client must not train this round (its budget would be passed)."""
        return False

    def dpsgd_noise(self, task: ClientTask) -> float | None:
        """The noise multiplier the client's DP-SGD runs with; None = no DP-SGD."""
        return None

    def signal_noise_std(self, task: ClientTask, batch: float) -> float:
        """Per-coordinate std of the DP noise in the client's averaged gradient (0 without DP-SGD)."""
        return 0.0

    def upload(self, start: AdapterState, trained: AdapterState, weight: float) -> tuple[AdapterState, float]:
        """What the client sends for its uploaded tensors ``trained`` (started from ``start``), and its weight."""
        return trained, weight

    def charge(self, ledger: PrivacyLedger | None, task: ClientTask, steps: int) -> PrivacyLedger | None:
        """The client's ledger after ``steps`` DP-SGD steps of ``task`` (None when none is kept)."""
        return ledger

    def epsilon_of(self, ledger: PrivacyLedger | None) -> float | None:
        """The client's cumulative epsilon by its ledger (None when none is kept)."""
        return None

    # ------------------------------------------------------------------ server side
    def aggregate(
        self,
        method: Aggregator,
        global_state: AdapterState,
        sums: PartialSum,
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """The new (global, server) state from the round's folded uploads: the method's own aggregation; no
        uploads (or nothing shared) = no change."""
        if not len(sums) or not plan.uploaded:
            return global_state, server_state
        if method.capabilities.linear:
            return method.aggregate_sums(global_state, sums, plan, server_state)
        return method.aggregate(global_state, sums.buffered(), plan, server_state)


@dataclass(frozen=True)
class SampleLevelDP(NoPrivacy):
    """``privacy.mode: sample``: per-client DP-SGD with per-client ledgers (module docstring)."""

    clip: float = 1.0
    delta: float = 1e-5
    epsilon: float | None = None  # the target; None = a fixed noise multiplier, epsilon only reported
    accountant: str = "prv"
    local_steps: int = 1

    mode = "sample"

    def open_ledger(self, ledger_json: dict | None) -> PrivacyLedger:
        return PrivacyLedger.from_json(ledger_json) if ledger_json else PrivacyLedger(accountant=self.accountant)

    def exhausted(self, task: ClientTask, ledger: PrivacyLedger | None) -> bool:
        if self.epsilon is None or ledger is None:
            return False
        sigma, q = float(task.noise_multiplier or 0.0), float(task.sample_rate or 0.0)
        return would_exceed(ledger, sigma, q, self.local_steps, self.epsilon, self.delta)

    def dpsgd_noise(self, task: ClientTask) -> float:
        return float(task.noise_multiplier or 0.0)

    def signal_noise_std(self, task: ClientTask, batch: float) -> float:
        return float(task.noise_multiplier or 0.0) * self.clip / batch

    def charge(self, ledger: PrivacyLedger | None, task: ClientTask, steps: int) -> PrivacyLedger | None:
        if ledger is None:
            return None
        return ledger.spend(float(task.noise_multiplier or 0.0), float(task.sample_rate or 0.0), steps)

    def epsilon_of(self, ledger: PrivacyLedger | None) -> float | None:
        return None if ledger is None else ledger.epsilon(self.delta)


@dataclass(frozen=True)
class ClientLevelDP(NoPrivacy):
    """``privacy.mode: client``: DP-FedAvg (module docstring). ``noise_multiplier`` is the server's sigma."""

    clip: float = 1.0
    noise_multiplier: float = 0.0
    expected_clients: int = 1
    clients: int = 1
    seed: int = 0
    delta: float = 1e-5
    accountant: str = "rdp"

    mode = "client"

    def upload(self, start: AdapterState, trained: AdapterState, weight: float) -> tuple[AdapterState, float]:
        """The delta ``trained - start`` clipped jointly (one L2 norm over all uploaded tensors) to ``clip``;
        weight 1 (uniform, so the sum's sensitivity is ``clip``)."""
        if not trained:
            return trained, 1.0
        clipped, _ = clip_update({k: trained[k] - start[k] for k in trained}, self.clip)
        return clipped, 1.0

    def aggregate(
        self,
        method: Aggregator,
        global_state: AdapterState,
        sums: PartialSum,
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """``global + (sum of clipped deltas + N(0, (sigma * clip)^2)) / m`` for the shared tensors, formed as the
        privatised weighted sum ``m * global + sum + noise`` of weight ``m`` and handed to the method's
        ``aggregate_sums``. The noise is drawn every round (also with no uploads), one key after the other in
        sorted order, from ``torch_generator(seed, "server_noise", round)``."""
        keys = sorted(plan.uploaded)
        if not keys:
            return global_state, server_state
        noise = gaussian_noise(
            global_state, keys, self.noise_multiplier, self.clip, torch_generator(self.seed, SERVER_NOISE, plan.round)
        )
        m = float(self.expected_clients)
        totals: dict[str, torch.Tensor] = {}
        for key in keys:
            total = noise[key] + m * global_state[key].detach().to(device=noise[key].device, dtype=torch.float64)
            if key in sums.sums:
                total = total + sums.sums[key].to(total.device)
            totals[key] = total
        released = PartialSum.of_totals(plan.round, totals, m, {k: global_state[k].dtype for k in keys})
        return method.aggregate_sums(global_state, released, plan, server_state)

    def epsilon(self, rounds_done: int) -> float:
        """Client-level epsilon at ``delta`` after ``rounds_done`` rounds of the mechanism (0 before the first)."""
        return client_level_epsilon(
            self.noise_multiplier, self.expected_clients, self.clients, rounds_done, self.delta, self.accountant
        )


PrivacyMechanism = NoPrivacy  # the interface: NoPrivacy's methods, which the other mechanisms override


def make_mechanism(cfg: Config) -> PrivacyMechanism:
    """The mechanism ``privacy.mode`` names, its server noise calibrated for client-level DP (cached).

    Raises ConfigError naming ``privacy.epsilon`` when a client-level target cannot be reached."""
    pr, fe = cfg.privacy, cfg.federation
    if pr.mode == "sample":
        return SampleLevelDP(
            clip=pr.clip, delta=pr.delta, epsilon=pr.epsilon, accountant=pr.accountant, local_steps=fe.local_steps
        )
    if pr.mode == "client":
        if pr.epsilon is None:
            sigma = float(pr.noise_multiplier or 0.0)
        else:
            sigma = client_level_noise_multiplier(
                pr.epsilon, pr.delta, fe.clients_per_round, fe.clients, fe.rounds, pr.accountant
            )
        return ClientLevelDP(
            clip=pr.client_clip,
            noise_multiplier=sigma,
            expected_clients=fe.clients_per_round,
            clients=fe.clients,
            seed=cfg.seed,
            delta=pr.delta,
            accountant=pr.accountant,
        )
    return NoPrivacy()
