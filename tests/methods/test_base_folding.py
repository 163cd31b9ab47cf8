"""FedEx-LoRA and FLoRA: the aggregate folds a dense residual R into the frozen base weight W0.

The effective weight of a layer is W0 + R + s B A; both methods must make it equal the exact weighted mean
W0 + R_old + s sum_k p_k B_k A_k of the clients' weights. W0 cancels on both sides, so the tests compare
R + s B A.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedsim.methods.fedex_lora  # noqa: F401  (registers "fedex_lora")
import fedsim.methods.flora  # noqa: F401  (registers "flora")
from fedsim.config.schema import Config, LoraConfig, MethodConfig
from fedsim.methods.base import get_method, make_method
from fedsim.methods.layerwise import FoldingMethod
from fedsim.model.keys import factor_of, is_residual, residual_key
from fedsim.types import Role
from tests.methods.helpers import D_IN, D_OUT, LAYERS, R, delta_w, state, updates_from

WEIGHTS = [10.0, 30.0, 60.0]
P = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
NAMES = ("fedex_lora", "flora")


def _method(name, seed=0, alpha=4.0, variant="lora"):
    cfg = Config(seed=seed, method=MethodConfig(name=name), lora=LoraConfig(r=R, alpha=alpha, variant=variant))
    return make_method(cfg)


def _scale(variant, alpha=4.0):
    return alpha / R if variant == "lora" else alpha / math.sqrt(R)


def _clients(start, keys, seed, n=3):
    out = []
    for i in range(n):
        s = dict(start)
        g = torch.Generator().manual_seed(seed + i)
        for k in keys:
            s[k] = s[k] + torch.randn(s[k].shape, generator=g, dtype=s[k].dtype)
        out.append(s)
    return out


def _round(m, g, t, seed):
    """One simulated round from global state ``g``: (clients' states, new global state)."""
    plan = m.plan(t, sorted(g), {})
    clients = _clients(m.client_start(g, None, plan), plan.trained, seed)
    new, _ = m.aggregate(g, updates_from(clients, plan.uploaded, WEIGHTS), plan, {})
    return clients, new


def _residual(s, layer):
    key = residual_key(layer)
    return s[key].double() if key in s else torch.zeros(D_OUT, D_IN, dtype=torch.float64)


def _effective(s, layer, scale):
    """R + s B A: the layer's weight minus W0."""
    return _residual(s, layer) + scale * delta_w(s, layer)


def _mean_product(clients, layer):
    return sum(pk * delta_w(c, layer) for pk, c in zip(P, clients, strict=True))


def _mean(clients, key):
    return sum(pk * c[key].double() for pk, c in zip(P, clients, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_registered_non_linear_and_folding(name):
    cls = get_method(name)
    assert cls.name == name and cls.capabilities.linear is False and issubclass(cls, FoldingMethod)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_the_method_scale_follows_the_variant(name, variant):
    assert _method(name, variant=variant).scale == pytest.approx(_scale(variant), rel=1e-15)
    with pytest.raises(ValueError, match="lora.variant"):
        _method(name, variant="vera")


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_fedex_effective_weight_is_the_exact_weighted_mean_over_two_rounds(variant):
    m = _method("fedex_lora", variant=variant)
    s = _scale(variant)
    g0 = {k: v.double() for k, v in state(0).items()}
    clients1, g1 = _round(m, g0, 1, seed=100)
    clients2, g2 = _round(m, g1, 2, seed=200)
    for layer in LAYERS:
        exact1 = _mean_product(clients1, layer)
        # the residual is needed: FedAvg of the factors alone is inexact
        assert (delta_w(g1, layer) - exact1).norm() > 1e-3
        torch.testing.assert_close(_effective(g1, layer, s), s * exact1, rtol=1e-10, atol=1e-10)
        # round 2 starts from W0 + R_1 and its exact mean is added on top of R_1 (the residual is a running total)
        torch.testing.assert_close(
            _effective(g2, layer, s), _residual(g1, layer) + s * _mean_product(clients2, layer), rtol=1e-10, atol=1e-10
        )
        increment2 = s * (_mean_product(clients2, layer) - delta_w(g2, layer))
        torch.testing.assert_close(_residual(g2, layer), _residual(g1, layer) + increment2, rtol=1e-10, atol=1e-10)
    for k in g0:  # A, B and head: plain weighted means, as FedAvg-LoRA
        if not is_residual(k):
            torch.testing.assert_close(g2[k], _mean(clients2, k), rtol=1e-12, atol=1e-12)


def test_fedex_float32_state_keeps_its_dtype_and_stays_exact_to_float_tolerance():
    m = _method("fedex_lora")
    s = _scale("lora")
    clients, new = _round(m, state(0), 1, seed=300)
    for layer in LAYERS:
        res = new[residual_key(layer)]
        assert res.dtype == torch.float32 and res.shape == (D_OUT, D_IN)
        torch.testing.assert_close(_effective(new, layer, s), s * _mean_product(clients, layer), rtol=1e-5, atol=1e-5)


def test_flora_folds_the_mean_product_and_restarts_b_at_zero():
    m = _method("flora")
    s = _scale("lora")
    g0 = {k: v.double() for k, v in state(0).items()}
    clients1, g1 = _round(m, g0, 1, seed=400)
    clients2, g2 = _round(m, g1, 2, seed=500)
    for old, new, clients in ((g0, g1, clients1), (g1, g2, clients2)):
        for layer in LAYERS:
            exact = _mean_product(clients, layer)
            torch.testing.assert_close(_residual(new, layer) - _residual(old, layer), s * exact, rtol=1e-10, atol=1e-10)
            assert torch.equal(new[f"{layer}.lora_B"], torch.zeros(D_OUT, R, dtype=torch.float64))
            # hence the effective weight is exactly the weighted mean on top of the old residual
            torch.testing.assert_close(
                _effective(new, layer, s), _residual(old, layer) + s * exact, rtol=1e-10, atol=1e-10
            )
        for k in [k for k in g0 if factor_of(k) == "head"]:
            torch.testing.assert_close(new[k], _mean(clients, k), rtol=1e-12, atol=1e-12)


def _reinit_a(seed, t, upload_seed, dtype=torch.float32):
    m = _method("flora", seed=seed)
    g = {k: v.to(dtype) for k, v in state(0).items()}
    _, new = _round(m, g, t, seed=upload_seed)
    return {layer: new[f"{layer}.lora_A"] for layer in LAYERS}


def test_flora_reinitialises_a_kaiming_uniform_deterministically_per_seed_round_and_layer():
    a = _reinit_a(seed=1, t=3, upload_seed=600)
    bound = 1.0 / math.sqrt(D_IN)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound = sqrt(3) gain / sqrt(fan_in)
    for layer in LAYERS:
        assert a[layer].shape == (R, D_IN) and a[layer].dtype == torch.float32
        assert a[layer].abs().max() <= bound
        assert a[layer].abs().max() > 0.5 * bound  # a real draw over the range, not zeros or a tiny init
    assert not torch.equal(a[LAYERS[0]], a[LAYERS[1]])  # the layer index enters the seed
    same = _reinit_a(seed=1, t=3, upload_seed=700)  # other uploads, same (seed, round): the same A
    assert all(torch.equal(a[layer], same[layer]) for layer in LAYERS)
    other_round = _reinit_a(seed=1, t=4, upload_seed=600)
    other_seed = _reinit_a(seed=2, t=3, upload_seed=600)
    for layer in LAYERS:
        assert not torch.equal(a[layer], other_round[layer])
        assert not torch.equal(a[layer], other_seed[layer])
    as64 = _reinit_a(seed=1, t=3, upload_seed=600, dtype=torch.float64)  # the draw does not depend on the dtype
    assert all(torch.equal(as64[layer], a[layer].double()) for layer in LAYERS)


@pytest.mark.parametrize("name", NAMES)
def test_residual_keys_are_broadcast_but_never_planned(name):
    m = _method(name)
    g0 = state(0)
    _, g1 = _round(m, g0, 1, seed=800)
    residuals = sorted(k for k in g1 if is_residual(k))
    assert residuals == sorted(residual_key(layer) for layer in LAYERS)
    plan = m.plan(2, sorted(g1), {})  # even when handed the residual keys, the plan is over adapter keys only
    assert sorted(plan.roles) == sorted(g0)
    assert set(plan.roles.values()) == {Role.SHARED}
    down = m.broadcast_keys(plan)
    assert set(down) == set(plan.uploaded) | set(residuals)
    assert len(down) == len(set(down))
    start = m.client_start(g1, None, plan)  # clients start from the global state, residual included
    assert all(torch.equal(start[k], g1[k]) for k in residuals)


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_cohort_is_an_error(name):
    m = _method(name)
    g = state(0)
    plan = m.plan(1, sorted(g), {})
    with pytest.raises(ValueError):
        m.aggregate(g, [], plan, {})
