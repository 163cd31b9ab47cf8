"""K clients trained together (``ClientWorker.train_many``) give each client what it gets trained alone
(``ClientWorker.train``): upload, weight, signals, kept state, ledger, result row; clients of unequal size in one
pass, empty Poisson batches, a diverging client, per-method trained sets (tiny-bert + synthetic data)."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from fedsim.client.protocol import ClientOutput
from fedsim.client.step_loop import batch_schedule
from fedsim.client.worker import ClientWorker
from fedsim.methods.base import make_method
from fedsim.model.adapters import factor_of
from fedsim.privacy.dpsgd import poisson_rate
from fedsim.privacy.mechanism import make_mechanism
from fedsim.seeding import torch_generator
from fedsim.server.cohort import sample_cohort
from fedsim.types import ClientResult, ClientTask
from fedsim.validation import load_config
from tests.client.world import build_world

BASE = [
    "runtime.backend=local",
    "model.base_dropout=false",
    "federation.rounds=10",
    "federation.local_steps=3",
    "federation.batch_size=8",
    "federation.lr=0.5",
]
DP = ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.clip=0.5"]
AS_LORA = ["method.name=as_lora", "method.as_lora.curvature=true", "method.as_lora.projection_dim=16"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@functools.cache
def _world(overrides: tuple[str, ...]):
    cfg, _ = load_config("tiny", [*BASE, *overrides])
    bp, data, state = build_world(cfg)
    g = torch.Generator().manual_seed(3)  # a non-zero B: A gets gradients too
    state = {k: torch.randn(v.shape, generator=g) * 0.3 if factor_of(k) == "B" else v for k, v in state.items()}
    return cfg, bp, data, state


def _tasks(cfg, data, state, round, clients=None):
    method = make_method(cfg)
    plan = method.plan(round, sorted(state), method.init_server_state(state))
    clients = clients or sample_cohort(cfg.seed, round, cfg.federation.clients, cfg.federation.clients_per_round)
    tasks = []
    for c in clients:
        extra = {}
        if cfg.privacy.mode == "sample":
            n = len(data.client_train[c])
            extra = {"noise_multiplier": 0.8 + 0.1 * c, "sample_rate": poisson_rate(cfg.federation.batch_size, n)}
        tasks.append(ClientTask(round, int(c), plan, **extra))
    g = torch.Generator().manual_seed(round)
    kepts = [{k: state[k] + 0.1 * torch.randn(state[k].shape, generator=g) for k in plan.kept} or None for _ in tasks]
    return tasks, kepts


def _assert_same(got: ClientOutput, want: ClientOutput) -> None:
    skip = {"seconds", "worker_id", "error"}
    for f in dataclasses.fields(ClientResult):
        a, b = getattr(got.result, f.name), getattr(want.result, f.name)
        if f.name in skip:
            continue
        if isinstance(b, float) and not math.isnan(b):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f.name
        else:
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f.name
    assert got.result.error.split("\n")[0] == want.result.error.split("\n")[0]
    assert (got.upload is None) == (want.upload is None) and (got.keep is None) == (want.keep is None)
    if want.upload is not None:
        assert (got.upload.client_id, got.upload.weight) == (want.upload.client_id, want.upload.weight)
        assert sorted(got.upload.tensors) == sorted(want.upload.tensors)
        for k, v in want.upload.tensors.items():
            torch.testing.assert_close(got.upload.tensors[k], v, **TOL)
        assert sorted(got.upload.signals) == sorted(want.upload.signals)
        for k, v in want.upload.signals.items():
            assert got.upload.signals[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for k, v in (want.keep or {}).items():
        torch.testing.assert_close(got.keep[k], v, **TOL)
    assert got.ledger == want.ledger


def _compare(overrides, round=5, clients=None, poison=None):
    cfg, bp, data, state = _world(tuple(overrides))
    worker = ClientWorker(0, cfg, bp, data, make_mechanism(cfg))
    tasks, kepts = _tasks(cfg, data, state, round, clients)
    starts = [
        {k: torch.full_like(v, math.nan) for k, v in state.items()} if t.client_id == poison else state for t in tasks
    ]
    alone = [worker.train(t, s, kept, None) for t, s, kept in zip(tasks, starts, kepts, strict=True)]
    together = worker.train_many(tasks, starts, kepts, [None] * len(tasks))
    assert [o.result.client_id for o in together] == [t.client_id for t in tasks]
    for got, want in zip(together, alone, strict=True):
        _assert_same(got, want)
    return tasks, alone, data


CASES = {
    "fedavg": ["method.name=fedavg_lora"],
    "fedavg-dp": ["method.name=fedavg_lora", *DP],
    "fedavg-adamw": ["method.name=fedavg_lora", "federation.optimizer=adamw", "federation.lr=0.005"],
    "fedavg-client-dp": ["method.name=fedavg_lora", "privacy.mode=client", "privacy.noise_multiplier=1.0"],
    "ffa": ["method.name=ffa_lora"],
    "ffa-dp": ["method.name=ffa_lora", *DP],
    "fedsa": ["method.name=fedsa_lora"],
    "fedsa-dp": ["method.name=fedsa_lora", *DP],
    "as_lora": AS_LORA,
    "as_lora-dp": [*AS_LORA, *DP],
    "as_lora-dp-raw-loss": [*AS_LORA, *DP, "method.as_lora.reference_curvature=true"],
    "rslora-no-head-dp": ["method.name=fedavg_lora", "lora.variant=rslora", "lora.train_head=false", *DP],
}


@pytest.mark.parametrize("case", list(CASES))
def test_clients_trained_together_equal_clients_trained_alone(case):
    tasks, alone, data = _compare(CASES[case])
    sizes = [len(data.client_train[t.client_id]) for t in tasks]
    assert len(tasks) == 4 and len(set(sizes)) > 1  # unequal clients in one pass
    assert all(o.result.status == "ok" for o in alone)
    if "fedsa" in case:
        assert all(o.keep for o in alone)
    if "as_lora" in case:
        assert all(o.upload.signals for o in alone)
        assert any(abs(v) > 0 for o in alone for k, v in o.upload.signals.items() if k.endswith(":kappa"))


def test_an_empty_poisson_batch_in_a_pass_is_a_noise_only_step_for_that_client():
    overrides = ["method.name=ffa_lora", *DP, "federation.batch_size=1"]
    cfg, _, data, _ = _world(tuple(overrides))
    clients = list(range(cfg.federation.clients))[:4]

    def mixed(round: int) -> bool:  # a local step where some clients' Poisson batches are empty and others not
        rows = []
        for c in clients:
            gen = torch_generator(0, "batches", round, c)
            rows.append([len(b) == 0 for b in batch_schedule(len(data.client_train[c]), 1, 3, True, gen)])
        return any(0 < sum(step) < len(clients) for step in zip(*rows, strict=True))

    round = next(r for r in range(1, 200) if mixed(r))
    _, alone, _ = _compare(overrides, round=round, clients=clients)
    assert all(o.result.status == "ok" for o in alone)


def test_a_client_whose_loss_is_not_finite_fails_alone_in_its_pass():
    cfg, _, _, _ = _world(("method.name=fedavg_lora",))
    victim = sample_cohort(cfg.seed, 5, cfg.federation.clients, cfg.federation.clients_per_round)[1]
    _, alone, _ = _compare(["method.name=fedavg_lora"], poison=victim)
    failed = [o.result for o in alone if o.result.status == "failed"]
    assert [r.client_id for r in failed] == [victim]
    assert "FloatingPointError" in failed[0].error and "training loss is nan at local step 1" in failed[0].error


def test_train_many_takes_clients_of_one_round():
    cfg, bp, data, state = _world(("method.name=fedavg_lora",))
    worker = ClientWorker(0, cfg, bp, data)
    tasks, _ = _tasks(cfg, data, state, 5)
    other = dataclasses.replace(tasks[1], round=6)
    with pytest.raises(ValueError, match="one round"):
        worker.train_many([tasks[0], other], state, [None, None], [None, None])
    with pytest.raises(ValueError, match="per task"):
        worker.train_many(tasks, state, [None], [None])
