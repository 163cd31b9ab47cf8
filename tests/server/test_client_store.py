"""ClientStore: byte budget with LRU spilling, exact re-reads, round versions, streaming snapshots."""

from __future__ import annotations

import os

import pytest
import torch

from fedsim.server.checkpoint import Checkpoint, StoredClients, read_checkpoint, write_checkpoint
from fedsim.server.client_store import ClientStore, client_store_args
from fedsim.validation import load_config

NUMEL = 256  # float32: 1 KiB per state
STATE_BYTES = NUMEL * 4


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"l.lora_B": torch.randn(NUMEL // 8, 8, generator=g)}


def _mb(states: float) -> float:
    return states * STATE_BYTES / 2**20


def _equal(a, b) -> bool:
    return a is not None and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_budget_is_counted_in_bytes_and_least_recently_used_clients_spill(tmp_path):
    store = ClientStore(memory_mb=_mb(3), spill_dir=tmp_path)
    states = {c: _state(c) for c in range(6)}
    for c in range(5):
        store.put(c, states[c])
    assert store.memory_bytes() == 3 * STATE_BYTES
    assert store.spilled_client_ids() == [0, 1]
    assert store.get(2) is not None  # 2 becomes the most recently used ...
    store.put(5, states[5])  # ... so 3 is evicted, not 2
    assert store.spilled_client_ids() == [0, 1, 3] and store.memory_bytes() <= 3 * STATE_BYTES
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"client_{c}.safetensors" for c in (0, 1, 3)]
    assert not list(tmp_path.glob(".*.tmp"))
    assert all(_equal(store.get(c), s) for c, s in states.items())
    assert store.client_ids() == list(range(6)) and len(store) == 6 and 3 in store and 99 not in store
    assert store.get(99) is None


def test_zero_budget_keeps_everything_on_disk_and_an_oversized_state_goes_straight_there(tmp_path):
    store = ClientStore(memory_mb=0, spill_dir=tmp_path / "zero")
    store.put(7, _state(7))
    assert store.memory_bytes() == 0 and store.spilled_client_ids() == [7]
    assert _equal(store.get(7), _state(7))
    store = ClientStore(memory_mb=_mb(2), spill_dir=tmp_path / "two")
    store.put(0, _state(0))
    big = {"w": torch.arange(3 * NUMEL, dtype=torch.float32)}
    store.put(1, big)
    assert store.spilled_client_ids() == [1] and store.memory_bytes() == STATE_BYTES  # client 0 stays in memory
    assert _equal(store.get(1), big)


def test_re_put_replaces_the_spilled_file_and_the_stored_copy_is_independent(tmp_path):
    store = ClientStore(memory_mb=0, spill_dir=tmp_path)
    mine = _state(1)
    store.put(1, mine)
    mine["l.lora_B"].add_(1.0)  # the caller's tensor changes; the store's does not
    assert _equal(store.get(1), _state(1))
    store.put(1, _state(2))
    assert _equal(store.get(1), _state(2)) and len(list(tmp_path.glob("client_1.safetensors"))) == 1


def test_temporary_spill_folder_is_removed_on_close_and_leftovers_of_a_spill_folder_are_cleared(tmp_path):
    store = ClientStore(memory_mb=0)
    store.put(0, _state(0))
    folder = store.spill_dir
    assert folder is not None and (folder / "client_0.safetensors").is_file()
    store.close()
    assert not folder.exists()
    (tmp_path / "client_9.safetensors").write_bytes(b"stale")
    (tmp_path / "other.txt").write_text("not ours")
    store = ClientStore(memory_mb=1, spill_dir=tmp_path)
    assert store.get(9) is None and not (tmp_path / "client_9.safetensors").exists()
    assert (tmp_path / "other.txt").is_file()
    with pytest.raises(ValueError, match="memory_mb"):
        ClientStore(memory_mb=-1, spill_dir=tmp_path)


@pytest.mark.parametrize("memory_mb", [None, 0.0], ids=["in-memory", "spilled"])
def test_a_client_re_run_in_the_same_round_starts_from_the_pre_round_version(tmp_path, memory_mb):
    store = ClientStore(memory_mb=memory_mb, spill_dir=tmp_path if memory_mb is not None else None)
    led = [{"accountant": "rdp", "history": [[1.0, 0.1, n]]} for n in range(4)]
    store.put_client(3, _state(1), led[1], round=1)  # first round: nothing before
    assert store.get_client(3, True, round=1) == (None, None)
    assert _equal(store.get_client(3, True)[0], _state(1))
    store.put_client(3, _state(2), led[2], round=2)
    store.put_client(3, _state(3), led[3], round=2)  # the re-run of round 2 writes again
    kept, ledger = store.get_client(3, True, round=2)
    assert _equal(kept, _state(1)) and ledger == led[1]  # still as of the start of round 2
    kept, ledger = store.get_client(3, True)
    assert _equal(kept, _state(3)) and ledger == led[3]
    assert store.get_client(4, True, round=2) == (None, None)  # never written
    assert store.client_ids() == [3]
    store.put_client(5, _state(5), None, round=3)  # a newer round drops round 2's versions
    kept, ledger = store.get_client(3, True, round=3)
    assert _equal(kept, _state(3)) and ledger == led[3]
    assert not list(tmp_path.glob("prev_*"))
    with pytest.raises(ValueError, match="round 3 only"):
        store.get_client(3, True, round=2)


def test_ledger_only_and_tensor_only_puts_are_versioned_separately():
    store = ClientStore()
    store.put_client(1, _state(1), {"h": 1})
    store.put_client(1, None, {"h": 2}, round=5)  # FFA-like: ledger only
    assert _equal(store.get_client(1, True, round=5)[0], _state(1))
    assert store.get_client(1, False, round=5) == (None, {"h": 1})
    store.put_client(1, _state(2), None, round=5)
    kept, ledger = store.get_client(1, True, round=5)
    assert _equal(kept, _state(1)) and ledger == {"h": 1}
    kept, ledger = store.get_client(1, True)  # round=None: the current version, as before
    assert _equal(kept, _state(2)) and ledger == {"h": 2}


def test_versions_count_against_the_budget(tmp_path):
    store = ClientStore(memory_mb=_mb(2), spill_dir=tmp_path)
    for c in range(2):
        store.put_client(c, _state(c), None, round=1)
    for c in range(2):
        store.put_client(c, _state(10 + c), None, round=2)
    assert store.memory_bytes() <= 2 * STATE_BYTES
    assert all(_equal(store.get_client(c, True, round=2)[0], _state(c)) for c in range(2))
    assert all(_equal(store.get(c), _state(10 + c)) for c in range(2))


def test_snapshot_streams_into_a_checkpoint_and_restore_links_it_back_lazily(tmp_path):
    run = tmp_path / "run"
    store = ClientStore(memory_mb=_mb(2), spill_dir=run / "client_store")
    states = {c: _state(c) for c in range(5)}
    for c, s in states.items():
        store.put_client(c, s, {"h": c})
    snap, ledgers = store.snapshot()
    assert isinstance(snap, StoredClients) and list(snap) == list(range(5)) and ledgers[4] == {"h": 4}
    assert store.memory_bytes() <= 2 * STATE_BYTES  # the snapshot read nothing into memory
    path = write_checkpoint(run, Checkpoint(1, {"g": torch.zeros(1)}, {}, snap, ledgers))
    assert not snap.folder.exists() and (path / "clients" / "client_4.safetensors").is_file()
    store.put(0, _state(100))  # later changes do not reach the checkpoint
    ckpt = read_checkpoint(path)
    assert isinstance(ckpt.client_states, StoredClients) and ckpt.ledgers == {c: {"h": c} for c in range(5)}
    assert all(_equal(ckpt.client_states[c], s) for c, s in states.items())

    fresh = ClientStore(memory_mb=_mb(2), spill_dir=tmp_path / "other")
    fresh.put(42, _state(42))
    fresh.restore(ckpt.client_states, ckpt.ledgers)
    assert fresh.client_ids() == list(range(5)) and fresh.memory_bytes() == 0  # linked, not read
    assert os.path.samefile(tmp_path / "other" / "client_3.safetensors", path / "clients" / "client_3.safetensors")
    assert all(_equal(fresh.get(c), s) for c, s in states.items()) and fresh.get_ledger(2) == {"h": 2}
    unbounded = ClientStore()
    unbounded.restore(ckpt.client_states, ckpt.ledgers)  # no spill folder: read into memory
    assert all(_equal(unbounded.get(c), s) for c, s in states.items())
    snap2, _ = unbounded.snapshot()
    assert isinstance(snap2, dict) and set(snap2) == set(range(5))


def test_client_store_args_read_the_budget_and_spill_under_the_run_folder(tmp_path):
    cfg, _ = load_config("tiny", ["runtime.client_store.memory_mb=0"])
    store = ClientStore(*client_store_args(cfg, tmp_path))
    assert store.spill_dir == tmp_path / "client_store"
    store.put(1, _state(1))
    assert (tmp_path / "client_store" / "client_1.safetensors").is_file() and store.memory_bytes() == 0
