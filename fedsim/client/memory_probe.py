"""One probe client's GPU memory, for ``runtime.gpus_per_worker: auto`` (see :mod:`fedsim.runtime.gpu_share`).

The probe builds a worker on the GPU exactly as a run's worker does and trains the largest client once from the
initial adapter (round 1's plan); with ``runtime.clients_per_pass`` K > 1 (``auto``: the largest K it may pick) the
K largest clients together, as the run's worker will. Nothing it computes leaves the probe: no upload, no kept
state, no ledger is stored, so it spends no privacy budget of any client and changes no result; only the peak
memory comes back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fedsim.client.worker import ClientWorker
from fedsim.config.schema import Config
from fedsim.data.federated import FederatedData
from fedsim.model.build import BaseBlueprint
from fedsim.privacy.mechanism import PrivacyMechanism
from fedsim.privacy.sampling import poisson_rate
from fedsim.types import AdapterState, ClientTask


@dataclass(frozen=True)
class MemoryProbe:
    """What one worker needed on one GPU."""

    total_bytes: int  # the device's memory
    peak_bytes: int  # the most torch's caching allocator reserved: model build + one client's training
    client_id: int  # the client trained (the largest)


def _probe_pass_size(cfg: Config) -> int:
    """Clients trained together in the probe: ``runtime.clients_per_pass``, or for ``auto`` the most the timing
    probe may choose (16, at most a round's cohort), 1 when batching is not possible."""
    from fedsim.client.pass_probe import CANDIDATES
    from fedsim.methods.batching import batching_blockers

    k = cfg.runtime.clients_per_pass
    if k == "auto":
        return 1 if batching_blockers(cfg) else min(max(CANDIDATES), cfg.federation.clients_per_round)
    return int(k)


def probe_client_memory(
    cfg: Config,
    blueprint: BaseBlueprint,
    data: FederatedData,
    initial_state: AdapterState,
    privacy: PrivacyMechanism,
) -> MemoryProbe | None:
    """Train the largest client once on ``cuda:0`` and return the peak memory; None when no GPU is visible.

    ``cfg.runtime.gpus_per_worker`` may be ``"auto"``: the probe runs with a whole GPU. Raises what building the
    model raises; a client whose training fails is reported in the probe's result and its peak still counts."""
    if not torch.cuda.is_available():
        return None
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, gpus_per_worker=1.0))
    torch.cuda.reset_peak_memory_stats(0)
    worker = ClientWorker(-1, cfg, blueprint, data, privacy)
    sizes = [len(ix) for ix in data.client_train]
    cid = max(range(len(sizes)), key=lambda c: (sizes[c], -c))
    method = worker.method  # round 1's plan, as the server computes it from the initial state
    plan = method.first_plan(initial_state)
    fields = {}
    if cfg.privacy.mode == "sample":  # memory depends on the expected batch, not on sigma
        fields = {"noise_multiplier": 1.0, "sample_rate": poisson_rate(cfg.federation.batch_size, sizes[cid])}
    k = _probe_pass_size(cfg)
    if k == 1:
        worker.train(ClientTask(1, cid, plan, **fields), initial_state, None, None)
    else:  # runtime.clients_per_pass: the k largest clients trained together, as a run's worker will
        ids = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))[:k]
        if cfg.privacy.mode == "sample":
            tasks = [ClientTask(1, c, plan, 1.0, poisson_rate(cfg.federation.batch_size, sizes[c])) for c in ids]
        else:
            tasks = [ClientTask(1, c, plan) for c in ids]
        worker.train_many(tasks, initial_state, [None] * k, [None] * k)
    torch.cuda.synchronize(0)
    peak = int(torch.cuda.max_memory_reserved(0))
    total = int(torch.cuda.get_device_properties(0).total_memory)
    del worker
    torch.cuda.empty_cache()
    return MemoryProbe(total_bytes=total, peak_bytes=peak, client_id=cid)
