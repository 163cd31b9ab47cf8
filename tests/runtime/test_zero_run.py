"""An end-to-end Ray run with a ZeRO-3 worker group of two ranks (tiny-llama, FFA-LoRA, sample-level DP): it
completes with the same metrics, clients.parquet and privacy ledgers as the one-process run of the same config,
and its adapter/ loads with PEFT over AutoModelForCausalLM. Bad input exits 2 naming the key."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

pytest.importorskip("deepspeed")

from fedsim.errors import ConfigError, UserError  # noqa: E402
from fedsim.simulation import run_simulation  # noqa: E402
from fedsim.validation import load_config

COMMON = [
    "method.name=ffa_lora",
    "privacy.mode=sample",
    "privacy.noise_multiplier=1.0",
    "privacy.clip=1.0",
    "data.synthetic_examples=60",
    "federation.rounds=2",
    "runtime.cpus_per_worker=1",
    "runtime.workers=1",
]
ZERO = ["runtime.backend=ray", "runtime.zero.stage=3", "runtime.zero.ranks=2"]


def _ledgers(run) -> dict:
    from fedsim.server.checkpoint import latest_checkpoint_dir

    ledgers = json.loads((latest_checkpoint_dir(run) / "state.json").read_text())["ledgers"]
    assert ledgers  # every client that trained has one
    return ledgers


@pytest.mark.ray
@pytest.mark.slow
def test_zero3_group_of_two_runs_like_the_one_process_worker(tmp_path, ray_cluster):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedsim.data.sources import load_source
    from fedsim.model.build import build_base_model, build_tokenizer

    seen: list[str] = []
    local, _ = load_config("tiny-lm", [*COMMON, "runtime.backend=local"])
    zero, _ = load_config("tiny-lm", [*COMMON, *ZERO])
    run_simulation(local, tmp_path / "local", progress=False)
    run_simulation(zero, tmp_path / "zero", progress=False, inspect=lambda b: seen.append(b.describe()))
    assert "ZeRO-3 group(s) of 2 ranks" in seen[0]

    a = pq.read_table(tmp_path / "local" / "rounds.parquet").to_pydict()
    b = pq.read_table(tmp_path / "zero" / "rounds.parquet").to_pydict()
    for col in ("train_loss", "eval_loss", "eval_accuracy", "epsilon_max", "clients", "failed_clients"):
        assert a[col] == pytest.approx(b[col], abs=1e-5), col
    ca = pq.read_table(tmp_path / "local" / "clients.parquet").to_pandas().sort_values(["round", "client_id"])
    cb = pq.read_table(tmp_path / "zero" / "clients.parquet").to_pandas().sort_values(["round", "client_id"])
    assert list(ca.columns) == list(cb.columns)
    assert (cb["status"] == "ok").all()
    for col in ("client_id", "steps", "examples", "status"):
        assert ca[col].tolist() == cb[col].tolist(), col
    assert ca["epsilon"].tolist() == pytest.approx(cb["epsilon"].tolist(), abs=1e-9)
    assert ca["train_loss"].tolist() == pytest.approx(cb["train_loss"].tolist(), abs=1e-5)
    assert _ledgers(tmp_path / "local") == _ledgers(tmp_path / "zero")

    ds = load_source(zero.data, zero.seed, zero.task.kind)
    tok = build_tokenizer(zero.model, ds.texts)
    build_base_model(zero.model, 2, tok, zero.seed, task="causal_lm").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, tmp_path / "zero" / "adapter")
    assert any("lora_B" in name for name, _ in loaded.named_parameters())


@pytest.mark.ray
def test_more_ranks_than_the_cluster_can_place_is_refused_before_training(tmp_path, ray_cluster):
    cfg, _ = load_config("tiny-lm", [*COMMON, *ZERO, "runtime.zero.ranks=64"])
    with pytest.raises(UserError, match="runtime.zero.ranks"):
        run_simulation(cfg, tmp_path / "run", progress=False)


def test_zero3_on_the_local_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="runtime.zero.stage"):
        load_config("tiny-lm", ["runtime.backend=local", "runtime.zero.stage=3"])


@pytest.mark.parametrize("method", ["fedex_lora", "flora"])
def test_methods_that_fold_into_the_base_are_refused_with_zero_naming_the_alternatives(method):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-lm", [*ZERO, f"method.name={method}"])
    (line,) = [p for p in err.value.problems if p.startswith("runtime.zero.stage")]
    assert f"method.name {method}" in line and "ffa_lora" in line and "flora," not in line
    load_config("tiny-lm", [*ZERO, "method.name=fedsvd", "lora.dropout=0"])  # a product method that does not fold


def test_lora_dropout_with_several_ranks_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config("tiny-lm", [*ZERO, "lora.dropout=0.1"])
    assert any(p.startswith("lora.dropout: 0.1 with runtime.zero.ranks 2") for p in err.value.problems)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["runtime.zero.stage=3"], "runtime.zero.stage"),  # the local backend
        (["runtime.backend=ray", "runtime.zero.stage=3", "runtime.zero.ranks=64"], "runtime.zero.ranks"),
    ],
    ids=["stage3_local_backend", "more_ranks_than_cpus"],
)
def test_bad_zero_input_exits_2_naming_the_key_and_writes_nothing(tmp_path, overrides, key):
    import subprocess
    import sys

    sets = [a for o in overrides for a in ("--set", o)]
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "run", "tiny-lm", *sets, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr
    assert not out.exists()


def test_zero_capacity_counts_workers_times_ranks():
    from fedsim.config.schema import RuntimeConfig, ZeroConfig
    from fedsim.runtime.placement import zero_capacity_problem

    rt = RuntimeConfig(workers=2, zero=ZeroConfig(stage=3, ranks=2))
    assert zero_capacity_problem(rt, [{"CPU": 4.0}], {"CPU": 1.0}) is None
    problem = zero_capacity_problem(rt, [{"CPU": 2.0}, {"CPU": 1.0}], {"CPU": 1.0})
    assert problem is not None and "runtime.zero.ranks" in problem and "can place 3" in problem
