from __future__ import annotations

import pickle

import pytest
import torch

from fedsim.config.schema import AnalysisConfig, Config, FederationConfig, MethodConfig, PrivacyConfig
from fedsim.methods.base import make_method
from fedsim.privacy.client_level import clip_update
from fedsim.privacy.mechanism import ClientLevelDP
from fedsim.seeding import torch_generator
from fedsim.server.cohort import largest_first, sample_cohort
from fedsim.server.parameter_server import ParameterServer, new_partial
from fedsim.types import ClientUpdate
from tests.methods.helpers import state
from tests.metrics.reference_similarity import similarity_rows


def test_cohort_is_seeded_sorted_distinct_and_varies_by_round():
    a = sample_cohort(0, 1, 100, 10)
    assert a == sample_cohort(0, 1, 100, 10)
    assert a == sorted(set(a)) and len(a) == 10
    assert a != sample_cohort(0, 2, 100, 10)
    assert sample_cohort(0, 1, 5, 5) == [0, 1, 2, 3, 4]


def test_largest_first_orders_by_size_then_id():
    assert largest_first([0, 1, 2, 3], [5, 9, 5, 1]) == [1, 0, 2, 3]


def test_parameter_server_aggregates_in_client_id_order_whatever_the_arrival_order():
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        ps = ParameterServer(Config(method=MethodConfig("fedavg_lora")), state(0))
        plan = ps.plan(1)
        for cid in order:
            ps.receive(ClientUpdate(cid, 1.0 + cid, {k: state(10 + cid)[k] for k in plan.uploaded}), round=1)
        info = ps.aggregate(1)
        assert info.clients == 3 and info.messages == 3 and info.bytes_up > 0
        results.append(ps.global_state())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k])


def _upload(plan, cid: int) -> ClientUpdate:
    return ClientUpdate(cid, 1.0 + cid, {k: state(10 + cid)[k] for k in plan.uploaded})


@pytest.mark.parametrize("name", ["fedavg_lora", "flexlora"])  # streamed (linear) and buffered (SVD family)
def test_worker_partial_sums_give_the_method_aggregate_of_all_uploads(name):
    cfg = Config(method=MethodConfig(name), analysis=AnalysisConfig(similarity=True))
    ps = ParameterServer(cfg, state(0))
    plan = ps.plan(1)
    ups = [_upload(plan, c) for c in range(5)]
    for worker in ([3, 0], [4, 1, 2]):  # each worker pre-sums its clients and sends one message
        partial = new_partial(cfg, ps.method, 1)
        for c in worker:
            partial.add(ups[c])
        ps.receive_partial(pickle.loads(pickle.dumps(partial)))  # as Ray ships it
    assert ps.received_ids(1) == [0, 1, 2, 3, 4] and ps.received_ids(2) == []
    info = ps.aggregate(1)
    want, _ = make_method(cfg).aggregate(state(0), ups, plan, {})
    got = ps.global_state()
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    assert info.clients == 5 and info.messages == 2  # one per worker
    assert info.bytes_up == sum(4 * sum(t.numel() for t in u.tensors.values()) for u in ups)
    want_sim = similarity_rows(1, [u.tensors for u in ups], plan.uploaded)
    assert len(info.similarity) == len(want_sim) > 0
    for a, b in zip(info.similarity, want_sim, strict=True):
        assert (a["layer"], a["factor"]) == (b["layer"], b["factor"])
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-9)
    assert ps.received_ids(1) == []


def test_a_client_arriving_twice_or_late_is_rejected():
    cfg = Config(method=MethodConfig("ffa_lora"))
    ps = ParameterServer(cfg, state(0))
    plan = ps.plan(1)
    ps.receive(_upload(plan, 0), round=1)
    partial = new_partial(cfg, ps.method, 1)
    partial.add(_upload(plan, 1))
    partial.add(_upload(plan, 0))
    with pytest.raises(ValueError, match="twice"):
        ps.receive_partial(partial)
    with pytest.raises(ValueError, match="twice"):
        ps.receive(_upload(plan, 0), round=1)
    assert ps.received_ids(1) == [0]
    ps.aggregate(1)
    with pytest.raises(ValueError, match="already aggregated"):
        ps.receive(_upload(plan, 1), round=1)


def test_client_level_dp_from_streamed_sums_equals_dp_fedavg_on_the_deltas():
    """The server (worker pre-sums merged, any order) through the mechanism == DP-FedAvg on the raw deltas."""
    cfg = Config(
        method=MethodConfig("ffa_lora"),
        federation=FederationConfig(clients_per_round=4),
        privacy=PrivacyConfig(mode="client", client_clip=0.7),
    )
    g = state(0)
    method = make_method(cfg)
    keys = method.plan(1, sorted(g), method.init_server_state(g)).uploaded
    deltas = [{k: state(20 + c)[k] * (0.05 if c == 0 else 1.0) for k in keys} for c in range(3)]  # one unclipped
    mech = ClientLevelDP(clip=0.7, noise_multiplier=1.3, expected_clients=4, clients=10, seed=cfg.seed)
    ps = ParameterServer(cfg, g, mech)
    worker_a, worker_b = new_partial(cfg, method, 1), new_partial(cfg, method, 1)
    for c, part in ((2, worker_a), (0, worker_b), (1, worker_a)):
        tensors, weight = mech.upload({k: g[k] for k in keys}, {k: g[k] + deltas[c][k] for k in keys}, 3.0 + c)
        part.add(ClientUpdate(c, weight, tensors))
    ps.receive_partial(worker_a)
    ps.receive_partial(worker_b)
    ps.aggregate(1)
    gen = torch_generator(cfg.seed, "server_noise", 1)
    for k in sorted(keys):  # independent reference: clip each delta, sum, one noise draw, divide by m = 4
        clipped = [clip_update({j: (g[j] + d[j]) - g[j] for j in keys}, 0.7)[0][k].double() for d in deltas]
        noise = torch.randn(g[k].shape, generator=gen, dtype=torch.float64) * (1.3 * 0.7)
        want = (g[k].double() + (sum(clipped) + noise) / 4).float()
        torch.testing.assert_close(ps.global_state()[k], want, rtol=1e-6, atol=1e-6)
    for k in set(g) - set(keys):
        assert torch.equal(ps.global_state()[k], g[k])
    empty = ParameterServer(cfg, g, mech)
    empty.aggregate(1)  # nobody uploaded: the noise is still added
    assert all(not torch.equal(empty.global_state()[k], g[k]) for k in keys)


def test_plan_of_a_round_is_kept_while_the_next_rounds_plan_is_asked_for_ahead():
    ps = ParameterServer(Config(method=MethodConfig("fedavg_lora")), state(0))
    calls: list[int] = []
    real = ps.method.plan

    def counting(round, keys, server_state):
        calls.append(round)
        return real(round, keys, server_state)

    ps.method.plan = counting
    p1 = ps.plan(1)
    assert ps.plan(1) is p1 and calls == [1]  # computed once
    p2 = ps.plan(2)  # the next round's plan, asked for ahead (the Ray backend does, right after aggregating 1)
    assert ps.plan(1) is p1 and ps.plan(2) is p2 and calls == [1, 2]  # round 1's evaluation still reads its own
    ps.plan(3)
    assert ps.plan(2) is p2 and calls == [1, 2, 3]
    ps.plan(1)  # two rounds back: dropped, computed again
    assert calls == [1, 2, 3, 1]
