"""The method contract, checked for EVERY registered method (new methods are picked up automatically).

Hand-made states (d_out = 5, d_in = 6, r = 2, plus a head); clients are simulated by perturbing the plan's
trained tensors of the state ``client_start`` gives them, and upload the signals ``client_signal`` computes
from random "privatised" gradients. Rounds 1, 2 and 5 are tested, each after running the earlier rounds, so
methods whose plan depends on server state (AS-LoRA after its warm-up) see a realistic one.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

import numpy as np
import pytest
import torch

import fedsim.methods
from fedsim.config.schema import Config, FederationConfig, MethodConfig
from fedsim.methods.base import Method, available_methods, get_method, make_method
from fedsim.methods.layerwise import FoldingMethod
from fedsim.model.keys import factor_of, is_residual, layers_of, lora_key, residual_key
from fedsim.types import AdapterState, ClientUpdate, Role, SignalContext
from tests.methods.helpers import delta_w, state

for _info in pkgutil.iter_modules(fedsim.methods.__path__):  # registers every method module, listed or not
    importlib.import_module(f"fedsim.methods.{_info.name}")

METHODS = available_methods()
ROUNDS = (1, 2, 5)
TOTAL_ROUNDS = 10
WEIGHTS = [10.0, 30.0, 60.0]


def _method(name: str):
    return make_method(Config(method=MethodConfig(name=name), federation=FederationConfig(rounds=TOTAL_ROUNDS)))


def _client(m, start: AdapterState, plan, cid: int, weight: float, seed: int) -> tuple[ClientUpdate, AdapterState]:
    """One simulated client: (its upload, its full state after local training)."""
    g = torch.Generator().manual_seed(seed)
    after = dict(start)
    grads = {}
    for k in plan.trained:
        t = start[k]
        after[k] = t + 0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype)
        grads[k] = torch.randn(t.shape, generator=g, dtype=t.dtype)
    ctx = SignalContext(round=plan.round, client_id=cid, lr=0.1, batch_size=16.0, noise_std=0.01)
    signals = m.client_signal(plan, grads, ctx)
    return ClientUpdate(cid, weight, {k: after[k] for k in plan.uploaded}, signals), after


def _cohort(m, global_state, plan, weights, seed):
    start = m.client_start(global_state, None, plan)
    return [_client(m, start, plan, i, w, seed + i) for i, w in enumerate(weights)]


def _at_round(m, t: int, dtype=torch.float32):
    """(global state, server state, plan) at the start of round ``t``, after simulated rounds 1 .. t-1."""
    g = {k: v.to(dtype) for k, v in state(0).items()}
    server = m.init_server_state(g)
    for past in range(1, t):
        plan = m.plan(past, sorted(g), server)
        ups = [u for u, _ in _cohort(m, g, plan, WEIGHTS, seed=1000 * past)]
        g, server = m.aggregate(g, ups, plan, server)
    return g, server, m.plan(t, sorted(g), server)


def _expected_delta(global_state, upload: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
    """B A of one layer taking each factor from ``upload`` where uploaded, from the global state otherwise."""
    a, b = (upload.get(lora_key(layer, f), global_state[lora_key(layer, f)]) for f in ("A", "B"))
    return b.double() @ a.double()


def _folds(m) -> bool:
    return isinstance(m, FoldingMethod)


def _new_delta(m, new, old, layer: str) -> torch.Tensor:
    """The change the aggregate makes to the layer's effective weight, in B A units (as ``delta_w``).

    Methods that fold into the base weight (:class:`FoldingMethod`) move part of it into the dense residual R:
    their effective B A is B A + (R_new - R_old) / s, with s the LoRA scale of the method's config."""
    got = delta_w(new, layer)
    if not _folds(m):
        return got
    lora = m.lora
    s = lora.alpha / (lora.r if lora.variant == "lora" else lora.r**0.5)
    key = residual_key(layer)
    r_old = old[key].double() if key in old else torch.zeros_like(got)
    return got + (new[key].double() - r_old) / s


def _assert_tree_close(x, y, where="server_state"):
    if isinstance(x, torch.Tensor) or isinstance(x, np.ndarray):
        torch.testing.assert_close(torch.as_tensor(x).double(), torch.as_tensor(y).double(), rtol=1e-6, atol=1e-6)
    elif isinstance(x, Mapping):
        assert set(x) == set(y), where
        for k in x:
            _assert_tree_close(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, list | tuple):
        assert len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            _assert_tree_close(a, b, f"{where}[{i}]")
    elif isinstance(x, float):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-9), where
    else:
        assert x == y, where


def _assert_same_global(m, got, want, layers, old, atol=1e-6):
    assert set(got) == set(want)
    for layer in layers:
        torch.testing.assert_close(
            _new_delta(m, got, old, layer), _new_delta(m, want, old, layer), rtol=1e-5, atol=atol
        )
    for k in got:
        if m.capabilities.linear or factor_of(k) == "head":  # SVD methods may re-factorise: factors not compared
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=atol)


def test_every_method_class_in_the_package_is_registered_under_its_name():
    classes = [
        obj
        for info in pkgutil.iter_modules(fedsim.methods.__path__)
        for obj in vars(importlib.import_module(f"fedsim.methods.{info.name}")).values()
        if isinstance(obj, type) and issubclass(obj, Method) and not obj.__subclasses__()  # leaves, not bases
    ]
    assert {"fedavg_lora", "ffa_lora", "fedsa_lora"} <= set(METHODS)
    assert classes and all(cls.name in METHODS and get_method(cls.name) is cls for cls in classes)


@pytest.mark.parametrize("name", METHODS)
def test_plan_roles_cover_every_key_exactly_once_and_nothing_kept_or_frozen_is_uploaded(name):
    m = _method(name)
    g = state(0)
    keys = sorted(g)
    server = m.init_server_state(g)
    for t in range(1, 7):
        plan = m.plan(t, keys, server)
        assert plan.round == t
        assert sorted(plan.roles) == keys
        assert all(isinstance(r, Role) for r in plan.roles.values())
        frozen = plan.keys(Role.FROZEN)
        assert len(plan.uploaded) + len(plan.kept) + len(frozen) == len(keys)
        assert not set(plan.uploaded) & (set(plan.kept) | set(frozen))
        assert set(plan.trained) == set(keys) - set(frozen)
        ups = [u for u, _ in _cohort(m, g, plan, WEIGHTS, seed=50 * t)]
        if plan.uploaded:
            g, server = m.aggregate(g, ups, plan, server)


@pytest.mark.parametrize("t", ROUNDS)
@pytest.mark.parametrize("name", METHODS)
def test_identical_uploads_give_back_the_uploads_delta_w_and_head(name, t):
    m = _method(name)
    g, server, plan = _at_round(m, t)
    update, _ = _cohort(m, g, plan, [1.0], seed=7)[0]
    ups = [ClientUpdate(i, w, update.tensors, update.signals) for i, w in enumerate(WEIGHTS)]
    new, _ = m.aggregate(g, ups, plan, server)
    for layer in layers_of(sorted(g)):
        got = _new_delta(m, new, g, layer)
        torch.testing.assert_close(got, _expected_delta(g, update.tensors, layer), rtol=1e-5, atol=1e-5)
    for k in plan.uploaded:
        if m.capabilities.linear or factor_of(k) == "head":
            torch.testing.assert_close(new[k], update.tensors[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", ROUNDS)
@pytest.mark.parametrize("name", METHODS)
def test_aggregation_does_not_depend_on_client_order_or_ids(name, t):
    m = _method(name)
    g, server, plan = _at_round(m, t)
    ups = [u for u, _ in _cohort(m, g, plan, WEIGHTS, seed=11)]
    layers = layers_of(sorted(g))
    base, base_server = m.aggregate(g, ups, plan, server)
    # the same (tensors, weight, signals) under other client ids, passed in id order
    relabel = {0: 2, 1: 0, 2: 1}
    moved = sorted(
        (ClientUpdate(relabel[u.client_id], u.weight, u.tensors, u.signals) for u in ups), key=lambda u: u.client_id
    )
    got, got_server = m.aggregate(g, moved, plan, server)
    _assert_same_global(m, got, base, layers, g)
    _assert_tree_close(got_server, base_server)
    # the same updates in reverse order
    got, got_server = m.aggregate(g, list(reversed(ups)), plan, server)
    _assert_same_global(m, got, base, layers, g)
    _assert_tree_close(got_server, base_server)


@pytest.mark.parametrize("t", ROUNDS)
@pytest.mark.parametrize("name", METHODS)
def test_a_client_with_99_percent_of_the_weight_dominates_the_aggregate(name, t):
    m = _method(name)
    g, server, plan = _at_round(m, t)
    a, b = (u for u, _ in _cohort(m, g, plan, [1.0, 1.0], seed=21))
    layers = layers_of(sorted(g))
    for heavy, light in ((a, b), (b, a)):
        ups = sorted(
            [
                ClientUpdate(heavy.client_id, 99.0, heavy.tensors, heavy.signals),
                ClientUpdate(light.client_id, 1.0, light.tensors, light.signals),
            ],
            key=lambda u: u.client_id,
        )
        new, _ = m.aggregate(g, ups, plan, server)
        for layer in layers:
            near, far = (_expected_delta(g, u.tensors, layer) for u in (heavy, light))
            assert (_new_delta(m, new, g, layer) - near).norm() <= 0.05 * (far - near).norm() + 1e-6
        for k in plan.uploaded:
            if m.capabilities.linear or factor_of(k) == "head":
                gap = (new[k].double() - heavy.tensors[k].double()).norm()
                assert gap <= 0.011 * (light.tensors[k].double() - heavy.tensors[k].double()).norm() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", METHODS)
def test_aggregate_keeps_keys_shapes_and_dtypes(name, dtype):
    m = _method(name)
    for t in (1, 2):
        g, server, plan = _at_round(m, t, dtype)
        ups = [u for u, _ in _cohort(m, g, plan, WEIGHTS, seed=31)]
        new, _ = m.aggregate(g, ups, plan, server)
        if _folds(m):  # the dense residual of every aggregated layer appears after the first aggregation
            assert not any(is_residual(k) for k in plan.roles)
            assert sorted(new) == sorted(set(g) | {residual_key(layer) for layer in layers_of(plan.uploaded)})
        else:
            assert sorted(new) == sorted(g)
        for k in g:
            assert new[k].shape == g[k].shape, k
        for k in new:
            assert new[k].dtype == dtype, k


@pytest.mark.parametrize("t", ROUNDS)
@pytest.mark.parametrize("name", METHODS)
def test_what_the_plan_freezes_or_keeps_is_preserved(name, t):
    """Linear methods: FROZEN and KEPT tensors bit-identical in the new global state. Every method: a layer
    with one factor FROZEN and the other SHARED gets exactly (mean of the shared factor) x (frozen factor)."""
    m = _method(name)
    g, server, plan = _at_round(m, t)
    ups = [u for u, _ in _cohort(m, g, plan, WEIGHTS, seed=41)]
    new, _ = m.aggregate(g, ups, plan, server)
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    for k in set(g) - set(plan.uploaded):
        if m.capabilities.linear or factor_of(k) == "head":
            assert torch.equal(new[k], g[k]), k
    for layer in layers_of(sorted(g)):
        roles = {f: plan.roles[lora_key(layer, f)] for f in ("A", "B")}
        if sorted(roles.values()) != sorted([Role.FROZEN, Role.SHARED]):
            continue
        shared = lora_key(layer, "A" if roles["A"] == Role.SHARED else "B")
        mean = sum(pk * u.tensors[shared].double() for pk, u in zip(p, ups, strict=True))
        torch.testing.assert_close(
            _new_delta(m, new, g, layer), _expected_delta(g, {shared: mean}, layer), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("t", ROUNDS)
@pytest.mark.parametrize("name", METHODS)
def test_client_start_uses_kept_tensors_for_kept_keys_and_the_global_state_otherwise(name, t):
    m = _method(name)
    g, _, plan = _at_round(m, t)
    kept = {k: v + 100.0 for k, v in g.items()}  # a client's own copies of every tensor
    start = m.client_start(g, kept, plan)
    assert sorted(start) == sorted(g)
    for k in g:
        assert torch.equal(start[k], kept[k] if k in plan.kept else g[k]), k
    fresh = m.client_start(g, None, plan)  # a client seen for the first time
    for k in g:
        assert torch.equal(fresh[k], g[k]), k
