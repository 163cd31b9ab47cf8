from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch

from fedsim.simulation import run_simulation
from fedsim.validation import load_config
from tests.metrics.reference_similarity import mean_pairwise_cosine, similarity_rows


def test_mean_pairwise_cosine_hand_computed():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert mean_pairwise_cosine([e1, e1 * 3]) == pytest.approx(1.0)
    assert mean_pairwise_cosine([e1, e2]) == pytest.approx(0.0)
    assert mean_pairwise_cosine([e1, -e1]) == pytest.approx(-1.0)
    # pairs (e1,e1)=1, (e1,e2)=0, (e1,e2)=0 -> mean 1/3
    assert mean_pairwise_cosine([e1, e1, e2]) == pytest.approx(1 / 3)
    assert mean_pairwise_cosine([e1]) is None
    assert mean_pairwise_cosine([e1, torch.zeros(2)]) == 0.0


def test_similarity_rows_skip_heads_and_missing_keys():
    a = {"l.lora_A": torch.ones(2, 3), "l.lora_B": torch.ones(3, 2), "head.w": torch.ones(2)}
    b = {"l.lora_A": torch.ones(2, 3), "head.w": torch.ones(2)}
    rows = similarity_rows(4, [a, b], ["l.lora_A", "l.lora_B", "head.w"])
    assert rows == [{"round": 4, "layer": "l", "factor": "A", "similarity": pytest.approx(1.0), "clients": 2}]


@pytest.mark.parametrize(("method", "factors"), [("fedsa_lora", {"A", "B"}), ("ffa_lora", {"B"})])
def test_runs_write_similarity_of_trained_factors(tmp_path, method, factors):
    cfg, _ = load_config("tiny", ["runtime.backend=local", f"method.name={method}", "analysis.similarity=true"])
    run_simulation(cfg, tmp_path / "run", progress=False)
    rows = pq.read_table(tmp_path / "run" / "similarity.parquet").to_pylist()
    assert {r["factor"] for r in rows} == factors
    assert {r["round"] for r in rows} == set(range(1, cfg.federation.rounds + 1))
    assert all(r["clients"] == cfg.federation.clients_per_round for r in rows)
    assert all(math.isfinite(r["similarity"]) and -1 - 1e-9 <= r["similarity"] <= 1 + 1e-9 for r in rows)


def test_kept_factor_similarity_equals_the_pairwise_reference_over_the_clients_kept_tensors(tmp_path):
    """FedSA-LoRA keeps B on the clients: its similarity rows (computed streamed, beside the uploads) equal the
    direct pairwise cosine over the B each client kept in the last round."""
    cfg, _ = load_config(
        "tiny", ["runtime.backend=local", "method.name=fedsa_lora", "analysis.similarity=true", "federation.rounds=2"]
    )
    kept = {}

    def grab(backend):
        kept.update({c: backend.kept_state(c) for c in backend.kept_client_ids()})

    run_simulation(cfg, tmp_path / "run", progress=False, inspect=grab)
    clients = pq.read_table(tmp_path / "run" / "clients.parquet").to_pylist()
    last = sorted(c["client_id"] for c in clients if c["round"] == 2 and c["status"] == "ok")
    rows = [r for r in pq.read_table(tmp_path / "run" / "similarity.parquet").to_pylist() if r["round"] == 2]
    b_keys = sorted(k for k in kept[last[0]] if k.endswith("lora_B"))
    want = {(r["layer"], r["factor"]): r for r in similarity_rows(2, [kept[c] for c in last], b_keys)}
    got = {(r["layer"], r["factor"]): r for r in rows if r["factor"] == "B"}
    assert set(got) == set(want) and want
    for key, row in got.items():
        assert row["clients"] == len(last)
        assert row["similarity"] == pytest.approx(want[key]["similarity"], abs=1e-9)
