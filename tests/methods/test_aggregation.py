"""fedsim.methods.aggregation: the weighted mean, the SVD family's shared maths and the per-layer loop."""

from __future__ import annotations

import pytest
import torch

from fedsim.methods.aggregation import (
    adapter_keys_only,
    aggregate_layers,
    fold_into_residual,
    mean_product,
    normalised_weights,
    residual_broadcast,
    weighted_means,
)
from fedsim.model.keys import factor_of, lora_key, residual_key
from fedsim.partial_sum import PartialSum
from fedsim.types import ClientUpdate, Role, RoundPlan
from tests.methods.helpers import D_IN, D_OUT, LAYERS, state, updates_from

WEIGHTS = [10.0, 30.0, 60.0]
P = [w / sum(WEIGHTS) for w in WEIGHTS]
HEADS = ["head.classifier.bias", "head.classifier.weight"]


def _loop_mean(ups, key):
    """sum_k p_k x_k by a direct loop (the independent reference)."""
    total = sum(u.weight for u in ups)
    return sum(u.weight / total * u.tensors[key].double() for u in ups)


def test_weighted_means_match_hand_computation_and_respect_weights():
    ups = [ClientUpdate(0, 1.0, {"x": torch.tensor([0.0, 2.0])}), ClientUpdate(1, 3.0, {"x": torch.tensor([4.0, 6.0])})]
    got = weighted_means(1, ups, ["x"])
    assert got["x"].dtype == torch.float64 and torch.equal(got["x"], torch.tensor([3.0, 5.0], dtype=torch.float64))
    assert normalised_weights(ups) == [0.25, 0.75]


def test_weighted_means_are_the_streamed_mean_bit_for_bit_and_close_to_a_direct_loop():
    ups = updates_from([state(s) for s in (1, 2, 3)], sorted(state(0)), WEIGHTS)
    keys = sorted(state(0))
    got = weighted_means(4, ups, keys)
    streamed = PartialSum(4)  # the streamed path, as two workers would fold and merge it
    other = PartialSum.of(4, ups[1:])
    streamed.add(ups[0])
    streamed.merge(other)
    for k in keys:
        assert torch.equal(got[k], PartialSum.of(4, ups).mean(k))  # one definition of the weighted mean
        torch.testing.assert_close(got[k], streamed.mean(k), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(got[k], _loop_mean(ups, k), rtol=1e-14, atol=1e-14)


def test_empty_or_zero_weight_cohort_is_an_error():
    with pytest.raises(ValueError):
        normalised_weights([])
    with pytest.raises(ValueError):
        normalised_weights([ClientUpdate(0, 0.0, {})])
    with pytest.raises(ValueError, match="empty cohort"):
        weighted_means(1, [], ["x"])
    with pytest.raises(ValueError, match="> 0"):
        weighted_means(1, [ClientUpdate(0, 0.0, {"x": torch.ones(2)})], ["x"])
    with pytest.raises(ValueError, match="uploaded by 1 of 2"):
        weighted_means(1, [ClientUpdate(0, 1.0, {"x": torch.ones(2)}), ClientUpdate(1, 1.0, {})], ["x"])
    with pytest.raises(ValueError, match="twice"):
        weighted_means(1, [ClientUpdate(0, 1.0, {"x": torch.ones(2)})] * 2, ["x"])


def test_mean_product_is_the_weighted_sum_of_the_clients_products():
    g = state(0)
    clients = [state(s) for s in (1, 2, 3)]
    layer = LAYERS[1]
    ups = updates_from(clients, sorted(g), WEIGHTS)
    a, b = lora_key(layer, "A"), lora_key(layer, "B")
    want = sum(p * c[b].double() @ c[a].double() for p, c in zip(P, clients, strict=True))
    torch.testing.assert_close(mean_product(ups, g, layer, P), want, rtol=1e-13, atol=1e-13)
    # a factor a client did not upload is the global one
    only_b = updates_from(clients, [b], WEIGHTS)
    want = sum(p * c[b].double() @ g[a].double() for p, c in zip(P, clients, strict=True))
    torch.testing.assert_close(mean_product(only_b, g, layer, P), want, rtol=1e-13, atol=1e-13)


def test_fold_into_residual_adds_to_the_running_total_in_the_adapter_dtype():
    g = state(0)
    layer = LAYERS[0]
    inc = torch.randn(D_OUT, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first = fold_into_residual(g, layer, inc)
    assert list(first) == [residual_key(layer)]
    assert first[residual_key(layer)].dtype == torch.float32
    assert torch.equal(first[residual_key(layer)], inc.float())
    second = fold_into_residual({**g, **first}, layer, inc)
    assert torch.equal(second[residual_key(layer)], (inc.float().double() + inc).float())
    with pytest.raises(ValueError, match="residual shape"):
        fold_into_residual({**g, **first}, layer, inc[:, :2])


def test_residual_keys_are_broadcast_but_not_adapter_keys():
    plan = RoundPlan(1, {k: Role.SHARED for k in sorted(state(0))})
    down = residual_broadcast(plan)
    assert down[: len(plan.uploaded)] == plan.uploaded
    assert sorted(down[len(plan.uploaded) :]) == sorted(residual_key(layer) for layer in LAYERS)
    assert adapter_keys_only(down) == plan.uploaded


def _plan(keys, round=3):
    return RoundPlan(round, {k: Role.SHARED for k in keys})


def test_aggregate_layers_rejects_an_empty_cohort_before_any_callback():
    calls = []
    with pytest.raises(ValueError, match="empty cohort"):
        aggregate_layers(state(0), [], _plan(sorted(state(0))), calls.append)
    assert calls == []


def test_aggregate_layers_averages_heads_and_calls_back_once_per_uploaded_layer_in_order():
    g = state(0)
    before = {k: v.clone() for k, v in g.items()}
    order = [LAYERS[2], LAYERS[0]]  # the plan's order, not sorted; LAYERS[1] is not uploaded
    keys = [lora_key(layer, f) for layer in order for f in ("B", "A")] + HEADS
    clients = [state(s) for s in (1, 2, 3)]
    ups = updates_from(clients, keys, WEIGHTS)
    seen = []

    def per_layer(ctx):
        seen.append(ctx)
        return {residual_key(ctx.layer): torch.full((D_OUT, D_IN), float(len(seen)))}

    new = aggregate_layers(g, ups, _plan(keys), per_layer)
    assert [c.layer for c in seen] == order
    for ctx in seen:
        assert (ctx.a_key, ctx.b_key) == (lora_key(ctx.layer, "A"), lora_key(ctx.layer, "B"))
        assert ctx.round == 3 and ctx.weights == tuple(P) and ctx.updates is ups and ctx.global_state is g
        assert sorted(ctx.means) == HEADS
        with pytest.raises(KeyError):
            ctx.mean(ctx.a_key)  # A is not averaged unless asked for
    for k in HEADS:
        assert new[k].dtype == g[k].dtype
        torch.testing.assert_close(new[k].double(), _loop_mean(ups, k), rtol=1e-6, atol=1e-6)
        assert torch.equal(new[k], seen[0].mean(k))  # ctx.mean is what the state stores
    for k in g:
        if factor_of(k) != "head":
            assert torch.equal(new[k], g[k])  # factors: only what the callback returns
        assert torch.equal(g[k], before[k])  # the global state is not mutated
    assert torch.equal(new[residual_key(order[0])], torch.full((D_OUT, D_IN), 1.0))
    assert torch.equal(new[residual_key(order[1])], torch.full((D_OUT, D_IN), 2.0))
    assert residual_key(LAYERS[1]) not in new


def test_aggregate_layers_averages_the_factors_asked_for_and_applies_the_callbacks_tensors():
    g = {k: v.double() for k, v in state(0).items()}
    keys = [k for k in sorted(g) if factor_of(k) != "A"]  # FedSVD-like: A frozen
    ups = updates_from([{k: v.double() for k, v in state(s).items()} for s in (1, 2, 3)], keys, WEIGHTS)
    seen = []

    def per_layer(ctx):
        seen.append(ctx.layer)
        b_bar = ctx.mean(ctx.b_key, torch.float64)
        torch.testing.assert_close(b_bar, _loop_mean(ups, ctx.b_key), rtol=1e-14, atol=1e-14)
        return ctx.factors(torch.zeros(D_OUT, 2), torch.ones(2, D_IN))

    new = aggregate_layers(g, ups, _plan(keys), per_layer, mean_factors=("B",))
    assert seen == list(LAYERS)
    for layer in LAYERS:
        for f, value in (("A", 1.0), ("B", 0.0)):
            key = lora_key(layer, f)
            assert new[key].dtype == torch.float64 and torch.all(new[key] == value)
    for k in HEADS:
        torch.testing.assert_close(new[k], _loop_mean(ups, k), rtol=1e-14, atol=1e-14)
