"""Per-client privacy accounting: ledger mechanics, agreement with Opacus' own analysis, noise calibration."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

import fedsim.privacy.accounting as accounting
from fedsim.errors import ConfigError
from fedsim.privacy.accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise, epsilon_for, would_exceed

DELTA = 1e-5
SIGMA = 1.0
ROUNDS, LOCAL_STEPS = 10, 5
CAL_Q, CAL_STEPS = 16 / 180, 20
TARGETS = (2.0, 8.0)

# name -> (sample rate, rounds the client joins)
SCENARIOS = {
    "full_q16/100": (16 / 100, range(ROUNDS)),
    "full_q16/400": (16 / 400, range(ROUNDS)),
    "partial_3of10_q16/100": (16 / 100, (1, 4, 8)),
}


def _ledger_after_rounds(accountant: str, q: float, joined) -> PrivacyLedger:
    """The ledger as the worker builds it: one spend per round, 0 steps in rounds the client sits out."""
    ledger = PrivacyLedger(accountant)
    for r in range(ROUNDS):
        ledger = ledger.spend(SIGMA, q, LOCAL_STEPS if r in joined else 0)
    return ledger


def _rdp_reference(sigma: float, q: float, steps: int) -> float:
    """Opacus' RDP analysis called directly: compute_rdp over the default orders, then the (eps, delta) conversion."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=curve, delta=DELTA)
    return float(eps)


def _prv_reference(sigma: float, q: float, steps: int) -> float:
    """A fresh Opacus PRVAccountant stepped one step at a time, at a finer eps_error than fedsim uses."""
    acc = PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(DELTA, eps_error=0.001))


def _reference(accountant: str, sigma: float, q: float, steps: int) -> float:
    return _rdp_reference(sigma, q, steps) if accountant == "rdp" else _prv_reference(sigma, q, steps)


@pytest.fixture(scope="module")
def scenario_eps() -> dict[tuple[str, str], float]:
    """(accountant, scenario) -> epsilon from the ledger after 10 rounds (computed once for the module)."""
    return {
        (acc, name): _ledger_after_rounds(acc, q, joined).epsilon(DELTA)
        for acc in ACCOUNTANTS
        for name, (q, joined) in SCENARIOS.items()
    }


@pytest.fixture(scope="module")
def calibrated() -> dict[tuple[str, float], float]:
    """(accountant, target epsilon) -> calibrated sigma for CAL_STEPS steps at CAL_Q."""
    return {(acc, t): calibrate_noise(t, DELTA, CAL_Q, CAL_STEPS, acc) for acc in ACCOUNTANTS for t in TARGETS}


# ---------------------------------------------------------------- agreement with Opacus' analysis


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_epsilon_agrees_with_independent_opacus_computation(accountant, name, scenario_eps):
    q, joined = SCENARIOS[name]
    steps = len(joined) * LOCAL_STEPS
    ours = scenario_eps[(accountant, name)]
    ref = _reference(accountant, SIGMA, q, steps)
    assert ours == pytest.approx(ref, rel=0.01)


def test_small_prv_epsilon_is_refined_to_half_a_percent():
    # eps ~ 0.4: Opacus' default absolute eps_error (0.01) alone would be ~2% high here
    sigma, q, steps = 2.0, 16 / 400, 20
    ours = epsilon_for("prv", ((sigma, q, steps),), DELTA)
    assert ours == pytest.approx(_prv_reference(sigma, q, steps), rel=0.005)


def test_scenarios_order_as_the_mechanism_implies(scenario_eps):
    for acc in ACCOUNTANTS:
        full, small_q, partial = (scenario_eps[(acc, n)] for n in SCENARIOS)
        assert small_q < full  # a larger client (smaller q) spends less
        assert partial < full  # 15 steps cost less than 50
        assert 0 < small_q and 0 < partial


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("target", TARGETS)
def test_calibrated_sigma_reaches_target_from_below(accountant, target, calibrated):
    sigma = calibrated[(accountant, target)]
    eps = PrivacyLedger(accountant).spend(sigma, CAL_Q, CAL_STEPS).epsilon(DELTA)
    assert 0.9 * target <= eps <= target
    # the independent computation agrees (it cannot show a budget overrun beyond accounting precision)
    assert _reference(accountant, sigma, CAL_Q, CAL_STEPS) <= target * 1.001


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_larger_target_gives_smaller_sigma(accountant, calibrated):
    assert calibrated[(accountant, TARGETS[1])] < calibrated[(accountant, TARGETS[0])]


def test_calibration_is_cached(calibrated, monkeypatch):
    def boom(**kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(accounting, "get_noise_multiplier", boom)
    for (acc, t), sigma in calibrated.items():
        before = calibrate_noise.cache_info()
        assert calibrate_noise(t, DELTA, CAL_Q, CAL_STEPS, acc) is sigma
        after = calibrate_noise.cache_info()
        assert after.hits == before.hits + 1 and after.misses == before.misses


def test_calibration_nudges_sigma_up_when_search_result_overshoots(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        true_sigma = get_noise_multiplier(
            target_epsilon=4.0, target_delta=DELTA, sample_rate=CAL_Q, steps=CAL_STEPS, accountant="rdp"
        )
    monkeypatch.setattr(accounting, "get_noise_multiplier", lambda **kw: 0.99 * true_sigma)
    assert epsilon_for("rdp", ((0.99 * true_sigma, CAL_Q, CAL_STEPS),), DELTA) > 4.0  # the bad search result overshoots
    sigma = calibrate_noise.__wrapped__(4.0, DELTA, CAL_Q, CAL_STEPS, "rdp")  # uncached
    assert 0.99 * true_sigma < sigma <= true_sigma
    assert epsilon_for("rdp", ((sigma, CAL_Q, CAL_STEPS),), DELTA) <= 4.0


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_unreachable_target_is_a_config_error(accountant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):  # Opacus itself gives up on this one
            get_noise_multiplier(
                target_epsilon=1e-6, target_delta=DELTA, sample_rate=1.0, steps=100, accountant=accountant
            )
    with pytest.raises(ConfigError) as info:
        calibrate_noise(1e-6, DELTA, 1.0, 100, accountant)
    assert "privacy.epsilon" in str(info.value) and "federation.rounds" in str(info.value)


def test_opacus_search_failure_becomes_config_error(monkeypatch):
    def too_low(**kwargs):
        raise ValueError("The privacy budget is too low.")

    monkeypatch.setattr(accounting, "get_noise_multiplier", too_low)
    with pytest.raises(ConfigError) as info:
        calibrate_noise.__wrapped__(5.0, DELTA, 0.25, 7, "rdp")
    assert info.value.problems[0].startswith("privacy.epsilon")
    assert isinstance(info.value.__cause__, ValueError)


def test_calibration_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        calibrate_noise(0.0, DELTA, CAL_Q, CAL_STEPS, "rdp")
    with pytest.raises(ConfigError, match="privacy.accountant"):
        calibrate_noise(3.0, DELTA, CAL_Q, CAL_STEPS, "gdp")
    with pytest.raises(ConfigError, match="privacy.delta"):
        calibrate_noise(3.0, 1.5, CAL_Q, CAL_STEPS, "rdp")


# ---------------------------------------------------------------- ledger


def test_spend_merges_consecutive_equal_entries_and_counts_steps():
    q = 16 / 180
    empty = PrivacyLedger("rdp")
    a = empty.spend(1.0, q, 5)
    b = a.spend(1.0, q, 5).spend(2.0, q, 3).spend(1.0, q, 1).spend(1.0, 0.5, 2)
    assert b.history == ((1.0, q, 10), (2.0, q, 3), (1.0, q, 1), (1.0, 0.5, 2))
    assert b.steps == 16
    assert a.history == ((1.0, q, 5),) and empty.history == ()  # immutable
    assert b.spend(3.0, q, 0) is b


def test_epsilon_grows_with_spending_and_merging_does_not_change_it():
    q = 16 / 180
    for acc in ACCOUNTANTS:
        ledger, last = PrivacyLedger(acc), 0.0
        for _ in range(3):
            ledger = ledger.spend(SIGMA, q, 4)
            eps = ledger.epsilon(DELTA)
            assert eps > last
            last = eps
        assert epsilon_for(acc, ((SIGMA, q, 4),) * 3, DELTA) == last


def test_empty_ledger_and_degenerate_entries():
    for acc in ACCOUNTANTS:
        assert PrivacyLedger(acc).epsilon(DELTA) == 0.0
        assert PrivacyLedger(acc).spend(1.0, 0.0, 10).epsilon(DELTA) == 0.0  # never sampled
    assert math.isinf(PrivacyLedger("rdp").spend(0.0, 0.1, 1).epsilon(DELTA))  # no noise


def test_ledger_json_round_trip_is_exact():
    ledger = PrivacyLedger("prv").spend(0.7654321, 16 / 180, 50).spend(1 / 3, 1 / 7, 3)
    text = json.dumps(ledger.to_json())
    back = PrivacyLedger.from_json(json.loads(text))
    assert back == ledger
    assert all(type(s) is float and type(q) is float and type(n) is int for s, q, n in back.history)
    assert PrivacyLedger.from_json(PrivacyLedger("rdp").to_json()) == PrivacyLedger("rdp")


def test_ledger_rejects_bad_input():
    with pytest.raises(ConfigError, match="privacy.accountant"):
        PrivacyLedger("moments")
    with pytest.raises(ValueError):
        PrivacyLedger("rdp").spend(1.0, 1.5, 1)
    with pytest.raises(ValueError):
        PrivacyLedger("rdp").spend(-1.0, 0.1, 1)
    with pytest.raises(ValueError):
        PrivacyLedger("rdp").spend(1.0, 0.1, -1)
    with pytest.raises(ValueError):
        PrivacyLedger.from_json({"accountant": "rdp"})


# ---------------------------------------------------------------- budget checks


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_would_exceed_around_the_budget(accountant):
    q = 16 / 100
    ledger = PrivacyLedger(accountant).spend(SIGMA, q, 10)
    budget = ledger.spend(SIGMA, q, 5).epsilon(DELTA)  # exactly the epsilon after 5 more steps
    assert not would_exceed(ledger, SIGMA, q, 5, budget, DELTA)
    assert not would_exceed(ledger, SIGMA, q, 4, budget, DELTA)
    assert would_exceed(ledger, SIGMA, q, 6, budget, DELTA)
    assert would_exceed(ledger, SIGMA, q, 5, budget * (1 - 1e-6), DELTA)
    assert not would_exceed(ledger, SIGMA, q, 0, ledger.epsilon(DELTA), DELTA)
