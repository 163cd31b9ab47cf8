"""The one actor process of the parameter server and client store (fedsim.runtime.server_home): no Ray needed."""

from __future__ import annotations

import torch

from fedsim.config.schema import Config, MethodConfig
from fedsim.runtime.server_home import SERVER_METHODS, STORE_METHODS, ServerHome, public_methods
from fedsim.server.client_store import ClientStore
from fedsim.server.parameter_server import ParameterServer
from tests.methods.helpers import state


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs)) or name


def test_every_public_method_of_server_and_store_is_forwarded_to_its_owner():
    assert SERVER_METHODS == public_methods(ParameterServer) and STORE_METHODS == public_methods(ClientStore)
    assert {"plan", "aggregate", "receive_partial", "received_ids", "global_state"} <= SERVER_METHODS
    assert {"get_client", "put_client", "snapshot", "restore", "client_ids"} <= STORE_METHODS
    assert SERVER_METHODS.isdisjoint(STORE_METHODS)
    home = ServerHome((None, None), Config(method=MethodConfig("fedavg_lora")), state(0))
    home.server, home.store = _Recorder(), _Recorder()
    for name in sorted(SERVER_METHODS | STORE_METHODS):
        assert getattr(home, name)(7, key="v") == name
    assert [c[0] for c in home.server.calls] == sorted(SERVER_METHODS)
    assert [c[0] for c in home.store.calls] == sorted(STORE_METHODS)
    assert all(c[1:] == ((7,), {"key": "v"}) for c in home.server.calls + home.store.calls)


def test_a_home_serves_a_round_like_a_separate_server_and_store():
    cfg = Config(method=MethodConfig("fedsa_lora"))  # A uploaded, B kept per client
    home, alone = ServerHome((None, None), cfg, state(0)), ParameterServer(cfg, state(0))
    plan = home.plan(1)
    assert plan == alone.plan(1) and plan.kept
    kept = {k: state(3)[k] for k in plan.kept}
    home.put_client(4, kept, {"steps": 2}, round=1)
    got, ledger = home.get_client(4, True, round=2)
    assert ledger == {"steps": 2} and all(torch.equal(got[k], kept[k]) for k in kept)
    assert home.client_ids() == [4]
    g0 = home.global_state()
    assert all(torch.equal(g0[k], alone.global_state()[k]) for k in g0)
