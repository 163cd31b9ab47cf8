"""RoLoRA: the layer-tied B/A alternation and the exactness of its aggregate."""

from __future__ import annotations

import pytest
import torch

import fedsim.methods.rolora  # noqa: F401  (registers "rolora")
from fedsim.config.schema import Config, MethodConfig
from fedsim.methods.base import make_method
from fedsim.model.keys import factor_of
from fedsim.types import Role
from tests.methods.helpers import LAYERS, delta_w, state, updates_from

WEIGHTS = [10.0, 30.0, 60.0]


def _rolora():
    return make_method(Config(method=MethodConfig(name="rolora")))


def _clients(start, plan, n=3):
    out = []
    for i in range(n):
        s = dict(start)
        g = torch.Generator().manual_seed(200 + i)
        for k in plan.trained:
            s[k] = s[k] + torch.randn(s[k].shape, generator=g)
        out.append(s)
    return out


def test_schedule_b_on_odd_rounds_a_on_even_rounds_head_always_shared():
    m = _rolora()
    assert m.capabilities.linear and not m.capabilities.keeps_client_state
    keys = sorted(state(0))
    for t in range(1, 9):
        plan = m.plan(t, keys, m.init_server_state(state(0)))
        active, frozen = ("B", "A") if t % 2 == 1 else ("A", "B")
        assert set(plan.roles) == set(keys)
        for k, role in plan.roles.items():
            f = factor_of(k)
            want = Role.SHARED if f in ("head", active) else Role.FROZEN
            assert role == want, (t, k)
        assert not plan.kept
        assert {factor_of(k) for k in plan.uploaded} == {"head", active}
        assert {factor_of(k) for k in set(keys) - set(plan.trained)} == {frozen}


@pytest.mark.parametrize("round", [1, 2, 3, 4])
def test_aggregate_is_the_exact_weighted_mean_of_the_clients_delta_w(round):
    m = _rolora()
    g = state(0)
    plan = m.plan(round, sorted(g), {})
    start = m.client_start(g, None, plan)
    clients = _clients(start, plan)
    new, _ = m.aggregate(g, updates_from(clients, plan.uploaded, WEIGHTS), plan, {})
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    frozen = "A" if round % 2 == 1 else "B"
    for layer in LAYERS:
        want = sum(pk * delta_w(c, layer) for pk, c in zip(p, clients, strict=True))
        torch.testing.assert_close(delta_w(new, layer), want, rtol=1e-6, atol=1e-6)
        key = f"{layer}.lora_{frozen}"
        assert torch.equal(new[key], g[key])  # the frozen factor is untouched
    for k in [k for k in g if k.startswith("head.")]:
        want = sum(pk * c[k].double() for pk, c in zip(p, clients, strict=True))
        torch.testing.assert_close(new[k].double(), want, rtol=1e-6, atol=1e-6)


def test_two_rounds_chain_b_then_a():
    """Round 1 moves only B, round 2 only A; each new Delta W is the mean of what the clients had."""
    m = _rolora()
    g0 = state(1)
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    g = g0
    for t in (1, 2):
        plan = m.plan(t, sorted(g), {})
        clients = _clients(m.client_start(g, None, plan), plan)
        new, _ = m.aggregate(g, updates_from(clients, plan.uploaded, WEIGHTS), plan, {})
        for layer in LAYERS:
            want = sum(pk * delta_w(c, layer) for pk, c in zip(p, clients, strict=True))
            torch.testing.assert_close(delta_w(new, layer), want, rtol=1e-6, atol=1e-6)
        g = new
    for layer in LAYERS:  # both factors moved over the two rounds
        assert not torch.equal(g[f"{layer}.lora_A"], g0[f"{layer}.lora_A"])
        assert not torch.equal(g[f"{layer}.lora_B"], g0[f"{layer}.lora_B"])
