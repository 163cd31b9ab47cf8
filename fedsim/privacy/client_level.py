"""Client-level differential privacy (DP-FedAvg, McMahan, Ramage, Talwar, Zhang, ICLR 2018): its building blocks.

The mechanism itself (clip once on the client, one noise draw at the server, the fixed denominator, the
accountant) is :class:`fedsim.privacy.mechanism.ClientLevelDP`; this module holds the pieces it is made of:
joint L2 clipping of an update (:func:`clip_update`), the server's Gaussian noise (:func:`gaussian_noise`), and the
calibration and accounting over rounds at sampling rate ``q = clients_per_round / clients``
(:func:`client_level_noise_multiplier`, :func:`client_level_epsilon`; Opacus RDP or PRV accountant). The
accountants analyse Poisson sampling; a fixed-size cohort drawn without replacement is accounted as if it were
Poisson-sampled at the same rate, as is usual for DP-FedAvg.

All functions are pure torch on ``AdapterState``-like mappings; all randomness comes from the caller's generator
(see :mod:`fedsim.seeding`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedsim.config.privacy_ranges import delta_problem
from fedsim.errors import ConfigError
from fedsim.privacy.accounting import ACCOUNTANTS, calibrate_noise, epsilon_for
from fedsim.types import AdapterState

_EPS_STABILITY = 1e-12


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of ``delta``: sqrt of the sum of squares over every coordinate of every tensor.

    Accumulated in float64 in the mapping's order. An empty mapping has norm 0.0.
    """
    total = 0.0
    for tensor in delta.values():
        total += float(tensor.detach().to(torch.float64).square().sum())
    return total**0.5


def clip_update(delta: Mapping[str, torch.Tensor], clip: float) -> tuple[AdapterState, float]:
    """Clip ``delta`` jointly to L2 norm ``clip``: every tensor is scaled by ``min(1, clip / (norm + 1e-12))``.

    ``norm`` is :func:`update_norm` over ALL tensors of ``delta`` (so pass exactly the tensors that are uploaded).
    The direction is kept; an update with norm <= ``clip`` comes back unchanged (as a copy). Scaling is done in
    float64 and cast back to each tensor's dtype.

    Returns ``(clipped copy, original norm)``. Raises ValueError if ``clip <= 0``.
    """
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = update_norm(delta)
    scale = min(1.0, float(clip) / (norm + _EPS_STABILITY))
    clipped: AdapterState = {}
    for key, tensor in delta.items():
        t = tensor.detach()
        clipped[key] = t.clone() if scale == 1.0 else (t.to(torch.float64) * scale).to(t.dtype)
    return clipped, norm


def gaussian_noise(
    template: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Float64 Gaussian noise N(0, (noise_multiplier * clip)^2) per coordinate, shaped like ``template[k]``.

    Drawn with ``generator`` (a CPU generator) one key after the other in the order of ``keys`` (the caller sorts
    them, so the draw does not depend on dict order), then moved to each template tensor's device. The draw
    always happens, also for ``noise_multiplier == 0``, so the generator advances the same way in every run.
    Raises ValueError for a negative ``noise_multiplier``, ``clip <= 0`` or a key missing from ``template``.
    """
    _check_noise_args(noise_multiplier, clip)
    std = float(noise_multiplier) * float(clip)
    noise: dict[str, torch.Tensor] = {}
    for key in keys:
        if key not in template:
            raise ValueError(f"no tensor {key!r} to shape the noise after")
        like = template[key]
        z = torch.randn(like.shape, generator=generator, dtype=torch.float64)
        noise[key] = (z * std).to(like.device)
    return noise


def client_level_noise_multiplier(
    target_epsilon: float,
    delta: float,
    clients_per_round: int,
    clients: int,
    rounds: int,
    accountant: str = "rdp",
) -> float:
    """Server noise multiplier calibrated for ``rounds`` compositions at sampling rate clients_per_round / clients.

    Delegates to :func:`fedsim.privacy.accounting.calibrate_noise` (cached; epsilon of the result <= target).
    Raises ConfigError naming privacy.epsilon when the target is unreachable, or the offending key for bad input.
    """
    _check_accounting_args(delta, clients_per_round, clients, accountant)
    return calibrate_noise(target_epsilon, delta, int(clients_per_round) / int(clients), int(rounds), accountant)


def client_level_epsilon(
    noise_multiplier: float,
    clients_per_round: int,
    clients: int,
    rounds_done: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Client-level epsilon at ``delta`` after ``rounds_done`` rounds of the mechanism (0.0 for 0 rounds).

    The history ``[(noise_multiplier, clients_per_round / clients, rounds_done)]`` through
    :func:`fedsim.privacy.accounting.epsilon_for`. ``noise_multiplier == 0`` gives ``inf``. Raises ValueError for a
    negative ``noise_multiplier`` or ``rounds_done``, ConfigError for an invalid delta, cohort or accountant name.
    """
    _check_accounting_args(delta, clients_per_round, clients, accountant)
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if int(rounds_done) < 0:
        raise ValueError(f"rounds_done must be >= 0, got {rounds_done}")
    history = ((float(noise_multiplier), int(clients_per_round) / int(clients), int(rounds_done)),)
    return epsilon_for(accountant, history, float(delta))


def _check_noise_args(noise_multiplier: float, clip: float) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")


def _check_accounting_args(delta: float, clients_per_round: int, clients: int, accountant: str) -> None:
    problems = [p for p in (delta_problem(delta),) if p]
    if int(clients) < 1:
        problems.append(f"federation.clients: must be >= 1, got {clients}.")
    elif not 1 <= int(clients_per_round) <= int(clients):
        problems.append(
            f"federation.clients_per_round: must be in [1, federation.clients={clients}], got {clients_per_round}."
        )
    if accountant not in ACCOUNTANTS:
        problems.append(f"privacy.accountant: unknown accountant {accountant!r}; use one of {list(ACCOUNTANTS)}.")
    if problems:
        raise ConfigError(problems)
