"""A ZeRO-3 worker group of G = 2 ranks (two local processes, gloo on CPU, no Ray) trains one client exactly as the
one-process ClientWorker does: same uploaded tensors to 1e-5, without DP and under DP-SGD (same noise draws), and
each rank holds about half of the frozen base."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")

from fedsim.client.worker import ClientWorker  # noqa: E402
from fedsim.privacy.mechanism import NoPrivacy, SampleLevelDP  # noqa: E402
from tests.client.world import lm_client  # noqa: E402

BASE = [
    "method.name=fedavg_lora",
    "federation.local_steps=3",
    "federation.batch_size=6",
    "lora.dropout=0.0",
]
DP = ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.clip=0.5"]
ZERO = ["runtime.backend=ray", "runtime.zero.stage=3", "runtime.zero.ranks=2"]


def _privacy(cfg):
    return SampleLevelDP(clip=cfg.privacy.clip) if cfg.privacy.mode == "sample" else NoPrivacy()


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    from fedsim.client.zero import init_group

    torch.set_num_threads(1)
    init_group(rank, world, "127.0.0.1", port, use_cuda=False)
    cfg, bp, data, state, task = lm_client(overrides, 1.0)
    worker = ClientWorker(0, cfg, bp, data, _privacy(cfg))  # runtime.zero.stage 3: the ZeRO engine
    resident = worker.resident_bytes()
    res = worker.train(task, state, None, None)
    if rank == 0:
        assert res.result.status == "ok", res.result.error
        torch.save({"upload": dict(res.upload.tensors), "loss": res.result.train_loss, "resident": resident}, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group(overrides: list[str], world: int, tmp_path) -> dict:
    out = str(tmp_path / f"zero{world}.pt")
    mp.spawn(_rank, args=(world, _free_port(), overrides, out), nprocs=world, join=True)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("dp", [False, True], ids=["no_dp", "dp_sgd"])
def test_group_of_two_equals_one_process_worker(dp: bool, tmp_path) -> None:
    overrides = BASE + (DP if dp else [])
    cfg, bp, data, state, task = lm_client(overrides, 1.0)
    ref = ClientWorker(0, cfg, bp, data, _privacy(cfg)).train(task, state, None, None)
    assert ref.result.status == "ok", ref.result.error
    base_bytes = sum(w.numel() * w.element_size() for w in bp.weights.values())
    got = _group(overrides + ZERO, 2, tmp_path)
    assert set(got["upload"]) == set(ref.upload.tensors)
    for k, v in ref.upload.tensors.items():
        torch.testing.assert_close(got["upload"][k], v, atol=1e-5, rtol=0, msg=k)
    assert abs(got["loss"] - ref.result.train_loss) < 1e-5
    moved = max(float((ref.upload.tensors[k] - state[k]).abs().max()) for k in ref.upload.tensors)
    assert moved > 1e-3  # the client really trained
    assert got["resident"] <= 0.6 * base_bytes  # each rank holds about half of the base
