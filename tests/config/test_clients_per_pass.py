"""runtime.clients_per_pass at config time: bad values and combinations a fused pass cannot serve exit 2 naming the
keys and the fix (`fedsim validate`, `fedsim run`), `auto` is accepted everywhere, `fedsim methods` shows which
methods cannot batch."""

from __future__ import annotations

import pytest

from fedsim.cli import main
from fedsim.methods.base import all_capabilities
from fedsim.methods.batching import batching_blockers
from fedsim.validation import load_config

DETERMINISTIC = "model.base_dropout=false"


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["runtime.clients_per_pass=0"], ["runtime.clients_per_pass must be >= 1 or auto (got 0)"]),
        (["runtime.clients_per_pass=-2"], ["runtime.clients_per_pass must be >= 1 or auto (got -2)"]),
        (["runtime.clients_per_pass=1.5"], ["runtime.clients_per_pass: expected an integer or 'auto', got 1.5"]),
        (["runtime.clients_per_pass=many"], ["runtime.clients_per_pass: expected an integer or 'auto'"]),
        (["runtime.clients_per_pass=4"], ["runtime.clients_per_pass: 4", "model.base_dropout: false"]),
        (
            ["runtime.clients_per_pass=4", DETERMINISTIC, "lora.variant=vera"],
            ["runtime.clients_per_pass: 4", "lora.variant: vera", "use lora.variant lora or rslora"],
        ),
        (
            ["runtime.clients_per_pass=4", DETERMINISTIC, "method.name=fedex_lora"],
            ["runtime.clients_per_pass: 4", "method.name: fedex_lora", "residual"],
        ),
        (
            ["runtime.clients_per_pass=2", DETERMINISTIC, "method.name=flora"],
            ["runtime.clients_per_pass: 2", "method.name: flora"],
        ),
        (
            ["runtime.clients_per_pass=4", DETERMINISTIC, "lora.dropout=0.1"],
            ["runtime.clients_per_pass: 4", "lora.dropout: 0.1", "set lora.dropout: 0"],
        ),
    ],
)
def test_bad_clients_per_pass_exits_2_naming_the_keys(capsys, overrides, fragments):
    args = [a for o in overrides for a in ("--set", o)]
    assert main(["validate", "tiny", *args]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    if "does not work" in err:
        assert "or set runtime.clients_per_pass: 1" in err  # the fix, besides the other key's


def test_zero_worker_groups_cannot_batch(capsys):
    sets = ["runtime.backend=ray", "runtime.zero.stage=3", "runtime.clients_per_pass=2", DETERMINISTIC]
    assert main(["validate", "tiny-lm", *[a for s in sets for a in ("--set", s)]]) == 2
    assert "runtime.clients_per_pass: 2 does not work with runtime.zero.stage: 3" in capsys.readouterr().err


def test_run_refuses_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "tiny", "--out", str(out), "--set", "runtime.clients_per_pass=8"]) == 2
    assert "model.base_dropout" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["runtime.clients_per_pass=8", DETERMINISTIC],
        [
            "runtime.clients_per_pass=3",
            DETERMINISTIC,
            "method.name=as_lora",
            "privacy.mode=sample",
            "privacy.epsilon=8",
        ],
        ["runtime.clients_per_pass=auto"],  # auto falls back to 1 at run time instead
        ["runtime.clients_per_pass=auto", "method.name=fedex_lora", "lora.variant=rslora"],
    ],
)
def test_valid_settings_pass(overrides):
    cfg, _ = load_config("tiny", overrides)
    assert cfg.runtime.clients_per_pass in (8, 3, "auto")


def test_blockers_name_every_reason():
    cfg, _ = load_config("tiny", ["method.name=flora", "lora.dropout=0.2"])
    keys = [line.split(":")[0] for line in batching_blockers(cfg)]
    assert keys == ["model.base_dropout", "lora.dropout", "method.name"]
    assert batching_blockers(load_config("tiny", [DETERMINISTIC])[0]) == []


def test_methods_command_shows_which_methods_train_one_client_per_pass(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    caps = all_capabilities()
    for line in lines:
        assert ("one client per pass" in line) == (not caps[line.split()[0]].batches)
    assert not caps["fedex_lora"].batches and not caps["flora"].batches and caps["as_lora"].batches
