"""A client worker: ONE frozen base model + adapter slots, reused for every client it is given.

Plain Python (no Ray): :mod:`fedsim.runtime` runs it in-process or inside a Ray actor. The
runtime fetches the global / kept state and delivers uploads; this class only computes.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsim.client.causal_lm import evaluate_lm
from fedsim.client.trainer import LocalTrainer, TrainOutcome
from fedsim.config.schema import Config
from fedsim.data.federated import FederatedData
from fedsim.methods.base import make_method
from fedsim.model.adapters import attach_adapter, get_state, set_state
from fedsim.model.build import BaseBlueprint, model_from_blueprint
from fedsim.model.keys import is_residual, layer_of
from fedsim.privacy.mechanism import NoPrivacy, PrivacyMechanism
from fedsim.privacy.sampling import expected_batch_size
from fedsim.types import (
    AdapterState,
    ClientResult,
    ClientTask,
    ClientUpdate,
    EvalResult,
    EvalTask,
    RoundPlan,
    SignalContext,
    state_bytes,
)

if TYPE_CHECKING:  # the batched trainer is imported by train_many, the first time a worker trains K clients
    from fedsim.client.batched_trainer import BatchedTrainer, ClientTrained


@dataclass(frozen=True)
class ClientOutput:
    """One client's round: metadata, what goes to the server, what the client keeps."""

    result: ClientResult
    upload: ClientUpdate | None
    keep: AdapterState | None
    ledger: dict | None = None  # the client's updated PrivacyLedger (JSON) when the privacy mechanism keeps one


@dataclass
class _Pre:
    """A client about to train (from :meth:`ClientWorker._begin`): task, start time, its shard's row indices, bytes
    down, the fixed fields of its result row, its open ledger and the seconds its preparation took."""

    task: ClientTask
    t0: float
    idx: np.ndarray
    down: int
    base: dict[str, Any]
    ledger: Any
    elapsed: float


class ClientWorker:
    """Builds the model once; ``train`` / ``evaluate`` swap adapter tensors in place per client. ``privacy``: the
    run's mechanism (default none), asked for everything privacy-related around a client's training."""

    def __init__(
        self,
        worker_id: int,
        cfg: Config,
        blueprint: BaseBlueprint,
        data: FederatedData,
        privacy: PrivacyMechanism | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.cfg = cfg
        self.data = data
        self.privacy = privacy if privacy is not None else NoPrivacy()
        threads = max(1, int(cfg.runtime.cpus_per_worker))
        torch.set_num_threads(threads)
        base = model_from_blueprint(blueprint)
        gpus = cfg.runtime.gpus_per_worker  # "auto": the Ray backend resolves it first; the local backend takes a GPU
        self.device = torch.device("cuda" if (gpus == "auto" or gpus > 0) and torch.cuda.is_available() else "cpu")
        self.model = attach_adapter(base, cfg.lora, blueprint.family, cfg.seed, blueprint.task).to(self.device)
        self.method = make_method(cfg)
        # gradient copies only for a method whose client signals read them
        keep = self.method.capabilities.signals
        self.trainer = LocalTrainer(
            self.model,
            cfg.federation,
            cfg.privacy,
            cfg.seed,
            base_dropout=cfg.model.base_dropout,
            keep_gradients=keep,
        )
        self._batched: BatchedTrainer | None = None  # built on the first train_many
        self._w0: dict[str, torch.Tensor] = {}  # original base weights of layers that received a residual
        self._applied: dict[str, torch.Tensor] = {}  # residual currently folded into each base weight

    def _base_weight(self, layer: str) -> torch.nn.Parameter:
        module = self.model.base_model.model.get_submodule(layer)
        return module.base_layer.weight if hasattr(module, "base_layer") else module.weight

    @torch.no_grad()
    def _load(self, state: AdapterState) -> None:
        """Put ``state`` into the model: base weight = W0 + residual for residual keys, adapter tensors in place."""
        for key, residual in state.items():
            if not is_residual(key):
                continue
            if key in self._applied and torch.equal(self._applied[key], residual):
                continue
            layer = layer_of(key)
            weight = self._base_weight(layer)
            if layer not in self._w0:
                self._w0[layer] = weight.detach().clone()
            weight.copy_(self._w0[layer] + residual.to(device=weight.device, dtype=weight.dtype))
            self._applied[key] = residual.detach().clone()
        set_state(self.model, {k: v for k, v in state.items() if not is_residual(k)})

    def _weight(self, examples: int) -> float:
        return float(examples) if self.cfg.federation.weighting == "examples" else 1.0

    def train(
        self, task: ClientTask, global_state: AdapterState, kept: AdapterState | None, ledger_json: dict | None = None
    ) -> ClientOutput:
        """Train client ``task.client_id`` from (global, its kept state); never raises for client errors.

        The privacy mechanism decides: a client it finds exhausted (its next participation would pass
        ``privacy.epsilon``) does not train (status ``budget_exhausted``); DP-SGD's noise multiplier; what is
        uploaded (client-level DP: the clipped delta of the shared tensors); the ledger charged for the steps taken.
        """
        pre = self._begin(task, global_state, ledger_json)
        if isinstance(pre, ClientOutput):
            return pre
        try:
            start = self.method.client_start(global_state, kept, task.plan)
            self._load(start)
            ids, mask, labels = self.data.client_arrays(pre.idx)
            outcome = self.trainer.train(
                task.plan.trained,
                ids,
                mask,
                labels,
                round=task.round,
                client_id=task.client_id,
                noise_multiplier=self.privacy.dpsgd_noise(task),
            )
            after = get_state(self.model, task.plan.trained)
        except Exception as exc:  # a failing client is reported and left out of the aggregate
            return self._failed(pre, exc)
        return self._finish(pre, start, after, outcome)

    def train_many(
        self,
        tasks: Sequence[ClientTask],
        global_state: AdapterState | Sequence[AdapterState],
        kepts: Sequence[AdapterState | None],
        ledgers: Sequence[dict | None],
    ) -> list[ClientOutput]:
        """Train several clients of one round TOGETHER (``runtime.clients_per_pass``; see
        :mod:`fedsim.client.batched_trainer`); one output per task, in order, each equal to what :meth:`train` gives
        that client alone (up to float rounding; ``seconds`` is its share of the pass). ``global_state``: one
        state for all tasks, or one per task. Never raises for client errors; raises ValueError when the tasks are
        not of one round with one trained set, or the lists differ in length."""
        from fedsim.client.batched_trainer import BatchedTrainer, ClientInput

        tasks = list(tasks)
        globals_ = list(global_state) if isinstance(global_state, (list, tuple)) else [global_state] * len(tasks)
        if not len(globals_) == len(kepts) == len(ledgers) == len(tasks):
            raise ValueError("train_many needs one global state (or one per task), kept state and ledger per task")
        if len({(t.round, tuple(t.plan.trained)) for t in tasks}) > 1:
            raise ValueError("train_many trains clients of one round with one trained set together")
        outputs: list[ClientOutput | None] = [None] * len(tasks)
        todo: list[tuple[int, _Pre, AdapterState, ClientInput]] = []
        for i, (task, g, kept, ledger) in enumerate(zip(tasks, globals_, kepts, ledgers, strict=True)):
            pre = self._begin(task, g, ledger)
            if isinstance(pre, ClientOutput):
                outputs[i] = pre
                continue
            try:
                start = self.method.client_start(g, kept, task.plan)
                ids, mask, labels = self.data.client_arrays(pre.idx)
                noise = self.privacy.dpsgd_noise(task)
                todo.append((i, pre, start, ClientInput(task.client_id, start, ids, mask, labels, noise)))
            except Exception as exc:
                outputs[i] = self._failed(pre, exc)
        if todo:
            try:
                if self._batched is None:
                    self._batched = BatchedTrainer(self.trainer)
                trained = self._batched.train(tasks[0].plan.trained, [c for *_, c in todo], tasks[0].round)
            except Exception as exc:  # the pass itself failed: every client of it is a failed row
                trained = [exc] * len(todo)
            for (i, pre, start, _), res in zip(todo, trained, strict=True):
                outputs[i] = self._failed(pre, res) if isinstance(res, Exception) else self._adopt(pre, start, res)
        return [out for out in outputs if out is not None]

    def _adopt(self, pre: _Pre, start: AdapterState, res: ClientTrained) -> ClientOutput:
        """:meth:`_finish` for a client trained in a pass: first its last gradients (and last batch) go to the
        trainer, where the method's signals read them, and its start + trained tensors into the model when the
        method asks for raw losses (which evaluate the model)."""
        keys = pre.task.plan.trained
        if self.method.needs_raw_loss(pre.task.round):
            set_state(self.model, {**start, **res.trained})
        self.trainer.adopt_signals(keys, res.last_grads, res.prev_grads, res.prev_step, res.last_batch)
        pre.t0 = time.perf_counter() - pre.elapsed - res.outcome.seconds  # its own work + its share of the pass
        return self._finish(pre, start, res.trained, res.outcome)

    def _begin(self, task: ClientTask, global_state: AdapterState, ledger_json: dict | None) -> _Pre | ClientOutput:
        """What every client's training starts with: its row metadata, bytes down, ledger; the final output
        instead when the privacy mechanism finds the client exhausted."""
        t0 = time.perf_counter()
        cid, privacy = task.client_id, self.privacy
        idx = self.data.client_train[cid]
        down = state_bytes({k: global_state[k] for k in self.method.broadcast_keys(task.plan) if k in global_state})
        base = {
            "round": task.round,
            "client_id": cid,
            "worker_id": self.worker_id,
            "examples": len(idx),
            "noise_multiplier": task.noise_multiplier,
            "sample_rate": task.sample_rate,
        }
        ledger = privacy.open_ledger(ledger_json)
        if privacy.exhausted(task, ledger):
            result = ClientResult(
                **base,
                steps=0,
                train_loss=float("nan"),
                seconds=time.perf_counter() - t0,
                status="budget_exhausted",
                epsilon=privacy.epsilon_of(ledger),
            )
            return ClientOutput(result, None, None, None)
        return _Pre(task, t0, idx, down, base, ledger, time.perf_counter() - t0)

    def _failed(self, pre: _Pre, exc: BaseException) -> ClientOutput:
        """A client whose training raised: a ``failed`` row, nothing uploaded, kept or charged."""
        result = ClientResult(
            **pre.base,
            steps=0,
            train_loss=float("nan"),
            seconds=time.perf_counter() - pre.t0,
            status="failed",
            bytes_down=pre.down,
            error=f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc, limit=3))}",
        )
        return ClientOutput(result, None, None, None)

    def _finish(self, pre: _Pre, start: AdapterState, after: AdapterState, outcome: TrainOutcome) -> ClientOutput:
        """A trained client's output: the privatised upload and weight, the ledger charged for the steps taken, the
        kept tensors, the method's signals (from the trainer's last gradients)."""
        task, privacy, plan = pre.task, self.privacy, pre.task.plan
        upload_t, weight = privacy.upload(
            {k: start[k] for k in plan.uploaded}, {k: after[k] for k in plan.uploaded}, self._weight(outcome.examples)
        )
        ledger = privacy.charge(pre.ledger, task, outcome.steps)  # only the steps really taken
        keep = {k: after[k] for k in plan.kept} or None
        signals = self.method.client_signal(plan, self.trainer.last_grads, self._signal_context(task, len(pre.idx)))
        upload = ClientUpdate(task.client_id, weight, upload_t, signals) if upload_t else None
        result = ClientResult(
            **pre.base,
            steps=outcome.steps,
            train_loss=outcome.train_loss,
            seconds=time.perf_counter() - pre.t0,
            status="ok",
            bytes_up=state_bytes(upload_t) + 4 * len(signals),  # signals travel as float32
            bytes_down=pre.down,
            epsilon=privacy.epsilon_of(ledger),
        )
        return ClientOutput(result, upload, keep, ledger.to_json() if ledger is not None else None)

    def _signal_context(self, task: ClientTask, n: int) -> SignalContext:
        fe = self.cfg.federation
        batch = float(expected_batch_size(fe.batch_size, n))
        return SignalContext(
            round=task.round,
            client_id=task.client_id,
            lr=fe.lr,
            batch_size=batch,
            noise_std=self.privacy.signal_noise_std(task, batch),
            prev_grads=self.trainer.prev_grads,
            prev_step=self.trainer.prev_step,
            plain_sgd=fe.optimizer == "sgd",
            raw_loss=self.trainer.raw_loss if self.method.needs_raw_loss(task.round) else None,
        )

    def evaluate(self, task: EvalTask, state: AdapterState) -> EvalResult:
        """Evaluate ``state`` (already personalised by the caller if needed) on ``task.indices``.

        causal_lm: ``loss_sum`` sums the per-example mean response losses, ``correct`` counts exact-match greedy
        answers, ``token_loss_sum`` / ``tokens`` give the perplexity."""
        self._load(state)
        idx = np.asarray(task.indices, dtype=np.int64)
        ids, mask, labels = self.data.client_arrays(idx)
        lm = self.data.lm
        if lm is not None:
            loss_sum, correct, count, tok_sum, tokens = evaluate_lm(
                self.trainer.model,
                ids,
                mask,
                labels,
                lm.response_start[idx],
                [lm.answers[i] for i in idx],
                lm,
                self.cfg.runtime.eval_batch_size,
                self.cfg.task.max_new_tokens,
            )
            return EvalResult(task.name, loss_sum, correct, count, token_loss_sum=tok_sum, tokens=tokens)
        loss_sum, correct, count = self.trainer.evaluate(ids, mask, labels, self.cfg.runtime.eval_batch_size)
        return EvalResult(task.name, loss_sum, correct, count)

    def personal_state(self, global_state: AdapterState, kept: AdapterState | None, plan: RoundPlan) -> AdapterState:
        """Client k's personalised model: the global state with its kept tensors."""
        return self.method.client_start(global_state, kept, plan)
