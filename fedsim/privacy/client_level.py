"""Client-level differential privacy: DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018).

The unit of privacy is one *client* (all of its data), not one example. One round of the mechanism:

1. every sampled client computes its update ``delta = trained - global`` over the uploaded tensors and **clips it
   jointly** (one L2 norm over all those tensors) to norm ``clip`` (:func:`clip_update`);
2. the server sums the clipped deltas and adds Gaussian noise **once**, N(0, (noise_multiplier * clip)^2) per
   coordinate (:func:`noisy_sum`);
3. the server divides by a **fixed** denominator, the expected cohort size ``m``, and adds the result to the
   global state (:func:`dp_fedavg_aggregate`; from an already formed sum, e.g. streamed: :func:`dp_fedavg_step`).

Sensitivity: adding or removing one client changes the clipped sum by at most ``clip`` in L2 norm, so the noisy sum
is the Gaussian mechanism with noise multiplier ``noise_multiplier``; dividing by a constant is post-processing.
The denominator must not depend on the data: dividing by the number of uploads actually received would make the
sensitivity of the average depend on the cohort (and a cohort of one would have sensitivity ``clip``). With the
fixed ``m`` the sensitivity of the average is exactly ``clip / m`` and its noise std is
``noise_multiplier * clip / m``.

Accounting: ``rounds`` compositions of the subsampled Gaussian mechanism at sampling rate
``q = clients_per_round / clients`` (Opacus RDP or PRV accountant). The accountants analyse Poisson sampling; a
fixed-size cohort drawn without replacement is accounted as if it were Poisson-sampled at the same rate, as is
usual for DP-FedAvg.

All functions are pure torch on ``AdapterState``-like mappings; all randomness comes from the caller's generator
(see :mod:`fedsim.seeding`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

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


def noisy_sum(
    clipped: Sequence[Mapping[str, torch.Tensor]],
    keys: Sequence[str],
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator,
    *,
    template: Mapping[str, torch.Tensor] | None = None,
) -> AdapterState:
    """``sum_i clipped[i][k] + N(0, (noise_multiplier * clip)^2)`` for every ``k`` in ``keys``.

    The sum runs over the clients in the given order (client-id order), accumulated in float64; the noise is ONE
    draw per coordinate from :func:`gaussian_noise` (order of ``keys``); the result is cast back to the dtype of
    the first client's tensor (or ``template``'s). The deltas are NOT clipped here: each one must already have
    joint norm <= ``clip`` over ``keys`` for the Gaussian mechanism's sensitivity ``clip`` to hold.

    ``template`` (keyword-only) gives shapes, dtypes and devices; it is needed when ``clipped`` is empty (then the
    result is pure noise). Raises ValueError if ``clipped`` is empty and no ``template`` is given, if a delta
    lacks a key or has another shape, and for the argument errors of :func:`gaussian_noise`.
    """
    like = template if template is not None else (clipped[0] if clipped else None)
    if like is None:
        raise ValueError("noisy_sum of no clients needs a template for the shapes")
    _check_noise_args(noise_multiplier, clip)
    sums = _sum64(clipped, keys, like)
    noise = gaussian_noise(like, keys, noise_multiplier, clip, generator)
    return {k: (sums[k] + noise[k]).to(like[k].dtype) for k in keys}


def dp_fedavg_aggregate(
    global_state: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    keys: Sequence[str],
    expected_clients: int,
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator,
) -> AdapterState:
    """The DP-FedAvg server step with uniform weights and a FIXED denominator ``m = expected_clients``.

    ``new[k] = global[k] + (sum_i clip_C(delta_i)[k] + N(0, (noise_multiplier * C)^2)) / m`` for ``k`` in ``keys``;
    every other key of ``global_state`` is copied unchanged (same tensor object). ``deltas`` are the uploads
    (``trained - global``) in client-id order, restricted to ``keys`` here.

    Clipping: the clients clip; this function clips each delta again, jointly over ``keys``, with
    :func:`clip_update`, so the sensitivity of the sum is ``clip`` whatever the caller did (for a delta already
    clipped by its client this changes nothing beyond float rounding). Noise and denominator: see
    :func:`dp_fedavg_step`, which this calls with the float64 sum of the clipped deltas.

    Raises ValueError if ``expected_clients < 1``, ``clip <= 0``, ``noise_multiplier < 0``, a key is missing from
    ``global_state`` or a delta, or shapes differ.
    """
    _check_noise_args(noise_multiplier, clip)
    missing = [k for k in keys if k not in global_state]
    if missing:
        raise ValueError(f"keys not in the global state: {missing[:5]}")
    clipped = [clip_update({k: _get(d, k, i) for k in keys}, clip)[0] for i, d in enumerate(deltas)]
    return dp_fedavg_step(
        global_state, _sum64(clipped, keys, global_state), keys, expected_clients, noise_multiplier, clip, generator
    )


def dp_fedavg_step(
    global_state: Mapping[str, torch.Tensor],
    clipped_sum: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    expected_clients: int,
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator,
) -> AdapterState:
    """DP-FedAvg's server step from the SUM of the round's clipped deltas (each of joint norm <= ``clip``, uniform
    weights): ``new[k] = global[k] + (clipped_sum[k] + N(0, (noise_multiplier * C)^2)) / m``, ``m =
    expected_clients``. A key missing from ``clipped_sum`` (nobody uploaded) gets the noise alone.

    Noise: ONE draw per coordinate from :func:`gaussian_noise` (order of ``keys``), added to the sum before the
    division. Denominator: ``m`` is the expected cohort size, never the number of uploads (clients that failed or
    were not heard from do not change it), so the average has sensitivity ``clip / m`` and noise std
    ``noise_multiplier * clip / m``; the mechanism runs every round, uploads or not. Arithmetic is float64, cast
    back to each global tensor's dtype; keys outside ``keys`` are copied unchanged (same tensor object).
    Raises ValueError if ``expected_clients < 1`` and for the argument errors of :func:`gaussian_noise`.
    """
    if int(expected_clients) < 1:
        raise ValueError(f"expected_clients must be >= 1, got {expected_clients}")
    noise = gaussian_noise(global_state, keys, noise_multiplier, clip, generator)
    new: AdapterState = dict(global_state)
    m = float(int(expected_clients))
    for key in keys:
        g = global_state[key]
        total = noise[key] + clipped_sum[key].to(noise[key].device) if key in clipped_sum else noise[key]
        new[key] = (g.detach().to(torch.float64) + total / m).to(g.dtype)
    return new


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


def _sum64(
    clipped: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str], template: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Float64 sum over clients (given order) of each key, shaped like ``template`` (zeros for no clients)."""
    sums: dict[str, torch.Tensor] = {}
    for key in keys:
        shape = template[key].shape
        acc = torch.zeros(shape, dtype=torch.float64, device=template[key].device)
        for i, d in enumerate(clipped):
            t = _get(d, key, i)
            if t.shape != shape:
                raise ValueError(f"client #{i} tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            acc += t.detach().to(device=acc.device, dtype=torch.float64)
        sums[key] = acc
    return sums


def _get(d: Mapping[str, torch.Tensor], key: str, index: int) -> torch.Tensor:
    if key not in d:
        raise ValueError(f"client #{index} (in the given order) uploaded no tensor {key!r}")
    return d[key]


def _check_noise_args(noise_multiplier: float, clip: float) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")


def _check_accounting_args(delta: float, clients_per_round: int, clients: int, accountant: str) -> None:
    problems = []
    if not 0 < delta < 1:
        problems.append(f"privacy.delta: must be in (0, 1), got {delta}. Use e.g. 1e-5 (below 1 / clients).")
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
