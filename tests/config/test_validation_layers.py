"""config/ checks only what the config alone shows; fedsim.validation adds the checks against other packages'
declarations (method registry, model names, data sources, fused-pass rules, cluster address form) and still
reports every problem in one ConfigError."""

from __future__ import annotations

import pytest

from fedsim.config import load as config_load
from fedsim.config.checks import validate as own_problems
from fedsim.errors import ConfigError
from fedsim.validation import config_from_dict, cross_package_problems, load_config, validate


def test_config_alone_accepts_what_only_another_package_can_refuse():
    cfg, _ = config_load.load_config("tiny", ["method.name=nope", "runtime.address=http://127.0.0.1:8265"])
    assert own_problems(cfg) == []
    problems = cross_package_problems(cfg)
    assert any(p.startswith("method.name: unknown method 'nope'") for p in problems), problems
    assert any(p.startswith("runtime.address") for p in problems), problems
    assert validate(cfg) == problems


def test_application_loading_lists_own_and_cross_package_problems_at_once():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["federation.rounds=0", "method.name=nope"])
    keys = [p.split(" ", 1)[0].rstrip(":") for p in info.value.problems]
    assert "federation.rounds" in keys and "method.name" in keys, info.value.problems
    with pytest.raises(ConfigError) as info:
        config_from_dict({"federation": {"rounds": 0}, "method": {"name": "nope"}})
    assert len(info.value.problems) == 2, info.value.problems


def test_a_wrongly_typed_value_is_reported_without_the_checks_that_assume_types():
    cfg, _ = config_load.load_config("tiny")
    bad = cfg.__class__(**{**cfg.__dict__, "seed": "zero"})
    problems = validate(bad)
    assert len(problems) == 1 and problems[0].startswith("seed: expected"), problems


def test_clients_per_pass_below_one_is_reported_once():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["runtime.clients_per_pass=0"])
    assert [p for p in info.value.problems if "clients_per_pass" in p] == [
        "runtime.clients_per_pass must be >= 1 or auto (got 0); 1 trains one client at a time, e.g. 8 trains eight "
        "together"
    ]
