"""Streaming aggregation: PartialSum folding; every linear method's streamed aggregate == the buffered weighted mean."""

from __future__ import annotations

import math
import pickle
import random

import pytest
import torch

from fedsim.methods.base import Method, available_methods, register_method
from fedsim.partial_sum import PartialSum
from fedsim.types import ClientUpdate, Role, state_bytes
from tests.methods.helpers import state
from tests.methods.test_contract import ROUNDS, _assert_tree_close, _at_round, _cohort, _method
from tests.metrics.reference_similarity import similarity_rows

LINEAR = [n for n in available_methods() if _method(n).capabilities.linear]
WEIGHTS6 = [10.0, 30.0, 60.0, 5.0, 1.0, 44.0]


def test_the_linear_methods_are_the_weighted_mean_family():
    assert set(LINEAR) == {"fedavg_lora", "ffa_lora", "fedsa_lora", "rolora", "as_lora"}


def _streamed(ups, round, order, split):
    """Fold ``ups`` in ``order`` into two 'workers' (the first ``split`` of the order, the rest), merge them."""
    a = PartialSum(round)
    b = PartialSum(round)
    for i, idx in enumerate(order):
        (a if i < split else b).add(ups[idx])
    b.merge(a)
    return b


@pytest.mark.parametrize("t", ROUNDS)
@pytest.mark.parametrize("name", LINEAR)
def test_streamed_aggregate_equals_buffered_and_ignores_arrival_order(name, t):
    m = _method(name)
    g, server, plan = _at_round(m, t)
    ups = [u for u, _ in _cohort(m, g, plan, WEIGHTS6, seed=77)]
    _, want_server = m.aggregate(g, ups, plan, server)
    total = sum(u.weight for u in ups)  # the weighted mean, computed independently
    want = dict(g)
    for k in plan.uploaded:
        want[k] = sum(u.weight / total * u.tensors[k].double() for u in ups).to(g[k].dtype)
    rng = random.Random(t)
    for trial in range(3):
        order = list(range(len(ups)))
        rng.shuffle(order)
        sums = _streamed(ups, t, order, split=trial + 1)
        got, got_server = m.aggregate_sums(g, sums, plan, server)
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
            if plan.roles[k] != Role.SHARED:
                assert torch.equal(got[k], g[k]), k  # frozen / kept tensors untouched
        _assert_tree_close(got_server, want_server)


def test_as_lora_scores_are_weighted_means_over_the_finite_signals_only():
    m = _method("as_lora")
    g, server, plan = _at_round(m, 2)
    ups = [u for u, _ in _cohort(m, g, plan, [1.0, 3.0, 2.0], seed=5)]
    name = next(iter(ups[0].signals))
    ups[2] = ClientUpdate(2, 2.0, ups[2].tensors, {**ups[2].signals, name: math.nan})
    sums = PartialSum.of(2, ups)
    want = (1.0 * ups[0].signals[name] + 3.0 * ups[1].signals[name]) / 4.0
    assert sums.signal_mean(name) == pytest.approx(want, rel=1e-12)
    assert sums.signal_mean("no-such-signal") is None
    _, want_server = m.aggregate(g, ups, plan, server)
    _, got_server = m.aggregate_sums(g, sums, plan, server)
    _assert_tree_close(got_server, want_server)


def test_a_linear_method_that_overrides_only_aggregate_is_refused():
    class Custom(Method):
        def role(self, round, key, server_state):
            return Role.SHARED

        def aggregate(self, global_state, updates, plan, server_state):
            return global_state, server_state

    with pytest.raises(TypeError, match="aggregate_sums"):
        register_method("custom_not_streamable")(Custom)


def test_a_method_with_client_signals_must_declare_them():
    """Workers keep the gradients signals read only for methods whose capabilities declare signals."""

    class Custom(Method):
        def role(self, round, key, server_state):
            return Role.SHARED

        def client_signal(self, plan, grads, context):
            return {"norm": float(sum(g.norm() for g in grads.values()))}

    with pytest.raises(TypeError, match="signals=True"):
        register_method("custom_undeclared_signals")(Custom)


def _ups(n=4, keys=("enc.0.query.lora_A", "enc.0.query.lora_B", "head.classifier.bias")):
    return [ClientUpdate(c, 1.0 + c, {k: state(100 + c)[k] for k in keys}, {"s": float(c)}) for c in range(n)]


def test_partial_sum_holds_weighted_sums_ids_and_logical_bytes():
    ups = _ups()
    p = PartialSum.of(3, ups)
    assert sorted(p.client_ids) == [0, 1, 2, 3] and len(p) == 4 and p.weight == 10.0
    assert p.bytes_up == sum(state_bytes(u.tensors) + 4 * len(u.signals) for u in ups)
    k = "enc.0.query.lora_A"
    want = sum(u.weight * u.tensors[k].double() for u in ups)
    assert p.sums[k].dtype == torch.float64 and torch.allclose(p.sums[k], want, rtol=1e-15, atol=1e-15)
    assert torch.allclose(p.mean(k), want / 10.0, rtol=1e-15, atol=1e-15)
    assert p.signal_mean("s") == pytest.approx(sum(u.weight * c for c, u in enumerate(ups)) / 10.0)


def test_a_client_twice_in_a_round_is_rejected_also_across_merges_and_after_pickling():
    ups = _ups()
    p = PartialSum.of(1, ups[:2])
    with pytest.raises(ValueError, match="twice"):
        p.add(ups[1])
    q = pickle.loads(pickle.dumps(PartialSum.of(1, ups[1:3])))  # a worker's sum, as Ray ships it
    with pytest.raises(ValueError, match="twice"):
        p.merge(q)
    with pytest.raises(ValueError, match="twice"):
        q.add(ups[2])
    with pytest.raises(ValueError, match="round"):
        p.merge(PartialSum.of(2, ups[3:]))
    with pytest.raises(ValueError, match="round"):
        p.merge(PartialSum.of(1, ups[3:], similarity=True))


def test_empty_or_zero_weight_partial_sum_cannot_be_averaged():
    with pytest.raises(ValueError, match="empty"):
        PartialSum(1).mean("x")
    p = PartialSum.of(1, [ClientUpdate(0, 0.0, {"x": torch.ones(2)})])
    with pytest.raises(ValueError, match="> 0"):
        p.mean("x")


def test_buffering_partial_sum_keeps_uploads_in_client_id_order_for_non_linear_methods():
    ups = _ups()
    a, b = PartialSum.of(1, [ups[3], ups[0]], buffer=True), PartialSum.of(1, [ups[2], ups[1]], buffer=True)
    a.merge(b)
    assert [u.client_id for u in a.buffered()] == [0, 1, 2, 3]
    assert all(
        torch.equal(x.tensors[k], u.tensors[k]) for x, u in zip(a.buffered(), ups, strict=True) for k in u.tensors
    )
    assert not a.sums
    with pytest.raises(ValueError):
        a.mean("enc.0.query.lora_A")
    with pytest.raises(ValueError):
        PartialSum(1).buffered()


def test_streamed_similarity_equals_pairwise_cosine_of_the_uploads():
    keys = ["enc.0.query.lora_A", "enc.0.query.lora_B", "enc.1.query.lora_A", "head.classifier.bias"]
    ups = _ups(5, keys)
    zero = {k: torch.zeros_like(v) if k == "enc.1.query.lora_A" else v for k, v in ups[4].tensors.items()}
    ups[4] = ClientUpdate(4, 1.0, zero)  # a zero tensor has similarity 0 with everything
    want = similarity_rows(7, [u.tensors for u in ups], keys)
    p = PartialSum(7, similarity=True)
    q = PartialSum(7, similarity=True)
    for u in ups:
        (p if u.client_id % 2 else q).add(u)
    p.merge(q)
    got = p.similarity_rows(keys)
    assert [(r["layer"], r["factor"], r["clients"]) for r in got] == [
        (r["layer"], r["factor"], r["clients"]) for r in want
    ]
    assert len(got) == 3  # the head is not an A/B factor
    for a, b in zip(got, want, strict=True):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-12)
    assert PartialSum.of(7, ups).similarity_rows(keys) == []  # off unless asked for
    assert PartialSum.of(7, ups[:1], similarity=True).similarity_rows(keys) == []  # one client: no pairs
