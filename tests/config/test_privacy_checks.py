"""Privacy misconfiguration is reported at load time, naming the key and the fix."""

from __future__ import annotations

import pytest

from fedsim.errors import ConfigError
from fedsim.validation import load_config


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["privacy.mode=sample", "privacy.epsilon=0"], "privacy.epsilon must be > 0"),
        (["privacy.mode=sample", "privacy.epsilon=-1"], "privacy.epsilon must be > 0"),
        (["privacy.mode=sample", "privacy.epsilon=3", "privacy.clip=0"], "privacy.clip must be > 0"),
        (["privacy.mode=sample", "privacy.epsilon=3", "privacy.noise_multiplier=1"], "both set"),
        (["privacy.mode=sample"], "neither privacy.epsilon nor privacy.noise_multiplier"),
        (["privacy.mode=client", "privacy.epsilon=3", "privacy.client_clip=0"], "privacy.client_clip must be > 0"),
        (["privacy.mode=sample", "privacy.epsilon=3", "privacy.delta=1"], "privacy.delta must be in (0, 1)"),
        (["privacy.mode=sample", "privacy.epsilon=3", "privacy.accountant=gdp"], "privacy.accountant"),
    ],
)
def test_privacy_problems(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert fragment in str(err.value)


def test_valid_dp_configs_load():
    cfg, _ = load_config("tiny", ["privacy.mode=sample", "privacy.epsilon=8"])
    assert cfg.privacy.delta == 1e-5 and cfg.privacy.accountant == "prv" and cfg.privacy.steps_basis == "full"
    cfg, _ = load_config("tiny", ["privacy.mode=sample", "privacy.noise_multiplier=1.0"])
    assert cfg.privacy.epsilon is None
