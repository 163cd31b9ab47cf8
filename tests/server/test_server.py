from __future__ import annotations

import torch

from fedsim.config.schema import Config, MethodConfig
from fedsim.server.client_store import ClientStore
from fedsim.server.cohort import largest_first, sample_cohort
from fedsim.server.parameter_server import ParameterServer
from fedsim.types import ClientUpdate
from tests.methods.helpers import state


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
            ps.receive(ClientUpdate(cid, 1.0 + cid, {k: state(10 + cid)[k] for k in plan.uploaded}))
        info = ps.aggregate(1)
        assert info.clients == 3 and info.bytes_up > 0
        results.append(ps.global_state())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k])


def test_client_store_spills_to_disk_and_returns_identical_tensors(tmp_path):
    store = ClientStore(max_in_memory=2, spill_dir=tmp_path)
    states = {c: state(c, head=False) for c in range(5)}
    for c, s in states.items():
        store.put(c, s)
    assert store.client_ids() == [0, 1, 2, 3, 4]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    for c, s in states.items():
        got = store.get(c)
        assert got is not None and all(torch.equal(got[k], s[k]) for k in s)
    assert store.get(99) is None
