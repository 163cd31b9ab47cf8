"""A client worker: ONE frozen base model + adapter slots, reused for every client it is given.

Plain Python (no Ray): :mod:`fedsim.runtime` runs it in-process or inside a Ray actor. The
runtime fetches the global / kept state and delivers uploads; this class only computes.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.client.causal_lm import evaluate_lm
from fedsim.client.engine import Engine, plain_engine
from fedsim.client.protocol import ClientOutput, Kepts, Ledgers, States, Tasks
from fedsim.client.step_loop import ClientInput, ClientTrained, LocalTrainer
from fedsim.config.schema import Config
from fedsim.data.federated import FederatedData
from fedsim.methods.base import make_method
from fedsim.model.build import BaseBlueprint
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


def build_engine(cfg: Config, blueprint: BaseBlueprint) -> Engine:
    """The engine ``cfg`` asks for (:mod:`fedsim.client.engine`): ``runtime.zero.stage > 0`` the ZeRO engine
    (this process must have joined its group: :func:`fedsim.client.zero.init_group`), else the whole base here."""
    if cfg.runtime.zero.stage > 0:
        from fedsim.client.zero import zero_engine  # DeepSpeed: imported only for ZeRO groups

        return zero_engine(cfg, blueprint)
    return plain_engine(cfg, blueprint)


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
    """One worker: an :class:`fedsim.client.engine.Engine` (its model and executors, from the config unless
    given) and the step loop over them; ``train`` / ``evaluate`` swap adapter tensors in place per client.
    ``privacy``: the run's mechanism (default none), asked for everything privacy-related around a client's
    training. Satisfies :class:`fedsim.client.protocol.Worker`."""

    def __init__(
        self,
        worker_id: int,
        cfg: Config,
        blueprint: BaseBlueprint,
        data: FederatedData,
        privacy: PrivacyMechanism | None = None,
        *,
        engine: Engine | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.cfg = cfg
        self.data = data
        self.privacy = privacy if privacy is not None else NoPrivacy()
        torch.set_num_threads(max(1, int(cfg.runtime.cpus_per_worker)))
        self.engine = engine if engine is not None else build_engine(cfg, blueprint)
        self.live = self.engine.live
        self.model = self.live.model
        self.method = make_method(cfg)
        # gradient copies only for a method whose client signals read them
        self.keep_gradients = self.method.capabilities.signals
        self.trainer = self._trainer(self.engine.one)
        self._fused: LocalTrainer | None = None  # built on the first train_many (engines that fuse clients)

    def _trainer(self, executor: Any) -> LocalTrainer:
        cfg = self.cfg
        return LocalTrainer(executor, cfg.federation, cfg.privacy, cfg.seed, keep_gradients=self.keep_gradients)

    def fused_trainer(self) -> LocalTrainer | None:
        """The step loop over the engine's fused executor (built on first use; ValueError for adapters it cannot
        batch); None when the engine trains one client at a time."""
        if self._fused is None and self.engine.fused is not None:
            self._fused = self._trainer(self.engine.fused())
        return self._fused

    def _weight(self, examples: int) -> float:
        return float(examples) if self.cfg.federation.weighting == "examples" else 1.0

    def _input(self, task: ClientTask, pre: _Pre, start: AdapterState) -> ClientInput:
        ids, mask, labels = self.data.client_arrays(pre.idx)
        return ClientInput(task.client_id, start, ids, mask, labels, self.privacy.dpsgd_noise(task))

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
            (res,) = self.trainer.train(task.plan.trained, [self._input(task, pre, start)], round=task.round)
            if isinstance(res, Exception):
                raise res
        except Exception as exc:  # a failing client is reported and left out of the aggregate
            return self._failed(pre, exc)
        return self._finish(pre, start, res)

    def train_many(self, tasks: Tasks, global_state: States, kepts: Kepts, ledgers: Ledgers) -> list[ClientOutput]:
        """Train several clients of one round TOGETHER (``runtime.clients_per_pass``; see
        :class:`fedsim.client.executors.FusedExecutor`); one output per task, in order, each equal to what
        :meth:`train` gives that client alone (up to float rounding; ``seconds`` is its share of the pass). An
        engine that does not fuse clients (a ZeRO group) trains them one after another. ``global_state``: one
        state for all tasks, or one per task. Never raises for client errors; raises ValueError when the tasks are
        not of one round with one trained set, or the lists differ in length."""
        tasks = list(tasks)
        globals_ = list(global_state) if isinstance(global_state, (list, tuple)) else [global_state] * len(tasks)
        if not len(globals_) == len(kepts) == len(ledgers) == len(tasks):
            raise ValueError("train_many needs one global state (or one per task), kept state and ledger per task")
        if len({(t.round, tuple(t.plan.trained)) for t in tasks}) > 1:
            raise ValueError("train_many trains clients of one round with one trained set together")
        if self.engine.fused is None:
            return [self.train(*args) for args in zip(tasks, globals_, kepts, ledgers, strict=True)]
        outputs: list[ClientOutput | None] = [None] * len(tasks)
        todo: list[tuple[int, _Pre, AdapterState, ClientInput]] = []
        for i, (task, g, kept, ledger) in enumerate(zip(tasks, globals_, kepts, ledgers, strict=True)):
            pre = self._begin(task, g, ledger)
            if isinstance(pre, ClientOutput):
                outputs[i] = pre
                continue
            try:
                start = self.method.client_start(g, kept, task.plan)
                todo.append((i, pre, start, self._input(task, pre, start)))
            except Exception as exc:
                outputs[i] = self._failed(pre, exc)
        if todo:
            try:
                fused = self.fused_trainer()
                assert fused is not None
                trained = fused.train(tasks[0].plan.trained, [c for *_, c in todo], round=tasks[0].round)
            except Exception as exc:  # the pass itself failed: every client of it is a failed row
                trained = [exc] * len(todo)
            for (i, pre, start, _), res in zip(todo, trained, strict=True):
                if isinstance(res, Exception):
                    outputs[i] = self._failed(pre, res)
                    continue
                pre.t0 = time.perf_counter() - pre.elapsed - res.outcome.seconds  # its own work + its pass share
                outputs[i] = self._finish(pre, start, res)
        return [out for out in outputs if out is not None]

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

    def _finish(self, pre: _Pre, start: AdapterState, res: ClientTrained) -> ClientOutput:
        """A trained client's output: the privatised upload and weight, the ledger charged for the steps taken, the
        kept tensors, the method's signals (from its last gradients; raw losses evaluate the model with its start +
        trained tensors loaded)."""
        task, privacy, plan, outcome, after = pre.task, self.privacy, pre.task.plan, res.outcome, res.trained
        upload_t, weight = privacy.upload(
            {k: start[k] for k in plan.uploaded}, {k: after[k] for k in plan.uploaded}, self._weight(outcome.examples)
        )
        ledger = privacy.charge(pre.ledger, task, outcome.steps)  # only the steps really taken
        keep = {k: after[k] for k in plan.kept} or None
        raw_loss = None
        if self.method.needs_raw_loss(task.round):
            self.live.load({**start, **after})
            raw_loss = self._raw_loss(list(plan.trained), res)
        context = self._signal_context(task, len(pre.idx), res, raw_loss)
        signals = self.method.client_signal(plan, res.last_grads, context)
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

    def _raw_loss(self, keys: list[str], res: ClientTrained) -> Callable[[dict[str, torch.Tensor]], float]:
        """The loss of ``res``'s last non-empty batch at (trained tensors + offsets), in eval mode: RAW data,
        outside any DP guarantee. The callable raises RuntimeError when the client had no non-empty batch."""

        def raw_loss(offsets: dict[str, torch.Tensor]) -> float:
            if res.last_batch is None:
                raise RuntimeError("raw_loss: the client's training had no non-empty batch")
            return self.live.raw_loss(keys, res.last_batch, offsets)

        return raw_loss

    def _signal_context(
        self, task: ClientTask, n: int, res: ClientTrained, raw_loss: Callable[[dict[str, torch.Tensor]], float] | None
    ) -> SignalContext:
        fe = self.cfg.federation
        batch = float(expected_batch_size(fe.batch_size, n))
        return SignalContext(
            round=task.round,
            client_id=task.client_id,
            lr=fe.lr,
            batch_size=batch,
            noise_std=self.privacy.signal_noise_std(task, batch),
            prev_grads=res.prev_grads,
            prev_step=res.prev_step,
            plain_sgd=fe.optimizer == "sgd",
            raw_loss=raw_loss,
        )

    def evaluate(self, task: EvalTask, state: AdapterState) -> EvalResult:
        """Evaluate ``state`` (already personalised by the caller if needed) on ``task.indices``.

        causal_lm: ``loss_sum`` sums the per-example mean response losses, ``correct`` counts exact-match greedy
        answers, ``token_loss_sum`` / ``tokens`` give the perplexity."""
        self.live.load(state)
        idx = np.asarray(task.indices, dtype=np.int64)
        ids, mask, labels = self.data.client_arrays(idx)
        lm = self.data.lm
        if lm is not None:
            loss_sum, correct, count, tok_sum, tokens = evaluate_lm(
                self.model,
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
        loss_sum, correct, count = self.live.evaluate(ids, mask, labels, self.cfg.runtime.eval_batch_size)
        return EvalResult(task.name, loss_sum, correct, count)

    def personal_state(self, global_state: AdapterState, kept: AdapterState | None, plan: RoundPlan) -> AdapterState:
        """Client k's personalised model: the global state with its kept tensors."""
        return self.method.client_start(global_state, kept, plan)

    def resident_bytes(self) -> int:
        """Bytes of the frozen base this process holds (a ZeRO rank: its partitions)."""
        return int(self.engine.resident_bytes())
