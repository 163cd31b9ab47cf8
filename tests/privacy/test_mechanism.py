"""The privacy mechanisms' client side behind one interface: none, sample-level DP-SGD, client-level DP."""

from __future__ import annotations

import pytest
import torch

from fedsim.config.schema import Config, FederationConfig, PrivacyConfig
from fedsim.privacy.accounting import PrivacyLedger
from fedsim.privacy.mechanism import ClientLevelDP, NoPrivacy, SampleLevelDP, make_mechanism
from fedsim.types import ClientTask, RoundPlan

TASK = ClientTask(1, 3, RoundPlan(1, {}), noise_multiplier=1.2, sample_rate=0.1)


def test_make_mechanism_follows_privacy_mode():
    assert isinstance(make_mechanism(Config()), NoPrivacy) and make_mechanism(Config()).mode == "none"
    sample = make_mechanism(Config(privacy=PrivacyConfig(mode="sample", epsilon=3.0, clip=0.5)))
    assert isinstance(sample, SampleLevelDP) and (sample.clip, sample.epsilon) == (0.5, 3.0)
    cfg = Config(
        federation=FederationConfig(clients=20, clients_per_round=5),
        privacy=PrivacyConfig(mode="client", noise_multiplier=0.8),
    )
    client = make_mechanism(cfg)
    assert isinstance(client, ClientLevelDP) and (client.noise_multiplier, client.expected_clients) == (0.8, 5)


def test_no_privacy_passes_everything_through():
    mech = NoPrivacy()
    trained = {"x": torch.ones(2)}
    assert mech.upload({"x": torch.zeros(2)}, trained, 7.0) == (trained, 7.0)
    assert mech.open_ledger({"a": 1}) is None and not mech.exhausted(TASK, None)
    assert mech.dpsgd_noise(TASK) is None and mech.signal_noise_std(TASK, 16.0) == 0.0
    assert mech.charge(None, TASK, 5) is None and mech.epsilon_of(None) is None


def test_sample_level_charges_the_steps_taken_and_stops_a_client_past_its_budget():
    mech = SampleLevelDP(clip=2.0, delta=1e-5, epsilon=3.0, accountant="rdp", local_steps=5)
    ledger = mech.open_ledger(None)
    assert isinstance(ledger, PrivacyLedger) and ledger.steps == 0
    assert mech.dpsgd_noise(TASK) == 1.2 and mech.signal_noise_std(TASK, 16.0) == pytest.approx(1.2 * 2.0 / 16)
    charged = mech.charge(ledger, TASK, 3)
    assert charged.steps == 3 and mech.epsilon_of(charged) == pytest.approx(charged.epsilon(1e-5))
    assert mech.open_ledger(charged.to_json()) == charged  # round trip through the ClientStore's JSON
    assert not mech.exhausted(TASK, charged)
    spent = charged
    while not mech.exhausted(TASK, spent):
        spent = mech.charge(spent, TASK, 5)
    assert mech.epsilon_of(spent) <= 3.0 < mech.epsilon_of(mech.charge(spent, TASK, 5))
    # a fixed noise multiplier (no target): never exhausted, epsilon only reported
    assert not SampleLevelDP(epsilon=None).exhausted(TASK, spent)
