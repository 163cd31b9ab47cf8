"""Worker pre-sums on Ray: one message per worker per round, the same aggregate as the in-process backend, and a
client id that reaches the server twice in a round is rejected (tiny-bert + synthetic, 2 CPUs)."""

from __future__ import annotations

import pytest
import ray
import torch

from fedsim.data.federated import build_federated_data
from fedsim.data.sources import load_source
from fedsim.model.adapters import attach_adapter, get_state
from fedsim.model.build import blueprint_of, build_base_model, build_tokenizer
from fedsim.runtime.backend import RunSetup
from fedsim.runtime.local import LocalBackend
from fedsim.runtime.ray_backend import RayBackend
from fedsim.server.cohort import sample_cohort
from fedsim.types import ClientTask
from fedsim.validation import load_config


def _setup(tmp_path, *overrides: str) -> RunSetup:
    cfg, _ = load_config("tiny", ["runtime.workers=2", "federation.local_steps=1", *overrides])
    dataset = load_source(cfg.data, cfg.seed)
    tokenizer = build_tokenizer(cfg.model, dataset.texts)
    data = build_federated_data(cfg, dataset, tokenizer)
    base = build_base_model(cfg.model, data.num_labels, tokenizer, cfg.seed)
    blueprint = blueprint_of(base)  # before the adapter is attached (PEFT wraps the model in place)
    initial = get_state(attach_adapter(base, cfg.lora, blueprint.family, cfg.seed))
    return RunSetup(cfg, blueprint, data, initial, run_dir=tmp_path)


@pytest.mark.ray
def test_workers_send_one_presummed_message_each_and_match_the_local_backend(tmp_path, ray_cluster):
    setup = _setup(tmp_path, "method.name=ffa_lora")
    fed = setup.cfg.federation
    cohort = sample_cohort(setup.cfg.seed, 1, fed.clients, fed.clients_per_round)
    assert len(cohort) == 4

    local = LocalBackend(setup)
    tasks = [ClientTask(1, c, local.plan(1)) for c in cohort]
    local.train(tasks)
    want_info = local.aggregate(1)
    want = local.global_state()

    backend = RayBackend(setup)
    try:
        results = backend.train([ClientTask(1, c, backend.plan(1)) for c in cohort])
        assert [r.client_id for r in results] == cohort and all(r.status == "ok" for r in results)
        assert ray.get(backend.server.received_ids.remote(1)) == cohort
        workers_used = {r.worker_id for r in results}

        # a client already received this round, trained again on a worker: its flush is refused
        again = backend.workers[0].train.remote(
            backend.shared, ClientTask(1, cohort[0], backend.plan(1)), backend.server.global_state.remote()
        )
        ray.get(again)
        with pytest.raises(ray.exceptions.RayTaskError, match="twice"):
            ray.get(backend.workers[0].flush.remote(1))

        info = backend.aggregate(1)
        got = backend.global_state()
    finally:
        backend.shutdown()
    assert info.clients == want_info.clients == 4
    assert info.messages == len(workers_used) == 2  # one pre-summed message per worker (local: one per client)
    assert want_info.messages == 4
    assert info.bytes_up == want_info.bytes_up == sum(r.bytes_up for r in results)
    changed = [k for k in want if not torch.equal(want[k], setup.initial_state[k])]
    assert changed  # the round moved B
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
