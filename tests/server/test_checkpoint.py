"""Checkpoints: atomic writes (a kill mid-write keeps the previous one), exact round trip, pruning."""

from __future__ import annotations

import pytest
import torch

from fedsim.server import checkpoint as ck
from fedsim.server.checkpoint import Checkpoint, latest_checkpoint_dir, read_checkpoint, write_checkpoint


def _ckpt(round: int) -> Checkpoint:
    g = torch.Generator().manual_seed(round)
    return Checkpoint(
        round=round,
        global_state={"l.lora_A": torch.randn(2, 4, generator=g), "l.lora_B": torch.randn(4, 2, generator=g)},
        server_state={"ema": {"l": {"A": 0.5, "B": None}}, "choices": {"1": {"l": "B"}}},
        client_states={3: {"l.lora_B": torch.randn(4, 2, generator=g)}, 11: {"l.lora_B": torch.zeros(4, 2)}},
        ledgers={3: {"accountant": "rdp", "history": [[1.0, 0.1, 3]]}},
        driver={"totals": {"bytes_up": 10}, "best_acc": 0.5},
    )


def test_round_trip_is_exact(tmp_path):
    want = _ckpt(2)
    path = write_checkpoint(tmp_path, want)
    got = read_checkpoint(path)
    assert got.round == 2 and got.server_state == want.server_state and got.driver == want.driver
    assert got.ledgers == want.ledgers
    assert all(torch.equal(got.global_state[k], v) for k, v in want.global_state.items())
    assert set(got.client_states) == {3, 11}
    assert all(torch.equal(got.client_states[c][k], v) for c, s in want.client_states.items() for k, v in s.items())


def test_only_the_newest_two_are_kept(tmp_path):
    for r in range(4):
        write_checkpoint(tmp_path, _ckpt(r))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-000002", "round-000003"]
    assert latest_checkpoint_dir(tmp_path).name == "round-000003"


def test_kill_during_a_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, _ckpt(1))
    calls = {"n": 0}
    real = ck.save_file

    def dies_midway(tensors, path):  # the process "dies" after the first file of checkpoint 2
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        real(tensors, path)

    monkeypatch.setattr(ck, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, _ckpt(2))
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / ".tmp-round-000002").is_dir()  # the half-written one
    assert latest_checkpoint_dir(tmp_path).name == "round-000001"
    assert read_checkpoint(latest_checkpoint_dir(tmp_path)).round == 1
    (tmp_path / "checkpoints" / "LATEST").unlink()  # even without the pointer, only complete ones count
    assert latest_checkpoint_dir(tmp_path).name == "round-000001"
    write_checkpoint(tmp_path, _ckpt(2))  # the next write cleans the leftover
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert latest_checkpoint_dir(tmp_path).name == "round-000002"


def test_client_files_are_replaced_atomically_and_links_keep_the_old_content(tmp_path, monkeypatch):
    a, b = {"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}
    path = tmp_path / "client_1.safetensors"
    ck.save_state_atomic(a, path)
    ck.link_or_copy(path, tmp_path / "linked.safetensors")
    ck.save_state_atomic(b, path)  # a new inode: the link still holds a
    assert torch.equal(ck.load_file(str(tmp_path / "linked.safetensors"))["w"], a["w"])

    def dies_midway(tensors, target):
        with open(target, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ck, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ck.save_state_atomic(a, path)
    monkeypatch.undo()
    assert torch.equal(ck.load_file(str(path))["w"], b["w"])  # the complete previous file


def test_stored_clients_are_moved_in_and_read_back_lazily(tmp_path):
    folder = tmp_path / "snap"
    folder.mkdir()
    want = _ckpt(5)
    for cid, state in want.client_states.items():
        ck.save_state_atomic(state, folder / ck.client_file_name(cid))
    stored = ck.StoredClients(folder, list(want.client_states))
    path = write_checkpoint(tmp_path, Checkpoint(5, want.global_state, {}, stored, want.ledgers))
    assert not folder.exists() and not (path / "clients.safetensors").exists()
    got = read_checkpoint(path)
    assert isinstance(got.client_states, ck.StoredClients) and sorted(got.client_states) == [3, 11]
    assert all(torch.equal(got.client_states[c][k], v) for c, s in want.client_states.items() for k, v in s.items())
    assert got.ledgers == want.ledgers and 4 not in got.client_states
    with pytest.raises(KeyError):
        got.client_states[4]
