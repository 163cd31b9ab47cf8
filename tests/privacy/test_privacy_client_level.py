"""Client-level DP (DP-FedAvg) through its mechanism: one joint clip, one server noise draw, fixed denominator,
calibration and accounting."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.config.schema import Config, FederationConfig, MethodConfig, PrivacyConfig
from fedsim.errors import ConfigError
from fedsim.methods.base import make_method
from fedsim.partial_sum import PartialSum
from fedsim.privacy.client_level import (
    client_level_epsilon,
    client_level_noise_multiplier,
    clip_update,
    gaussian_noise,
    update_norm,
)
from fedsim.privacy.mechanism import ClientLevelDP, make_mechanism
from fedsim.seeding import torch_generator
from fedsim.types import ClientUpdate, Role, RoundPlan

KEYS = ["a.lora_A", "a.lora_B", "head.weight"]
SHAPES = {"a.lora_A": (4, 8), "a.lora_B": (8, 4), "head.weight": (3, 8)}


def _state(seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(SHAPES[k], generator=g, dtype=torch.float64) * scale).to(dtype) for k in KEYS}


def _flat(state: dict[str, torch.Tensor], keys=KEYS) -> torch.Tensor:
    return torch.cat([state[k].to(torch.float64).flatten() for k in keys])


def test_update_norm_is_global_l2_norm():
    s = _state(0)
    assert update_norm(s) == pytest.approx(float(torch.linalg.vector_norm(_flat(s))), rel=1e-12)
    assert update_norm({"x": torch.tensor([3.0]), "y": torch.tensor([[4.0]])}) == pytest.approx(5.0, rel=1e-15)
    assert update_norm({}) == 0.0


def test_clip_update_above_clip_scales_jointly_to_clip():
    s = _state(1, scale=10.0)
    norm = update_norm(s)
    assert norm > 5.0
    clipped, reported = clip_update(s, 2.5)
    assert reported == pytest.approx(norm, rel=1e-12)
    assert update_norm(clipped) == pytest.approx(2.5, abs=1e-6)
    # same direction: one common scale factor for ALL tensors (joint, not per-tensor, clipping)
    ratio = _flat(clipped) / _flat(s)
    assert torch.allclose(ratio, torch.full_like(ratio, 2.5 / norm), rtol=1e-5)
    assert all(clipped[k].dtype == s[k].dtype for k in KEYS)


def test_clip_update_below_clip_unchanged_copy():
    s = _state(2, scale=0.01)
    clipped, reported = clip_update(s, 100.0)
    assert reported == pytest.approx(update_norm(s), rel=1e-12)
    for k in KEYS:
        assert torch.equal(clipped[k], s[k])
        assert clipped[k].data_ptr() != s[k].data_ptr()  # a copy: the caller may mutate it
    with pytest.raises(ValueError, match="clip"):
        clip_update(s, 0.0)


def _mechanism(sigma: float, clip: float, m: int, seed: int = 0) -> ClientLevelDP:
    return ClientLevelDP(clip=clip, noise_multiplier=sigma, expected_clients=m, clients=100, seed=seed)


def _release(mech: ClientLevelDP, glob, deltas, keys=KEYS, round: int = 1, frozen=()):
    """DP-FedAvg through the mechanism: each client uploads ``mech.upload`` of (glob + delta); the uploads are
    folded as a worker does; the server step wraps fedavg_lora's aggregate_sums."""
    plan = RoundPlan(round, {**{k: Role.SHARED for k in keys}, **{k: Role.FROZEN for k in frozen}})
    sums = PartialSum(round)
    for cid, delta in enumerate(deltas):
        trained = {k: glob[k] + delta[k] for k in keys}
        tensors, weight = mech.upload({k: glob[k] for k in keys}, trained, weight=17.0 + cid)
        assert weight == 1.0  # uniform: the sum's sensitivity is the clip, whatever weight the client had
        sums.add(ClientUpdate(cid, weight, tensors))
    method = make_method(Config(method=MethodConfig(name="fedavg_lora")))
    new, _ = mech.aggregate(method, glob, sums, plan, {})
    return new


def test_each_client_contributes_its_clipped_delta_over_expected_clients():
    glob = _state(3)
    huge = _state(4, scale=1e4)
    clip, m = 1.5, 4
    new = _release(_mechanism(0.0, clip, m), glob, [huge])
    step = {k: new[k].double() - glob[k].double() for k in KEYS}
    assert update_norm(step) == pytest.approx(clip / m, rel=1e-5)
    # the contribution is exactly the clipped delta divided by the fixed denominator (not by len(deltas) == 1)
    expected = clip_update({k: (glob[k] + huge[k]) - glob[k] for k in KEYS}, clip)[0]
    for k in KEYS:
        torch.testing.assert_close(step[k], expected[k].double() / m, rtol=1e-5, atol=1e-6)


def test_the_upload_is_the_delta_clipped_once_jointly():
    glob, delta = _state(6), _state(7, scale=10.0)
    mech = _mechanism(1.0, 2.0, 3)
    tensors, weight = mech.upload(glob, {k: glob[k] + delta[k] for k in KEYS}, 5.0)
    assert weight == 1.0 and update_norm(tensors) == pytest.approx(2.0, rel=1e-5)
    want = clip_update({k: (glob[k] + delta[k]) - glob[k] for k in KEYS}, 2.0)[0]
    assert all(torch.equal(tensors[k], want[k]) for k in KEYS)


def test_aggregate_sums_clipped_deltas_and_copies_other_keys():
    glob = {**_state(5), "frozen": torch.arange(6.0)}
    deltas = [_state(10 + i, scale=s) for i, s in enumerate((0.05, 3.0, 0.1))]  # some above, some below the clip
    clip, m = 2.0, 5
    new = _release(_mechanism(0.0, clip, m), glob, deltas, frozen=("frozen",))
    clipped = [clip_update({k: (glob[k] + d[k]) - glob[k] for k in KEYS}, clip)[0] for d in deltas]
    assert any(update_norm(d) > clip for d in deltas) and any(update_norm(d) < clip for d in deltas)
    for k in KEYS:
        want = glob[k].double() + sum(c[k].double() for c in clipped) / m
        torch.testing.assert_close(new[k], want.float(), rtol=1e-6, atol=1e-6)
    assert new["frozen"] is glob["frozen"]
    assert set(new) == set(glob)


def test_server_noise_statistics():
    n = 200_000
    sigma, clip, m = 1.3, 0.7, 8
    template = {"big": torch.zeros(n // 2), "bag": torch.zeros(n // 4, 4)}  # 300k coordinates over two tensors
    keys = sorted(template)
    z = _flat(gaussian_noise(template, keys, sigma, clip, torch.Generator().manual_seed(123)), keys)
    assert z.numel() == n // 2 + n
    assert abs(float(z.std()) / (sigma * clip) - 1) < 0.01
    assert abs(float(z.mean())) < 5 * sigma * clip / math.sqrt(z.numel())
    # through the mechanism: zero deltas from two clients (still noise, once), fixed denominator m
    zeros = {k: torch.zeros_like(v) for k, v in template.items()}
    w = _flat(_release(_mechanism(sigma, clip, m, seed=7), template, [zeros, zeros], keys), keys)
    assert abs(float(w.std()) / (sigma * clip / m) - 1) < 0.01
    assert abs(float(w.mean())) < 5 * sigma * clip / m / math.sqrt(w.numel())
    # an empty cohort still runs the mechanism
    empty = _release(_mechanism(sigma, clip, m, seed=7), template, [], keys)
    assert abs(float(_flat(empty, keys).std()) / (sigma * clip / m) - 1) < 0.01


def test_noise_is_one_draw_per_coordinate_in_sorted_key_order_seeded_by_seed_and_round():
    glob = _state(30)
    keys = sorted(KEYS)
    sigma, clip, m, seed, round = 2.0, 0.5, 3, 11, 4
    new = _release(_mechanism(sigma, clip, m, seed=seed), glob, [], KEYS, round=round)
    g = torch_generator(seed, "server_noise", round)
    for k in keys:
        z = torch.randn(SHAPES[k], generator=g, dtype=torch.float64) * (sigma * clip)
        torch.testing.assert_close(new[k], (glob[k].double() + z / m).float())


def test_determinism_by_seed():
    glob = _state(40)
    deltas = [_state(41), _state(42, scale=3.0)]

    def run(seed: int) -> dict[str, torch.Tensor]:
        return _release(_mechanism(1.1, 1.0, 3, seed=seed), glob, deltas)

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a[k], b[k]) for k in KEYS)
    assert all(not torch.equal(a[k], c[k]) for k in KEYS)


def test_bad_noise_arguments_are_rejected():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        gaussian_noise(_state(50), KEYS, -1.0, 1.0, g)
    with pytest.raises(ValueError, match="clip"):
        gaussian_noise(_state(50), KEYS, 1.0, 0.0, g)
    with pytest.raises(ValueError, match="no tensor"):
        gaussian_noise(_state(50), ["nope"], 1.0, 1.0, g)


def test_the_mechanism_accounts_its_rounds():
    cfg = Config(
        federation=FederationConfig(clients=100, clients_per_round=10, rounds=30),
        privacy=PrivacyConfig(mode="client", epsilon=3.0, accountant="rdp"),
    )
    mech = make_mechanism(cfg)
    assert isinstance(mech, ClientLevelDP) and mech.noise_multiplier > 0 and mech.expected_clients == 10
    assert mech.epsilon(30) == pytest.approx(client_level_epsilon(mech.noise_multiplier, 10, 100, 30, 1e-5))
    assert 0.9 * 3.0 <= mech.epsilon(30) <= 3.0 and mech.epsilon(0) == 0.0


@pytest.mark.parametrize("eps,clients_per_round,clients,rounds", [(3.0, 10, 100, 30), (1.0, 5, 1000, 200)])
def test_calibration_reaches_target_epsilon(eps, clients_per_round, clients, rounds):
    delta = 1e-5
    sigma = client_level_noise_multiplier(eps, delta, clients_per_round, clients, rounds)
    assert sigma > 0
    spent = client_level_epsilon(sigma, clients_per_round, clients, rounds, delta)
    assert 0.9 * eps <= spent <= eps
    # epsilon grows with the rounds done and is 0 before the first round
    assert client_level_epsilon(sigma, clients_per_round, clients, 0, delta) == 0.0
    assert client_level_epsilon(sigma, clients_per_round, clients, rounds // 2, delta) < spent
    # a smaller sigma would overshoot the target: the calibration is not needlessly noisy
    assert client_level_epsilon(0.9 * sigma, clients_per_round, clients, rounds, delta) > eps


def test_calibration_prv_accountant():
    sigma = client_level_noise_multiplier(3.0, 1e-5, 10, 100, 20, accountant="prv")
    spent = client_level_epsilon(sigma, 10, 100, 20, 1e-5, accountant="prv")
    assert 0.9 * 3.0 <= spent <= 3.0


def test_unreachable_target_is_config_error_naming_epsilon():
    with pytest.raises(ConfigError, match=r"privacy\.epsilon") as info:
        client_level_noise_multiplier(1e-7, 1e-5, 100, 100, 50)
    assert any("privacy.epsilon" in p and "raise privacy.epsilon" in p.lower() for p in info.value.problems)
    with pytest.raises(ConfigError, match=r"privacy\.epsilon"):
        client_level_noise_multiplier(0.0, 1e-5, 10, 100, 5)
    with pytest.raises(ConfigError, match=r"privacy\.accountant"):
        client_level_noise_multiplier(3.0, 1e-5, 10, 100, 5, accountant="nope")
    with pytest.raises(ConfigError, match=r"federation\.clients_per_round"):
        client_level_epsilon(1.0, 200, 100, 5, 1e-5)
