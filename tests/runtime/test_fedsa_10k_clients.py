"""FedSA-LoRA with 10,000 clients: the ClientStore keeps the B of exactly the participants, spilled to disk exactly."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch

from fedsim.server.checkpoint import latest_checkpoint_dir, read_checkpoint
from fedsim.server.client_store import ClientStore
from fedsim.simulation import run_simulation
from fedsim.validation import load_config


def test_fedsa_10000_clients_keeps_the_participants_b_and_spilled_reads_are_exact(tmp_path, monkeypatch):
    cfg, _ = load_config(
        "tiny",
        [
            "runtime.backend=local",
            "runtime.workers=1",
            "method.name=fedsa_lora",
            "federation.clients=10000",
            "federation.clients_per_round=12",
            "federation.rounds=3",
            "federation.local_steps=1",
            "federation.eval_every=3",
            "data.synthetic_examples=10500",  # one or two training examples per client
            "data.test_fraction=0.02",
            "data.personal_fraction=0",  # no 10,000 personal evaluations
            "data.partition.kind=iid",
            "runtime.client_store.memory_mb=0.02",  # ~4 clients' B + head: the rest must spill
        ],
    )
    stored: dict[int, dict[str, torch.Tensor]] = {}  # the last state each client handed to the store
    real_put = ClientStore.put

    def recording_put(self, client_id, state):
        stored[client_id] = {k: v.detach().clone() for k, v in state.items()}
        real_put(self, client_id, state)

    monkeypatch.setattr(ClientStore, "put", recording_put)
    seen: dict = {}

    def inspect(backend):
        store = backend.store
        seen["ids"] = backend.kept_client_ids()
        seen["spilled"] = store.spilled_client_ids()
        seen["memory"] = store.memory_bytes()
        seen["states"] = {cid: backend.kept_state(cid) for cid in seen["ids"]}

    out = tmp_path / "big"
    run_simulation(cfg, out, progress=False, inspect=inspect)
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    took_part = sorted({c["client_id"] for c in clients if c["status"] == "ok"})
    assert len(clients) == 36 and 30 <= len(took_part) <= 36
    assert seen["ids"] == took_part == sorted(stored)
    assert seen["memory"] <= 0.02 * 2**20
    assert len(seen["spilled"]) >= len(took_part) - 4  # most clients live on disk only
    for cid in took_part:  # spilled or not, every client reads back exactly what it stored
        got, want = seen["states"][cid], stored[cid]
        assert set(got) == set(want) and any(k.endswith("lora_B") for k in got)
        assert all(k.endswith("lora_B") or k.startswith("head.") for k in got)
        assert all(torch.equal(got[k], want[k]) for k in want)
    b_key = next(k for k in stored[took_part[0]] if k.endswith("lora_B"))
    assert not torch.equal(stored[took_part[0]][b_key], stored[took_part[1]][b_key])  # really per client

    ckpt = read_checkpoint(latest_checkpoint_dir(out))  # the final checkpoint streamed the same files
    assert ckpt.round == 3 and sorted(ckpt.client_states) == took_part
    spilled = seen["spilled"][0]
    assert all(torch.equal(ckpt.client_states[spilled][k], v) for k, v in stored[spilled].items())
    assert not (out / "client_store").exists()  # the spill folder is removed at the end of the run
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    assert all(0 < r["worker_busy_frac"] <= 1 for r in rounds)
