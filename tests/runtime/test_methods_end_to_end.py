"""The capability matrix: method x privacy mode x LoRA variant x backend.

For every combination the config check (what `fedsim validate` runs) accepts it exactly when the method declares
it supports the privacy mode and the variant (the backend never matters), and rejects it naming the key
otherwise. Every supported combination then runs end to end on tiny-bert + synthetic data on the local backend
(two short rounds each: what is tested is that nothing fails later than the config check). The Ray backend runs
the same worker, server and mechanism code in actors; it runs every method once, in its most demanding supported
setting (DP, and VeRA where supported), plus client-level DP once, to keep the suite inside CI's budget.
"""

from __future__ import annotations

import itertools
import json
import math

import pyarrow.parquet as pq
import pytest

from fedsim.errors import ConfigError
from fedsim.methods.base import LORA_VARIANTS, PRIVACY_MODES, all_capabilities
from fedsim.simulation import run_simulation
from fedsim.validation import load_config

CAPS = all_capabilities()
BACKENDS = ("local", "ray")
MODES = {
    "none": [],
    "sample": ["privacy.mode=sample", "privacy.epsilon=8", "privacy.accountant=rdp"],
    "client": ["privacy.mode=client", "privacy.epsilon=8", "privacy.accountant=rdp"],
}
assert set(MODES) == PRIVACY_MODES
MATRIX = list(itertools.product(sorted(CAPS), sorted(MODES), sorted(LORA_VARIANTS), BACKENDS))


def supported(method: str, mode: str, variant: str) -> bool:
    caps = CAPS[method]
    return mode in caps.privacy_modes and variant in caps.variants


def _overrides(method: str, mode: str, variant: str, backend: str) -> list[str]:
    short = ["federation.rounds=2", "federation.local_steps=1", "federation.clients_per_round=3"]
    return [f"runtime.backend={backend}", f"method.name={method}", f"lora.variant={variant}", *MODES[mode], *short]


def test_the_matrix_covers_every_method_and_both_outcomes():
    assert len(MATRIX) == len(CAPS) * 3 * 3 * 2
    assert any(supported(*c[:3]) for c in MATRIX) and any(not supported(*c[:3]) for c in MATRIX)
    assert not supported("as_lora", "client", "lora") and not supported("flexlora", "none", "vera")
    assert supported("fedsa_lora", "client", "vera") and supported("fedsvd", "sample", "rslora")


@pytest.mark.parametrize(("method", "mode", "variant", "backend"), MATRIX)
def test_validate_accepts_exactly_the_supported_combinations(method, mode, variant, backend):
    overrides = _overrides(method, mode, variant, backend)
    if supported(method, mode, variant):
        cfg, _ = load_config("tiny", overrides)
        assert (cfg.method.name, cfg.privacy.mode, cfg.lora.variant) == (method, mode, variant)
        return
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    caps = CAPS[method]
    keys = {
        "privacy.mode" if mode not in caps.privacy_modes else None,
        "lora.variant" if variant not in caps.variants else None,
    }
    keys.discard(None)
    assert len(err.value.problems) == len(keys)  # one line per unsupported choice, nothing else
    assert all(any(p.startswith(k) and method in p for p in err.value.problems) for k in keys)


def _check(out, rounds: int, per_layer_choices: bool) -> None:
    table = pq.read_table(out / "rounds.parquet").to_pylist()
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    assert [r["round"] for r in table] == list(range(1, rounds + 1))
    assert all(c["status"] == "ok" for c in clients)
    assert math.isfinite(table[-1]["eval_loss"]) and 0.0 <= table[-1]["eval_accuracy"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())  # the untrained model, evaluated before round 1
    assert math.isfinite(summary["initial_eval_loss"]) and 0.0 <= summary["initial_eval_accuracy"] <= 1.0
    assert all(r["bytes_up"] > 0 for r in table)
    roles = pq.read_table(out / "roles.parquet").to_pylist()
    assert {r["round"] for r in roles} == set(range(1, rounds + 1))
    assert {r["factor"] for r in roles} == {"A", "B"} and {r["role"] for r in roles} <= {"shared", "kept", "frozen"}
    if per_layer_choices:  # each layer shares exactly one factor per round
        for t in range(1, rounds + 1):
            shared = [(r["layer"], r["factor"]) for r in roles if r["round"] == t and r["role"] == "shared"]
            assert len(shared) == len({layer for layer, _ in shared}) > 0


RUNS = [c for c in MATRIX if supported(*c[:3])]


@pytest.mark.parametrize(("method", "mode", "variant"), [c[:3] for c in RUNS if c[3] == "local"])
def test_supported_combination_runs_on_the_local_backend(tmp_path, method, mode, variant):
    cfg, _ = load_config("tiny", _overrides(method, mode, variant, "local"))
    run_simulation(cfg, tmp_path / "run", progress=False)
    _check(tmp_path / "run", cfg.federation.rounds, CAPS[method].per_layer_choices)


def _hardest(method: str) -> tuple[str, str, str]:
    caps = CAPS[method]
    return method, "sample", "vera" if "vera" in caps.variants else "rslora"


RAY_RUNS = [_hardest(m) for m in sorted(CAPS)] + [("fedsa_lora", "client", "lora")]


def test_every_ray_run_is_a_supported_combination():
    assert all(supported(*c) for c in RAY_RUNS) and {c[0] for c in RAY_RUNS} == set(CAPS)


@pytest.mark.ray
@pytest.mark.parametrize(("method", "mode", "variant"), RAY_RUNS)
def test_supported_combination_runs_on_ray(tmp_path, ray_cluster, method, mode, variant):
    cfg, _ = load_config("tiny", [*_overrides(method, mode, variant, "ray"), "runtime.workers=2"])
    run_simulation(cfg, tmp_path / "run", progress=False)
    _check(tmp_path / "run", cfg.federation.rounds, CAPS[method].per_layer_choices)


# ---------------------------------------------------------------------------------------------------- causal LM
# task.kind causal_lm (tiny-llama on synthetic arithmetic, the tiny-lm preset): every method under sample-level DP
# (Opacus per-sequence gradients), the four the papers compare without DP too, and client-level DP once.
LM_RUNS = sorted(
    {(m, "sample") for m in CAPS}
    | {(m, "none") for m in ("fedavg_lora", "ffa_lora", "fedsa_lora", "as_lora")}
    | {("fedavg_lora", "client")}
)


@pytest.mark.parametrize(("method", "mode"), LM_RUNS)
def test_causal_lm_runs_on_the_local_backend(tmp_path, method, mode):
    short = ["federation.local_steps=1", "data.synthetic_examples=60", "federation.clients_per_round=3"]
    cfg, _ = load_config("tiny-lm", [f"method.name={method}", *MODES[mode], *short])
    assert cfg.task.kind == "causal_lm" and cfg.model.name == "tiny-llama"
    summary = run_simulation(cfg, tmp_path / "run", progress=False)
    _check(tmp_path / "run", cfg.federation.rounds, CAPS[method].per_layer_choices)
    table = pq.read_table(tmp_path / "run" / "rounds.parquet").to_pylist()
    assert all(math.isfinite(r["eval_perplexity"]) and r["eval_perplexity"] > 1 for r in table)
    assert summary["task"] == "causal_lm" and math.isfinite(summary["initial_eval_loss"])
    assert 0.0 <= summary["initial_eval_accuracy"] <= 1.0
