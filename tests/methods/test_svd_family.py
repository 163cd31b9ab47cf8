"""FlexLoRA and FedSVD: the aggregate is the best rank-r approximation (Eckart–Young) of the mean Delta W."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

import fedsim.methods.fedsvd  # noqa: F401  (registers "fedsvd")
import fedsim.methods.flexlora  # noqa: F401  (registers "flexlora")
from fedsim.config.schema import Config, FlexLoraConfig, MethodConfig
from fedsim.errors import ConfigError
from fedsim.methods import base
from fedsim.methods.aggregation import truncated_factors
from fedsim.methods.base import get_method, make_method
from fedsim.methods.layerwise import LayerwiseMethod
from fedsim.model.keys import factor_of
from fedsim.types import Role
from fedsim.validation import load_config
from tests.methods.helpers import LAYERS, R, delta_w, state, updates_from

WEIGHTS = [10.0, 30.0, 60.0]
P = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)


def _method(name, split="sqrt"):
    return make_method(Config(method=MethodConfig(name=name, flexlora=FlexLoraConfig(svd_split=split))))


def _clients(start, keys, n=3, seed=300):
    """Clients trained ``keys``: random perturbations of the start state."""
    out = []
    for i in range(n):
        s = dict(start)
        g = torch.Generator().manual_seed(seed + i)
        for k in keys:
            s[k] = s[k] + torch.randn(s[k].shape, generator=g)
        out.append(s)
    return out


def _mean_delta(clients, layer):
    return sum(pk * delta_w(c, layer) for pk, c in zip(P, clients, strict=True))


def _best_rank_r(m):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :R] * s[:R]) @ vh[:R], s[R:].square().sum().sqrt()


def _aggregate(name, split="sqrt", trained=None, seed=300):
    m = _method(name, split)
    g = state(0)
    plan = m.plan(1, sorted(g), m.init_server_state(g))
    start = m.client_start(g, None, plan)
    clients = _clients(start, plan.trained if trained is None else trained, seed=seed)
    new, _ = m.aggregate(g, updates_from(clients, plan.uploaded, WEIGHTS), plan, {})
    return g, clients, new


@pytest.mark.parametrize("split", ["sqrt", "B"])
def test_flexlora_is_the_best_rank_r_approximation_of_the_mean_delta_w(split):
    g, clients, new = _aggregate("flexlora", split)
    for layer in LAYERS:
        mean = _mean_delta(clients, layer)
        assert torch.linalg.matrix_rank(mean) > R  # the mean of rank-r products is not rank r: truncation matters
        best, optimum = _best_rank_r(mean)
        got = delta_w(new, layer)
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
        err = (got - mean).norm()
        assert err.item() == pytest.approx(optimum.item(), rel=1e-5, abs=1e-6)
        for f in ("A", "B"):
            key = f"{layer}.lora_{f}"
            assert new[key].shape == g[key].shape and new[key].dtype == g[key].dtype
    for k in [k for k in g if factor_of(k) == "head"]:
        want = sum(pk * c[k].double() for pk, c in zip(P, clients, strict=True))
        torch.testing.assert_close(new[k].double(), want, rtol=1e-6, atol=1e-6)


def test_flexlora_beats_fedavg_lora_and_both_splits_give_the_same_product():
    _, clients, sq = _aggregate("flexlora", "sqrt")
    _, _, bs = _aggregate("flexlora", "B")
    _, _, avg = _aggregate("fedavg_lora")
    for layer in LAYERS:
        torch.testing.assert_close(delta_w(sq, layer), delta_w(bs, layer), rtol=1e-5, atol=1e-5)
        mean = _mean_delta(clients, layer)
        assert (delta_w(sq, layer) - mean).norm() < (delta_w(avg, layer) - mean).norm()


def test_svd_splits_place_the_singular_values_as_documented():
    _, _, sq = _aggregate("flexlora", "sqrt")
    _, _, bs = _aggregate("flexlora", "B")
    eye = torch.eye(R, dtype=torch.float64)
    for layer in LAYERS:
        a, b = sq[f"{layer}.lora_A"].double(), sq[f"{layer}.lora_B"].double()
        s = torch.linalg.svdvals(b @ a)[:R]
        torch.testing.assert_close(b.T @ b, torch.diag(s), rtol=1e-5, atol=1e-5)  # balanced
        torch.testing.assert_close(a @ a.T, torch.diag(s), rtol=1e-5, atol=1e-5)
        a, b = bs[f"{layer}.lora_A"].double(), bs[f"{layer}.lora_B"].double()
        torch.testing.assert_close(a @ a.T, eye, rtol=1e-5, atol=1e-5)  # all of S in B
        torch.testing.assert_close(b.T @ b, torch.diag(s.square()), rtol=1e-5, atol=1e-5)


def test_flexlora_is_exact_when_the_clients_delta_w_has_rank_at_most_r():
    """Clients that moved only B share A, so sum p_k B_k A = B_bar A has rank <= r: no truncation error."""
    g = state(0)
    trained = [k for k in g if factor_of(k) != "A"]
    _, clients, new = _aggregate("flexlora", "sqrt", trained=trained)
    for layer in LAYERS:
        torch.testing.assert_close(delta_w(new, layer), _mean_delta(clients, layer), rtol=1e-5, atol=1e-5)


def test_fedsvd_plan_freezes_a_and_rebroadcasts_it():
    m = _method("fedsvd")
    assert not m.capabilities.linear
    keys = sorted(state(0))
    plan = m.plan(1, keys, {})
    for k, role in plan.roles.items():
        assert role == (Role.FROZEN if factor_of(k) == "A" else Role.SHARED)
    assert sorted(m.broadcast_keys(plan)) == keys  # the server re-sets A every round


def test_fedsvd_refactorises_b_bar_a_exactly_with_orthonormal_a():
    g, clients, new = _aggregate("fedsvd")
    eye = torch.eye(R, dtype=torch.float64)
    for layer in LAYERS:
        for c in clients:  # A frozen: bit-identical on every client
            assert torch.equal(c[f"{layer}.lora_A"], g[f"{layer}.lora_A"])
        b_bar = sum(pk * c[f"{layer}.lora_B"].double() for pk, c in zip(P, clients, strict=True))
        target = b_bar @ g[f"{layer}.lora_A"].double()
        best, optimum = _best_rank_r(target)
        got = delta_w(new, layer)
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
        assert (got - target).norm().item() == pytest.approx(optimum.item(), abs=1e-5)  # rank <= r: ~0
        torch.testing.assert_close(got, _mean_delta(clients, layer), rtol=1e-5, atol=1e-5)  # exact aggregate
        a, b = new[f"{layer}.lora_A"].double(), new[f"{layer}.lora_B"].double()
        assert not torch.equal(new[f"{layer}.lora_A"], g[f"{layer}.lora_A"])  # A was re-set by the server
        torch.testing.assert_close(a @ a.T, eye, rtol=1e-5, atol=1e-5)
        gram = b.T @ b  # B = U S: orthogonal columns, decreasing norms
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=1e-5, atol=1e-5)
        assert torch.all(torch.diagonal(gram)[:-1] >= torch.diagonal(gram)[1:])
    for k in [k for k in g if factor_of(k) == "head"]:
        want = sum(pk * c[k].double() for pk, c in zip(P, clients, strict=True))
        torch.testing.assert_close(new[k].double(), want, rtol=1e-6, atol=1e-6)


def test_fedsvd_second_round_stays_exact_from_the_orthonormal_a():
    m = _method("fedsvd")
    g = state(2)
    for t in (1, 2):
        plan = m.plan(t, sorted(g), {})
        clients = _clients(m.client_start(g, None, plan), plan.trained, seed=400 + 10 * t)
        new, _ = m.aggregate(g, updates_from(clients, plan.uploaded, WEIGHTS), plan, {})
        for layer in LAYERS:
            torch.testing.assert_close(delta_w(new, layer), _mean_delta(clients, layer), rtol=1e-5, atol=1e-5)
        g = new


def test_fedsvd_keeps_a_when_the_mean_b_is_zero():
    m = _method("fedsvd")
    g = state(0)
    plan = m.plan(1, sorted(g), {})
    zero_b = {k: torch.zeros_like(g[k]) if factor_of(k) == "B" else g[k] for k in plan.uploaded}
    new, _ = m.aggregate(g, updates_from([zero_b, zero_b], plan.uploaded, [1.0, 3.0]), plan, {})
    for layer in LAYERS:
        assert torch.equal(new[f"{layer}.lora_A"], g[f"{layer}.lora_A"])
        assert torch.count_nonzero(new[f"{layer}.lora_B"]) == 0


def test_truncated_factors_pads_when_rank_exceeds_the_matrix_rank_and_rejects_bad_splits():
    delta = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    b, a = truncated_factors(delta, 6, "sqrt")
    assert b.shape == (3, 6) and a.shape == (6, 4)
    torch.testing.assert_close(b @ a, delta)  # full rank kept, extra columns / rows zero
    assert torch.count_nonzero(b[:, 3:]) == 0 and torch.count_nonzero(a[3:]) == 0
    with pytest.raises(ValueError, match="svd split"):
        truncated_factors(delta, 2, "A")
    with pytest.raises(ConfigError, match="method.flexlora.svd_split"):
        load_config("tiny", ["method.name=flexlora", "method.flexlora.svd_split=A"])


def test_svd_methods_reject_an_empty_cohort():
    for name in ("flexlora", "fedsvd"):
        m = _method(name)
        g = state(0)
        plan = m.plan(1, sorted(g), {})
        with pytest.raises(ValueError, match="empty cohort"):
            m.aggregate(g, [], plan, {})


def test_the_svd_family_shares_the_layerwise_base_and_no_method_module_imports_another():
    for name in ("flexlora", "fedsvd", "fedex_lora", "flora"):
        assert issubclass(get_method(name), LayerwiseMethod) and not get_method(name).capabilities.linear
    for name in base._METHOD_MODULES:
        tree = ast.parse(Path(importlib.import_module(f"fedsim.methods.{name}").__file__).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & {f"fedsim.methods.{other}" for other in base._METHOD_MODULES}, name
