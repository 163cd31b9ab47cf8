"""What a worker computes with: its live model and its executors, chosen ONCE from the config
(:func:`fedsim.client.worker.build_engine`).

``runtime.zero.stage > 0``: the base is partitioned over the ranks of a ZeRO group (:mod:`fedsim.client.zero`)
and clients train one at a time, each batch split over the ranks. Otherwise one process holds the whole base;
a client trains alone on it (:class:`fedsim.client.executors.SingleExecutor`) and, for ``runtime.clients_per_pass``
K > 1, K clients train in fused passes (:class:`fedsim.client.executors.FusedExecutor`, built on first use: it
refuses adapters it cannot batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedsim.client.executors import Executor, FusedExecutor, SingleExecutor
from fedsim.client.live_model import LiveModel
from fedsim.config.schema import Config
from fedsim.model.adapters import attach_adapter
from fedsim.model.build import BaseBlueprint, model_from_blueprint


@dataclass(frozen=True)
class Engine:
    """``live``: the worker's model; ``one``: the executor that trains one client per call; ``fused``: builds the
    executor that trains several clients in one pass (None: this engine trains them one at a time);
    ``resident_bytes``: bytes of the frozen base this process holds."""

    live: LiveModel
    one: Executor
    fused: Callable[[], Executor] | None
    resident_bytes: Callable[[], int]


def plain_engine(cfg: Config, blueprint: BaseBlueprint) -> Engine:
    """The whole base in this process, on the GPU when ``runtime.gpus_per_worker`` asks for one ("auto": the Ray
    backend resolves it first; the local backend takes a GPU) and one is visible."""
    base = model_from_blueprint(blueprint)
    gpus = cfg.runtime.gpus_per_worker
    device = torch.device("cuda" if (gpus == "auto" or gpus > 0) and torch.cuda.is_available() else "cpu")
    model = attach_adapter(base, cfg.lora, blueprint.family, cfg.seed, blueprint.task).to(device)
    live = LiveModel(model, dp=cfg.privacy.mode == "sample", base_dropout=cfg.model.base_dropout)

    def resident() -> int:
        return sum(p.numel() * p.element_size() for p in base.parameters())

    return Engine(live, SingleExecutor(live), lambda: FusedExecutor(live), resident)
