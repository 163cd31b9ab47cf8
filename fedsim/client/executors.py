"""How one local step's forward and backward run: the part of local training that differs between execution modes.

The step loop (:mod:`fedsim.client.step_loop`) owns everything else (schedules, optimizers, DP optimizers, seeding,
the finiteness check, gradient copies, outcomes) and calls an :class:`Executor` the same way for every mode:

* :class:`SingleExecutor`: one client at a time, on the worker's live PeftModel (in place; Opacus' hooks record
  per-example gradients under DP);
* :class:`FusedExecutor`: K clients in ONE pass over their concatenated batches, each with its own copies of the
  adapter tensors (:class:`fedsim.client.multi_adapter.MultiAdapter`); needs ``model.base_dropout: false``;
* ``ZeroExecutor`` (:mod:`fedsim.client.zero`): one client whose batch is split over the ranks of a ZeRO group.

Per local step the loop calls :meth:`Executor.forward` with the clients' non-empty batches (each client's MEAN loss
comes back as a float, the same on every rank of a group), checks them, then :meth:`Executor.backward` with which
clients' losses are finite (only those are backpropagated; under DP each trained tensor then holds
``grad_sample``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from fedsim.client.causal_lm import causal_lm_forward
from fedsim.client.live_model import Batch, LiveModel, batch_loss
from fedsim.client.multi_adapter import Group, MultiAdapter
from fedsim.client.padding import trimmed_on
from fedsim.model.adapters import get_state, parameters_for, set_trainable
from fedsim.types import AdapterState

#: the start states of the clients of one call (None: what the live model holds now)
Starts = Sequence[Mapping[str, torch.Tensor] | None]


class Executor(Protocol):
    """One execution mode of local training (module docstring). ``live``: the worker's model; ``max_clients``: how
    many clients one :meth:`open` takes (None: any number); ``dp_across_group``: under DP, the step loop's
    DPOptimizer adds the clipped sums of every rank of the torch.distributed group before its noise draw (a ZeRO
    group), instead of this process's alone. ``forward`` takes CPU batches: the executor moves them to its device."""

    live: LiveModel
    max_clients: int | None
    dp_across_group: bool

    def open(self, keys: Sequence[str], starts: Starts) -> list[list[torch.Tensor]]:
        """Make the clients' start states (None: what the live model holds now) trainable on ``keys``; returns each
        client's trained tensors in the order of ``keys``. Clears every gradient state first; puts the model in
        training mode. KeyError for unknown keys. The step loop gives at most :attr:`max_clients` clients, at least
        one."""
        ...

    def forward(self, batches: Sequence[tuple[int, Batch]]) -> list[float]:
        """Forward ``(client, batch)`` pairs (client: its position in :meth:`open`; one pair per client with a
        non-empty batch this step, in that order): each one's mean loss, keeping what :meth:`backward` needs."""
        ...

    def backward(self, finite: Sequence[bool]) -> None:
        """Backpropagate the last :meth:`forward`'s losses whose ``finite`` is true; under DP every trained tensor of
        those clients gets ``grad_sample`` (per-example gradients)."""
        ...

    def trained(self, client: int, keys: Sequence[str]) -> AdapterState:
        """CPU copies of client ``client``'s (position in :meth:`open`) tensors ``keys``."""
        ...

    def close(self) -> None:
        """Drop every gradient state and stored activation; eval mode. Always called after :meth:`open`."""
        ...


class SingleExecutor:
    """One client per call on the live model (in place)."""

    max_clients = 1
    dp_across_group = False

    def __init__(self, live: LiveModel) -> None:
        self.live = live
        self.params: list[torch.Tensor] = []
        self.loss: torch.Tensor | None = None

    def open(self, keys: Sequence[str], starts: Starts) -> list[list[torch.Tensor]]:
        if starts[0] is not None:
            self.live.load(dict(starts[0]))
        set_trainable(self.live.model, keys)
        self.params = parameters_for(self.live.model, keys)
        self.live.clear()
        self.live.train_mode()
        return [self.params]

    def forward(self, batches: Sequence[tuple[int, Batch]]) -> list[float]:
        ((_, batch),) = batches
        self.loss = batch_loss(self.live.forward_module, trimmed_on(batch, self.live.device))
        return [float(self.loss.detach())]

    def backward(self, finite: Sequence[bool]) -> None:
        if self.loss is not None and finite[0]:
            self.loss.backward()
        self.loss = None

    def trained(self, client: int, keys: Sequence[str]) -> AdapterState:
        return get_state(self.live.model, keys)

    def close(self) -> None:
        self.loss, self.params = None, []
        self.live.clear()
        self.live.model.eval()


class FusedExecutor:
    """K clients per call in fused passes (:mod:`fedsim.client.multi_adapter`): local step i concatenates the
    clients' i-th batches (in the order given), runs the frozen base once with each row's own client's tensors and
    backpropagates the SUM of the clients' MEAN losses, so each client's tensors get exactly its own gradient; under
    DP each client's per-example gradients become ``grad_sample`` of its tensors. The live adapter tensors take no
    part (nor change). Raises ValueError when the model's base dropout is on, and what :class:`MultiAdapter` raises
    for adapters it cannot batch."""

    max_clients = None
    dp_across_group = False

    def __init__(self, live: LiveModel) -> None:
        if live.base_dropout:
            raise ValueError("training several clients in one pass needs model.base_dropout: false")
        self.live = live
        self.multi = MultiAdapter(live.model)
        self.keys: list[str] = []
        self.params: list[list[torch.Tensor]] = []
        self.pending: tuple[contextlib.ExitStack, list[torch.Tensor], list[Group]] | None = None

    def open(self, keys: Sequence[str], starts: Starts) -> list[list[torch.Tensor]]:
        if any(s is None for s in starts):
            raise ValueError("a fused pass needs every client's start state")
        self.keys = list(keys)
        self.params = self.multi.load([s for s in starts if s is not None], self.keys)
        set_trainable(self.live.model, [])  # the live tensors take no part in a fused pass
        self.live.clear()
        if self.live.dp:
            self.live.forward_module.disable_hooks()  # Opacus' hooks on the live modules: per-example grads are ours
        self.live.train_mode(base_dropout=False)
        return self.params

    def forward(self, batches: Sequence[tuple[int, Batch]]) -> list[float]:
        groups, pos = [], 0
        for slot, batch in batches:
            groups.append(Group(slot, pos, pos + len(batch[0])))
            pos += len(batch[0])
        ids, mask, labels = trimmed_on(tuple(torch.cat([b[j] for _, b in batches]) for j in range(3)), self.live.device)
        stack = contextlib.ExitStack()
        stack.enter_context(self.multi.pass_over(groups, per_example=self.live.dp))
        try:
            if labels.dim() == 2:
                per = causal_lm_forward(self.live.model, ids, mask, labels)[0]
                losses = [per[g.start : g.stop].mean() for g in groups]
            else:
                logits = self.live.model(input_ids=ids, attention_mask=mask).logits.float()
                losses = [F.cross_entropy(logits[g.start : g.stop], labels[g.start : g.stop]) for g in groups]
        except BaseException:
            stack.close()
            raise
        self.pending = (stack, losses, groups)
        return torch.stack([loss.detach() for loss in losses]).tolist()

    def backward(self, finite: Sequence[bool]) -> None:
        if self.pending is None:
            return
        stack, losses, groups = self.pending
        self.pending = None
        with stack:
            kept = [loss for loss, ok in zip(losses, finite, strict=True) if ok]
            if kept:
                torch.stack(kept).sum().backward()
            if self.live.dp:
                for g, ok in zip(groups, finite, strict=True):
                    samples = self.multi.take_grad_samples(g.slot)
                    if ok:
                        for key, p in zip(self.keys, self.params[g.slot], strict=True):
                            p.grad_sample = samples.get(key, torch.zeros((g.rows, *p.shape), device=p.device))

    def trained(self, client: int, keys: Sequence[str]) -> AdapterState:
        return self.multi.state(client, keys)

    def close(self) -> None:
        if self.pending is not None:
            self.pending[0].close()
            self.pending = None
        if self.live.dp:
            self.live.forward_module.enable_hooks()
        self.live.clear()
        self.live.model.eval()
        self.multi.tensors, self.params = [], []
