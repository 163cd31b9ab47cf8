"""A client worker: ONE frozen base model + adapter slots, reused for every client it is given.

Plain Python (no Ray): :mod:`fedsim.runtime` runs it in-process or inside a Ray actor. The
runtime fetches the global / kept state and delivers uploads; this class only computes.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.client.trainer import LocalTrainer
from fedsim.config.schema import Config
from fedsim.data.federated import FederatedData
from fedsim.methods.base import make_method
from fedsim.model.adapters import attach_adapter, get_state, set_state, state_bytes
from fedsim.model.build import BaseBlueprint, model_from_blueprint
from fedsim.types import AdapterState, ClientResult, ClientTask, ClientUpdate, EvalResult, EvalTask, RoundPlan


@dataclass(frozen=True)
class ClientOutput:
    """One client's round: metadata, what goes to the server, what the client keeps."""

    result: ClientResult
    upload: ClientUpdate | None
    keep: AdapterState | None


class ClientWorker:
    """Builds the model once; ``train`` / ``evaluate`` swap adapter tensors in place per client."""

    def __init__(self, worker_id: int, cfg: Config, blueprint: BaseBlueprint, data: FederatedData) -> None:
        self.worker_id = worker_id
        self.cfg = cfg
        self.data = data
        threads = max(1, int(cfg.runtime.cpus_per_worker))
        torch.set_num_threads(threads)
        base = model_from_blueprint(blueprint)
        self.device = torch.device("cuda" if cfg.runtime.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
        self.model = attach_adapter(base, cfg.lora, blueprint.family, cfg.seed).to(self.device)
        self.method = make_method(cfg.method, cfg.seed)
        self.trainer = LocalTrainer(self.model, cfg.federation, cfg.privacy, cfg.seed)

    def _weight(self, examples: int) -> float:
        return float(examples) if self.cfg.federation.weighting == "examples" else 1.0

    def train(self, task: ClientTask, global_state: AdapterState, kept: AdapterState | None) -> ClientOutput:
        """Train client ``task.client_id`` from (global, its kept state); never raises for client errors."""
        plan, cid = task.plan, task.client_id
        t0 = time.perf_counter()
        idx = self.data.client_train[cid]
        down = state_bytes({k: global_state[k] for k in plan.uploaded})
        try:
            set_state(self.model, self.method.client_start(global_state, kept, plan))
            ids, mask, labels = self.data.client_arrays(idx)
            outcome = self.trainer.train(plan.trained, ids, mask, labels, round=task.round, client_id=cid)
            after = get_state(self.model, plan.trained)
        except Exception as exc:  # a failing client is reported and left out of the aggregate
            result = ClientResult(
                round=task.round,
                client_id=cid,
                worker_id=self.worker_id,
                examples=len(idx),
                steps=0,
                train_loss=float("nan"),
                seconds=time.perf_counter() - t0,
                status="failed",
                bytes_down=down,
                error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
            )
            return ClientOutput(result, None, None)
        upload_t = {k: after[k] for k in plan.uploaded}
        keep = {k: after[k] for k in plan.kept} or None
        upload = ClientUpdate(cid, self._weight(outcome.examples), upload_t) if upload_t else None
        result = ClientResult(
            round=task.round,
            client_id=cid,
            worker_id=self.worker_id,
            examples=outcome.examples,
            steps=outcome.steps,
            train_loss=outcome.train_loss,
            seconds=time.perf_counter() - t0,
            status="ok",
            bytes_up=state_bytes(upload_t),
            bytes_down=down,
        )
        return ClientOutput(result, upload, keep)

    def evaluate(self, task: EvalTask, state: AdapterState) -> EvalResult:
        """Evaluate ``state`` (already personalised by the caller if needed) on ``task.indices``."""
        set_state(self.model, state)
        ids, mask, labels = self.data.client_arrays(np.asarray(task.indices, dtype=np.int64))
        loss_sum, correct, count = self.trainer.evaluate(ids, mask, labels, self.cfg.runtime.eval_batch_size)
        return EvalResult(task.name, loss_sum, correct, count)

    def personal_state(self, global_state: AdapterState, kept: AdapterState | None, plan: RoundPlan) -> AdapterState:
        """Client k's personalised model: the global state with its kept tensors."""
        return self.method.client_start(global_state, kept, plan)
