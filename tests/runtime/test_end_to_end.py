"""Whole runs through run_simulation on the local and Ray backends (tiny-bert + synthetic)."""

from __future__ import annotations

import gc
import json

import pyarrow.parquet as pq
import pytest
import torch

from fedsim.data.federated import FederatedData
from fedsim.simulation import run_simulation
from fedsim.validation import load_config

ROUND_COLUMNS = {
    "round",
    "method",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "personal_accuracy",
    "clients",
    "failed_clients",
    "bytes_up",
    "bytes_down",
    "epsilon_max",
    "wall_s",
}
CLIENT_COLUMNS = {"round", "client_id", "worker_id", "examples", "steps", "train_loss", "epsilon", "seconds", "status"}


def _cfg(*overrides: str):
    cfg, _ = load_config("tiny", ["runtime.backend=local", "runtime.workers=1", *overrides])
    return cfg


def test_local_run_writes_the_output_contract_and_a_loadable_peft_adapter(tmp_path):
    from peft import PeftModel

    from fedsim.data.sources import load_source
    from fedsim.model.build import build_base_model, build_tokenizer

    cfg = _cfg("method.name=ffa_lora")
    out = tmp_path / "run"
    summary = run_simulation(cfg, out, progress=False)
    for name in (
        "config.yaml",
        "summary.json",
        "rounds.parquet",
        "clients.parquet",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    assert ROUND_COLUMNS <= set(rounds[0]) and [r["round"] for r in rounds] == [1, 2, 3]
    assert (
        rounds[-1]["eval_accuracy"]
        == summary["final_eval_accuracy"]
        == json.loads((out / "summary.json").read_text())["final_eval_accuracy"]
    )
    assert rounds[0]["epsilon_max"] is None
    # non-personal methods too: the global model on every client's own held-out examples
    assert 0.0 <= rounds[0]["personal_accuracy"] <= 1.0
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    assert CLIENT_COLUMNS <= set(clients[0])
    assert len(clients) == cfg.federation.rounds * cfg.federation.clients_per_round
    assert all(c["status"] == "ok" and c["steps"] == cfg.federation.local_steps for c in clients)
    # bytes_up: FFA uploads B (+ head) only
    assert rounds[0]["bytes_up"] == sum(c["bytes_up"] for c in clients if c["round"] == 1) > 0

    # the exported adapter loads into a fresh base with PEFT
    ds = load_source(cfg.data, cfg.seed)
    tok = build_tokenizer(cfg.model, ds.texts)
    base = build_base_model(cfg.model, ds.num_labels, tok, cfg.seed)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    batch = tok(["hello world"], return_tensors="pt", padding="max_length", max_length=cfg.data.max_length)
    assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.ray
@pytest.mark.parametrize("privacy", [[], ["privacy.mode=sample", "privacy.noise_multiplier=0.7"]], ids=["no-dp", "dp"])
def test_same_metrics_with_one_or_two_ray_workers_and_the_local_backend(tmp_path, ray_cluster, privacy):
    columns = []
    for i, over in enumerate(
        (
            ["runtime.backend=local"],
            ["runtime.backend=ray", "runtime.workers=1"],
            ["runtime.backend=ray", "runtime.workers=2"],
        )
    ):
        cfg = _cfg("method.name=fedsa_lora", *privacy, *over)
        run_simulation(cfg, tmp_path / f"r{i}", progress=False)
        t = pq.read_table(tmp_path / f"r{i}" / "rounds.parquet").to_pydict()
        columns.append((t["eval_accuracy"], t["eval_loss"], t["personal_accuracy"], t["train_loss"], t["epsilon_max"]))
    for other in columns[1:]:
        for a, b in zip(columns[0], other, strict=True):
            assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.ray
def test_thousand_clients_fedsa_on_ray_stores_exactly_the_b_of_participants(tmp_path, ray_cluster):
    cfg = _cfg(
        "runtime.backend=ray",
        "runtime.workers=2",
        "method.name=fedsa_lora",
        "federation.clients=1000",
        "federation.clients_per_round=20",
        "federation.rounds=3",
        "federation.local_steps=1",
        "data.synthetic_examples=3000",
        "data.partition.kind=iid",
        "federation.eval_every=3",
    )
    seen = {}

    def inspect(backend):
        seen["ids"] = backend.kept_client_ids()
        seen["state"] = backend.kept_state(seen["ids"][0])
        gc.collect()  # this run's token table lives in the object store only, not also in the driver
        ours = (o for o in gc.get_objects() if type(o) is FederatedData and o.num_clients == 1000)
        seen["driver_copies"] = sum(len(o.input_ids) == 3000 for o in ours)

    run_simulation(cfg, tmp_path / "big", progress=False, inspect=inspect)
    clients = pq.read_table(tmp_path / "big" / "clients.parquet").to_pylist()
    took_part = sorted({c["client_id"] for c in clients if c["status"] == "ok"})
    assert len(clients) == 60 and 40 <= len(took_part) <= 60
    assert seen["ids"] == took_part
    assert seen["state"] and all(k.endswith("lora_B") or k.startswith("head.") for k in seen["state"])
    assert any(k.endswith("lora_B") for k in seen["state"])
    assert seen["driver_copies"] == 0
