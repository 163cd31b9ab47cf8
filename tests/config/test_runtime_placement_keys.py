"""runtime.workers (an integer or auto), runtime.gpus_per_worker (a number or auto), runtime.placement,
runtime.accelerator_type, runtime.placement_timeout_s."""

from __future__ import annotations

import pytest

from fedsim.config.load import config_to_dict
from fedsim.errors import ConfigError
from fedsim.validation import config_from_dict, load_config


def test_workers_takes_an_integer_or_auto_and_round_trips():
    cfg, _ = load_config("tiny", ["runtime.workers=auto", "runtime.placement=pack", "runtime.accelerator_type=L4"])
    assert (cfg.runtime.workers, cfg.runtime.placement, cfg.runtime.accelerator_type) == ("auto", "pack", "L4")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert load_config("tiny", ["runtime.workers=3"])[0].runtime.workers == 3
    assert load_config("tiny", ["runtime.workers=3.0"])[0].runtime.workers == 3


def test_gpus_per_worker_takes_a_number_or_auto_and_round_trips():
    cfg, _ = load_config("tiny", ["runtime.gpus_per_worker=auto"])
    assert cfg.runtime.gpus_per_worker == "auto"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert load_config("tiny", ["runtime.gpus_per_worker=0.25"])[0].runtime.gpus_per_worker == 0.25


@pytest.mark.parametrize(
    "override, problem",
    [
        ("runtime.workers=many", "runtime.workers: expected an integer or 'auto', got 'many'"),
        ("runtime.workers=2.5", "runtime.workers: expected an integer or 'auto', got 2.5"),
        ("runtime.workers=true", "runtime.workers: expected an integer or 'auto', got true"),
        ("runtime.workers=0", "runtime.workers must be >= 1 or auto (got 0)"),
        ("runtime.gpus_per_worker=half", "runtime.gpus_per_worker: expected a number or 'auto', got 'half'"),
        ("runtime.gpus_per_worker=-0.5", "runtime.gpus_per_worker must be >= 0 or auto (got -0.5)"),
        ("runtime.placement=strict_spread", "runtime.placement: 'strict_spread' is not one of spread, pack"),
        ("runtime.placement_timeout_s=0", "runtime.placement_timeout_s must be > 0 (got 0.0)"),
        ("runtime.accelerator_type=accelerator_type:A100", "runtime.accelerator_type must be an accelerator name"),
    ],
)
def test_bad_values_name_the_key(override, problem):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
