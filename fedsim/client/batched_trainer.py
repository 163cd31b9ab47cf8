"""K clients' local training in fused passes (``runtime.clients_per_pass > 1``): torch + Opacus only.

Each client is trained exactly as :meth:`fedsim.client.trainer.LocalTrainer.train` trains it alone, with the same
draws: its batches from ``batch_schedule`` with ``torch_generator(seed, "batches", t, k)``, its own optimizer (SGD or
AdamW, fresh per round) over its own copies of the trained tensors (in the order of ``keys``) and, under DP, its
own DPOptimizer (``LocalTrainer._dp_optimizer``) with its noise generator seeded ``derive_seed(seed, "dp_noise", t,
k)``, expected batch ``min(batch_size, n_k)`` and its own noise multiplier. What is shared is the forward and
backward of the frozen base: local step i concatenates the clients' i-th batches (client order = the order given),
runs the model once with :class:`fedsim.client.multi_adapter.MultiAdapter` applying each row's own client's
tensors, and backpropagates the SUM of the clients' MEAN losses, so each client's tensors get exactly its own
gradient. Under DP each client's per-example gradients (recorded in the backward, Opacus' formulas) become
``p.grad_sample`` of its tensors and its own DPOptimizer clips them, adds its noise draw and steps: the same
clipping, the same noise (same generator, same parameter order and shapes) and the same scaling as alone.

Unequal clients need no fallback: a client contributes the rows of its batch (any size); one whose Poisson batch is
empty contributes none and takes a noise-only DP step (``set_empty_grad_samples``); one whose shard is empty takes
no step (as alone); one whose loss is not finite gets the same FloatingPointError as alone and leaves the pass (its
rows never reach another client's gradients: rows are independent in the base). Needs ``model.base_dropout:
false`` (nothing random in the pass); the global RNG is left as it was.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.client.causal_lm import causal_lm_forward
from fedsim.client.multi_adapter import Group, MultiAdapter
from fedsim.client.padding import trim_padding
from fedsim.client.trainer import LocalTrainer, TrainOutcome, batch_schedule
from fedsim.model.adapters import set_trainable
from fedsim.model.train_mode import set_train_mode
from fedsim.privacy.sampling import expected_batch_size, set_empty_grad_samples
from fedsim.seeding import derive_seed, torch_generator
from fedsim.types import AdapterState


@dataclass(frozen=True)
class ClientInput:
    """One client of a pass: its start state (EVERY adapter key: frozen ones too, they may differ per client), its
    shard (``ids``/``mask`` ``[n, L]``, ``labels`` ``[n]`` or ``[n, L]``; L the same for all clients of a pass) and,
    under DP, its noise multiplier (None: ``privacy.noise_multiplier``)."""

    client_id: int
    start: Mapping[str, torch.Tensor]
    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    noise_multiplier: float | None = None


@dataclass(frozen=True)
class ClientTrained:
    """One client's training, as :class:`LocalTrainer` leaves it: the outcome, the trained tensors (CPU), the
    gradients of its last two steps and the step between them, and its last non-empty batch (for ``raw_loss``)."""

    outcome: TrainOutcome
    trained: AdapterState
    last_grads: dict[str, torch.Tensor]
    prev_grads: dict[str, torch.Tensor]
    prev_step: dict[str, torch.Tensor]
    last_batch: tuple[torch.Tensor, ...] | None


@dataclass
class _Run:
    """The mutable training state of one client of a pass."""

    slot: int
    client_id: int
    n: int
    schedule: list[torch.Tensor]
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    params: list[torch.Tensor] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    losses: list[float] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    prev_step: dict[str, torch.Tensor] = field(default_factory=dict)
    last_batch: tuple[torch.Tensor, ...] | None = None
    error: Exception | None = None


class BatchedTrainer:
    """Trains several clients together on ``trainer``'s model (and with its settings: federation, privacy, seed,
    optimizer and DP-optimizer factories). Raises ValueError when ``trainer.base_dropout`` is true and what
    :class:`MultiAdapter` raises for adapters it cannot batch."""

    def __init__(self, trainer: LocalTrainer) -> None:
        if trainer.base_dropout:
            raise ValueError("training several clients in one pass needs model.base_dropout: false")
        self.trainer = trainer
        self.multi = MultiAdapter(trainer.model)

    def train(
        self, keys: Sequence[str], clients: Sequence[ClientInput], round: int, *, steps: int | None = None
    ) -> list[ClientTrained | Exception]:
        """Train every client of ``clients`` for ``federation.local_steps`` steps on ``keys`` (the same trained set
        for all); one result per client, in order: what it trained, or the exception that stopped it (ValueError
        for mismatched array lengths, FloatingPointError for a non-finite loss, as :meth:`LocalTrainer.train`).
        ``steps`` overrides ``federation.local_steps`` (the timing probe). Raises ValueError for an empty ``keys``,
        KeyError when a start state lacks an adapter key. The model's own
        adapter tensors are not changed; it is left in eval mode with no gradient state."""
        started = time.perf_counter()
        keys = list(keys)
        if not keys:
            raise ValueError("train() needs at least one trainable adapter key")
        runs = [self._run(slot, c, round, steps) for slot, c in enumerate(clients)]
        params = self.multi.load([c.start for c in clients], keys)
        for run, mine, c in zip(runs, params, clients, strict=True):
            run.params, run.optimizer = mine, self._optimizer(mine, run, c.noise_multiplier, round)
        model, tr = self.trainer.model, self.trainer
        set_trainable(model, [])  # the live tensors take no part in a fused pass
        tr._clear()  # as between clients of LocalTrainer (Opacus imported only under DP)
        hooked = tr._forward_module if tr.dp else None
        device = tr.device
        try:
            if hooked is not None:
                hooked.disable_hooks()  # Opacus' hooks on the live modules: per-example gradients are ours here
            set_train_mode(model, base_dropout=False)
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    for i in range(max((len(r.schedule) for r in runs), default=0)):
                        self._step(i, keys, [r for r in runs if r.error is None and i < len(r.schedule)], round)
        finally:
            if hooked is not None:
                hooked.enable_hooks()
            tr._clear()
            model.eval()
        share = (time.perf_counter() - started) / max(1, len(runs))
        out: list[ClientTrained | Exception] = []
        for run in runs:
            if run.error is not None:
                out.append(run.error)
                continue
            outcome = TrainOutcome(
                steps=len(run.schedule),
                examples=run.n,
                train_loss=float(np.mean(run.losses)) if run.losses else math.nan,
                seconds=share,
            )
            grads = run.grads
            out.append(
                ClientTrained(
                    outcome,
                    self.multi.state(run.slot, keys),
                    grads[-1] if grads else {},
                    grads[-2] if len(grads) == 2 else {},
                    run.prev_step,
                    trim_padding(*run.last_batch) if run.last_batch else None,  # as LocalTrainer keeps it
                )
            )
        self.multi.tensors = []
        return out

    def _run(self, slot: int, c: ClientInput, round: int, steps: int | None) -> _Run:
        n = len(c.labels)
        data = tuple(torch.as_tensor(np.asarray(a), dtype=torch.long) for a in (c.ids, c.mask, c.labels))
        fed, tr = self.trainer.federation, self.trainer
        gen = torch_generator(tr.seed, "batches", round, c.client_id)
        steps = fed.local_steps if steps is None else steps
        run = _Run(slot, c.client_id, n, batch_schedule(n, fed.batch_size, steps, tr.dp, gen), data)
        if len(c.ids) != n or len(c.mask) != n:
            run.error = ValueError(
                f"ids ({len(c.ids)}), mask ({len(c.mask)}) and labels ({n}) must have the same length"
            )
        return run

    def _optimizer(
        self, params: list[torch.Tensor], run: _Run, noise_multiplier: float | None, round: int
    ) -> torch.optim.Optimizer:
        """The client's optimizer, built as :meth:`LocalTrainer.train` builds it."""
        tr = self.trainer
        optimizer = tr._optimizer(params)
        if not tr.dp:
            return optimizer
        noise_gen = torch.Generator(device=tr.device)
        noise_gen.manual_seed(derive_seed(tr.seed, "dp_noise", round, run.client_id))
        expected = expected_batch_size(tr.federation.batch_size, run.n)
        sigma = tr.privacy.noise_multiplier if noise_multiplier is None else noise_multiplier
        return tr._dp_optimizer(optimizer, sigma, expected, noise_gen)

    def _step(self, i: int, keys: list[str], active: list[_Run], round: int) -> None:
        """Local step ``i`` of the ``active`` clients: one fused forward/backward, then each client's own step."""
        for run in active:
            run.optimizer.zero_grad(set_to_none=True)
            if len(run.schedule[i]) == 0:
                set_empty_grad_samples(run.params)  # a noise-only DP step, as alone
        rows = [r for r in active if len(r.schedule[i]) > 0]
        if rows:
            self._fused_backward(i, keys, rows, round)
        for run in active:
            if run.error is not None:
                continue
            last_two = i >= len(run.schedule) - 2
            second_last = i == len(run.schedule) - 2
            before = [p.detach().clone() for p in run.params] if second_last else []
            run.optimizer.step()
            if last_two:  # gradients are read AFTER step(): privatised under DP
                pairs = zip(keys, run.params, strict=True)
                run.grads.append({k: p.grad.detach().to("cpu", copy=True) for k, p in pairs if p.grad is not None})
            if second_last:
                moved = zip(keys, run.params, before, strict=True)
                run.prev_step = {k: (p.detach() - b).to("cpu") for k, p, b in moved}

    def _fused_backward(self, i: int, keys: list[str], rows: list[_Run], round: int) -> None:
        """Forward the clients' i-th batches together, record each client's loss (or its FloatingPointError) and
        backpropagate the sum of the finite per-client mean losses; under DP set each client's ``grad_sample``."""
        device, dp = self.trainer.device, self.trainer.dp
        groups, batches, pos = [], [], 0
        for run in rows:
            idx = run.schedule[i]
            batches.append(tuple(t[idx].to(device) for t in run.data))
            groups.append(Group(run.slot, pos, pos + len(idx)))
            pos += len(idx)
        ids, mask, labels = trim_padding(*(torch.cat([b[j] for b in batches]) for j in range(3)))
        with self.multi.pass_over(groups, per_example=dp):
            losses = self._group_losses(ids, mask, labels, groups)
            values = torch.stack([loss.detach() for loss in losses]).tolist()
            finite = []
            for run, batch, loss, value in zip(rows, batches, losses, values, strict=True):
                if not math.isfinite(value):  # never let a diverged client reach the aggregate
                    run.error = FloatingPointError(
                        f"round {round}, client {run.client_id}: training loss is {value} at local step {i + 1}; "
                        "lower federation.lr (or check this client's data)"
                    )
                    continue
                run.losses.append(value)
                run.last_batch = batch
                finite.append(loss)
            if finite:
                torch.stack(finite).sum().backward()
            if dp:
                for run, group in zip(rows, groups, strict=True):
                    samples = self.multi.take_grad_samples(run.slot)
                    if run.error is None:
                        for key, p in zip(keys, run.params, strict=True):
                            p.grad_sample = samples.get(key, torch.zeros((group.rows, *p.shape), device=p.device))

    def _group_losses(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, groups: list[Group]
    ) -> list[torch.Tensor]:
        """Each group's MEAN loss, as :meth:`LocalTrainer._loss` computes a batch's (cross-entropy on class labels,
        the mean of the per-sequence response losses for causal-LM labels)."""
        model = self.trainer.model
        if labels.dim() == 2:
            per = causal_lm_forward(model, ids, mask, labels)[0]
            return [per[g.start : g.stop].mean() for g in groups]
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return [F.cross_entropy(logits[g.start : g.stop], labels[g.start : g.stop]) for g in groups]
