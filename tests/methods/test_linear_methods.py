"""FedAvg-LoRA, FFA-LoRA, FedSA-LoRA: roles, exactness of the aggregate, kept state."""

from __future__ import annotations

import pytest
import torch

from fedsim.config.schema import Config, MethodConfig
from fedsim.errors import ConfigError
from fedsim.methods.base import available_methods, get_method, make_method
from fedsim.types import Role
from tests.methods.helpers import LAYERS, delta_w, state, updates_from

WEIGHTS = [10.0, 30.0, 60.0]


def _method(name: str):
    return make_method(Config(method=MethodConfig(name=name)))


def _client_states(global_state, plan, n=3):
    """Clients train the plan's trainable tensors: random perturbations of the start state."""
    out = []
    for i in range(n):
        s = dict(global_state)
        g = torch.Generator().manual_seed(100 + i)
        for k in plan.trained:
            s[k] = s[k] + torch.randn(s[k].shape, generator=g)
        out.append(s)
    return out


def test_registry_lists_the_methods_and_rejects_unknown_names():
    assert {"fedavg_lora", "ffa_lora", "fedsa_lora"} <= set(available_methods())
    with pytest.raises(ConfigError, match="Did you mean .ffa_lora."):
        get_method("ffa_lor")


def test_ffa_lora_aggregate_is_exact_weighted_mean_of_delta_w():
    m = _method("ffa_lora")
    g = state(0)
    plan = m.plan(1, sorted(g), {})
    assert all(plan.roles[f"{layer}.lora_A"] == Role.FROZEN for layer in LAYERS)
    clients = _client_states(g, plan)
    for c in clients:  # A bit-identical on every client
        for layer in LAYERS:
            assert torch.equal(c[f"{layer}.lora_A"], g[f"{layer}.lora_A"])
    new, _ = m.aggregate(g, updates_from(clients, plan.uploaded, WEIGHTS), plan, {})
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    for layer in LAYERS:
        want = sum(pk * delta_w(c, layer) for pk, c in zip(p, clients, strict=True))
        torch.testing.assert_close(delta_w(new, layer), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(new[f"{layer}.lora_A"], g[f"{layer}.lora_A"])


def test_fedavg_lora_aggregate_is_not_the_mean_of_delta_w():
    m = _method("fedavg_lora")
    g = state(0)
    plan = m.plan(1, sorted(g), {})
    assert set(plan.uploaded) == set(g)
    clients = _client_states(g, plan)
    new, _ = m.aggregate(g, updates_from(clients, plan.uploaded, WEIGHTS), plan, {})
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    for layer in LAYERS:
        exact = sum(pk * delta_w(c, layer) for pk, c in zip(p, clients, strict=True))
        gap = (delta_w(new, layer) - exact).norm() / exact.norm()
        assert gap > 1e-2  # B_bar A_bar != mean(B_k A_k)
        # ...but each factor is the weighted mean of that factor
        want_a = sum(pk * c[f"{layer}.lora_A"].double() for pk, c in zip(p, clients, strict=True))
        torch.testing.assert_close(new[f"{layer}.lora_A"].double(), want_a, rtol=1e-6, atol=1e-6)


def test_fedsa_lora_uploads_only_a_and_clients_resume_from_their_own_b():
    m = _method("fedsa_lora")
    assert m.capabilities.keeps_client_state
    g = state(0)
    plan = m.plan(1, sorted(g), {})
    assert all(k.endswith("lora_A") for k in plan.uploaded)
    assert set(plan.kept) == {k for k in g if not k.endswith("lora_A")}  # B and head stay local
    clients = _client_states(g, plan)
    new, _ = m.aggregate(g, updates_from(clients, plan.uploaded, WEIGHTS), plan, {})
    for layer in LAYERS:  # B untouched on the server
        assert torch.equal(new[f"{layer}.lora_B"], g[f"{layer}.lora_B"])
    kept = {k: clients[1][k] for k in plan.kept}
    start = m.client_start(new, kept, m.plan(2, sorted(g), {}))
    for layer in LAYERS:
        assert torch.equal(start[f"{layer}.lora_B"], clients[1][f"{layer}.lora_B"])
        assert torch.equal(start[f"{layer}.lora_A"], new[f"{layer}.lora_A"])
    fresh = m.client_start(new, None, plan)  # a client never seen starts from the initial B
    assert torch.equal(fresh["enc.0.query.lora_B"], g["enc.0.query.lora_B"])


@pytest.mark.parametrize("name", ["fedavg_lora", "ffa_lora", "fedsa_lora"])
def test_identical_uploads_give_back_the_upload(name):
    m = _method(name)
    g = state(0)
    plan = m.plan(1, sorted(g), {})
    client = _client_states(g, plan, n=1)[0]
    new, _ = m.aggregate(g, updates_from([client] * 3, plan.uploaded, WEIGHTS), plan, {})
    for k in plan.uploaded:
        torch.testing.assert_close(new[k], client[k], rtol=0, atol=1e-6)
    for k in set(g) - set(plan.uploaded):
        assert torch.equal(new[k], g[k])
