"""The executor contract: the same client trained through every executor (one client on the live model, a fused
pass of K = 1, a ZeRO group of G = 1) gives the same upload, ledger, signals and outcome (to 1e-6), with the
gradient copies kept and not kept (tiny-lm: the ZeRO engine trains causal LMs only)."""

from __future__ import annotations

import dataclasses
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fedsim.client.executors import FusedExecutor, SingleExecutor
from fedsim.client.protocol import ClientOutput
from fedsim.client.step_loop import ClientInput, ClientTrained, LocalTrainer
from fedsim.client.worker import ClientWorker
from fedsim.privacy.mechanism import make_mechanism
from fedsim.types import ClientResult
from tests.client.world import lm_client

BASE = ["model.base_dropout=false", "lora.dropout=0.0", "federation.local_steps=3", "federation.batch_size=6"]
DP = ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.clip=0.5"]
AS_LORA = ["method.name=as_lora", "method.as_lora.curvature=true", "method.as_lora.projection_dim=16"]
#: method without client signals (no gradient copies kept) and with them (copies kept), without and with DP-SGD
CASES = {
    "fedavg": ["method.name=fedavg_lora"],
    "fedavg-dp": ["method.name=fedavg_lora", *DP],
    "as_lora": AS_LORA,
    "as_lora-dp": [*AS_LORA, *DP],
}
ZERO_G1 = ["runtime.backend=ray", "runtime.zero.stage=3", "runtime.zero.ranks=1"]
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _summary(out: ClientOutput) -> dict:
    """What must not depend on the executor: the result row (timing and worker aside), upload, signals, ledger."""
    row = {f.name: getattr(out.result, f.name) for f in dataclasses.fields(ClientResult)}
    for name in ("seconds", "worker_id", "error"):
        row.pop(name)
    upload = out.upload
    return {
        "row": row,
        "upload": dict(upload.tensors) if upload else None,
        "weight": upload.weight if upload else None,
        "signals": dict(upload.signals) if upload else None,
        "keep": out.keep,
        "ledger": out.ledger,
    }


def _assert_same(got: dict, want: dict) -> None:
    assert want["row"]["status"] == "ok"
    for name, value in want["row"].items():
        if isinstance(value, float) and not math.isnan(value):
            assert got["row"][name] == pytest.approx(value, **{"rel": 1e-6, "abs": 1e-6}), name
        else:
            assert got["row"][name] == value or (math.isnan(got["row"][name]) and math.isnan(value)), name
    assert sorted(got["upload"]) == sorted(want["upload"]) and got["weight"] == want["weight"]
    for k, v in want["upload"].items():
        torch.testing.assert_close(got["upload"][k], v, **TOL, msg=k)
    assert sorted(got["signals"]) == sorted(want["signals"])
    for k, v in want["signals"].items():
        assert got["signals"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert (got["keep"] is None) == (want["keep"] is None)
    for k, v in (want["keep"] or {}).items():
        torch.testing.assert_close(got["keep"][k], v, **TOL, msg=k)
    assert got["ledger"] == want["ledger"]


def _one_process(overrides: list[str]) -> dict[str, dict]:
    """The client through the one-client executor (``train``) and a fused pass of one (``train_many``)."""
    cfg, bp, data, state, task = lm_client([*BASE, *overrides], 0.9)
    worker = ClientWorker(0, cfg, bp, data, make_mechanism(cfg))
    single = worker.train(task, state, None, None)
    (fused,) = worker.train_many([task], state, [None], [None])
    return {"single": _summary(single), "fused": _summary(fused)}


@pytest.mark.parametrize("case", list(CASES))
def test_single_and_fused_executors_give_the_same_client_round(case: str) -> None:
    got = _one_process(CASES[case])
    _assert_same(got["fused"], got["single"])
    if case.startswith("as_lora"):
        assert got["single"]["signals"]  # the copies were kept and read


def _trained(executor_kind: str, keep: bool, overrides: list[str]) -> ClientTrained:
    cfg, bp, data, state, task = lm_client([*BASE, *overrides], 0.9)
    worker = ClientWorker(0, cfg, bp, data)
    live = worker.live
    executor = SingleExecutor(live) if executor_kind == "single" else FusedExecutor(live)
    trainer = LocalTrainer(executor, cfg.federation, cfg.privacy, cfg.seed, keep_gradients=keep)
    ids, mask, labels = data.client_arrays(data.client_train[0])
    (res,) = trainer.train(task.plan.trained, [ClientInput(0, state, ids, mask, labels, 0.9)], round=1)
    assert not isinstance(res, Exception), res
    return res


@pytest.mark.parametrize("keep", [False, True], ids=["no_copies", "copies"])
@pytest.mark.parametrize("dp", [False, True], ids=["no_dp", "dp_sgd"])
def test_every_executor_honours_keep_gradients(keep: bool, dp: bool) -> None:
    overrides = ["method.name=fedavg_lora", *(DP if dp else [])]
    single, fused = (_trained(kind, keep, overrides) for kind in ("single", "fused"))
    assert (single.outcome.steps, single.outcome.examples) == (fused.outcome.steps, fused.outcome.examples)
    assert fused.outcome.train_loss == pytest.approx(single.outcome.train_loss, rel=1e-6, abs=1e-6)
    for name in ("trained", "last_grads", "prev_grads", "prev_step"):
        want, got = getattr(single, name), getattr(fused, name)
        assert sorted(got) == sorted(want), name
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, **TOL, msg=f"{name} {k}")
    copies = (single.last_grads, single.prev_grads, single.prev_step)
    assert all(len(c) > 0 for c in copies) if keep else all(len(c) == 0 for c in copies)
    assert single.last_batch is not None and fused.last_batch is not None
    assert all(torch.equal(a, b) for a, b in zip(single.last_batch, fused.last_batch, strict=True))


def _zero_rank(rank: int, port: int, out: str) -> None:
    from fedsim.client.zero import init_group

    torch.set_num_threads(1)
    init_group(rank, 1, "127.0.0.1", port, use_cuda=False)
    results = {}
    for case, overrides in CASES.items():
        cfg, bp, data, state, task = lm_client([*BASE, *overrides, *ZERO_G1], 0.9)
        worker = ClientWorker(0, cfg, bp, data, make_mechanism(cfg))
        assert worker.engine.fused is None and worker.resident_bytes() > 0  # runtime.zero.stage 3: ZeRO engine
        results[case] = _summary(worker.train(task, state, None, None))
    torch.save(results, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_zero_group_of_one_gives_the_same_client_round(tmp_path) -> None:
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "zero.pt")
    mp.spawn(_zero_rank, args=(_free_port(), out), nprocs=1, join=True)
    zero = torch.load(out)
    for case, overrides in CASES.items():
        _assert_same(zero[case], _one_process(overrides)["single"])
