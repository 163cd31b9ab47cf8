"""Per-client sample-level DP settings, planned once per run before any training.

Each client k gets its own sampling rate q_k = min(1, batch / N_k) and a noise multiplier calibrated
(cached, so equal-sized clients calibrate once) for the number of steps it may take:
``full`` = rounds x local_steps (every round it could join), ``expected`` = ceil(rounds x
clients_per_round / clients) x local_steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedsim.config.schema import Config
from fedsim.errors import ConfigError
from fedsim.privacy.accounting import calibrate_noise
from fedsim.privacy.sampling import poisson_rate


@dataclass(frozen=True)
class ClientPrivacy:
    """The DP-SGD settings of one client for the whole run."""

    noise_multiplier: float
    sample_rate: float


def planned_steps(cfg: Config) -> int:
    """Steps the noise of every client is sized for (see module doc)."""
    fe = cfg.federation
    if cfg.privacy.steps_basis == "full":
        return fe.rounds * fe.local_steps
    return math.ceil(fe.rounds * fe.clients_per_round / fe.clients) * fe.local_steps


def check_delta(cfg: Config, client_sizes: Sequence[int]) -> None:
    """ConfigError naming privacy.delta if delta >= 1/N_k for the smallest client (a meaningless guarantee)."""
    smallest = min(client_sizes)
    if cfg.privacy.delta >= 1.0 / smallest:
        raise ConfigError(
            [
                f"privacy.delta = {cfg.privacy.delta:g} is not below 1/N = {1.0 / smallest:.3g} for the smallest "
                f"client ({smallest} training examples); lower privacy.delta (e.g. 1e-5) or give clients more data "
                "(fewer federation.clients)"
            ]
        )


def plan_client_privacy(cfg: Config, client_sizes: Sequence[int]) -> list[ClientPrivacy]:
    """One ClientPrivacy per client (sample mode). Raises ConfigError for an unreachable target epsilon."""
    pr, fe = cfg.privacy, cfg.federation
    check_delta(cfg, client_sizes)
    steps = planned_steps(cfg)
    out = []
    for n in client_sizes:
        q = poisson_rate(fe.batch_size, n)
        if pr.epsilon is None:
            sigma = float(pr.noise_multiplier or 0.0)
        else:
            sigma = calibrate_noise(pr.epsilon, pr.delta, q, steps, pr.accountant)
        out.append(ClientPrivacy(noise_multiplier=sigma, sample_rate=q))
    return out
