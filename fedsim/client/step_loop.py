"""THE local-training step loop of every execution mode (torch + Opacus only).

:class:`LocalTrainer` trains one or several clients of a round for ``federation.local_steps`` optimiser steps; how a
step's forward and backward run (one client on the live model, K clients fused in one pass, one client split over
a ZeRO group) is its :class:`fedsim.client.executors.Executor`'s business, chosen once per worker. Everything else
is here, once: batch schedules, each client's own optimizer (SGD or AdamW, fresh per round) and DPOptimizer, the
seeding, the non-finite-loss failure, the gradient copies a method's signals read, the length checks and
:class:`TrainOutcome`.

Determinism: every random draw of client ``k`` in round ``t`` comes from ``(seed, t, k)``: batch sampling from
``torch_generator(seed, "batches", t, k)``, dropout from ``torch.manual_seed(derive_seed(seed, "dropout", t, k))``
(inside :func:`isolated_rng`, so the caller's global RNG is left as it was; a fused pass draws nothing: it needs
``model.base_dropout: false`` and no LoRA dropout) and DP noise from the generator seeded
``derive_seed(seed, "dp_noise", t, k)``. Tensors outside the trainable set are never written.

Under DP every step is a DP-SGD step, an empty Poisson batch included (noise only); the expected batch size is
``min(batch_size, n)`` (= q * n) and a client's noise multiplier (e.g. one calibrated per client) overrides
``privacy.noise_multiplier``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedsim.client.executors import Executor
from fedsim.client.live_model import Batch
from fedsim.client.padding import trimmed_on
from fedsim.config.schema import FederationConfig, PrivacyConfig
from fedsim.privacy.sampling import expected_batch_size, poisson_indices, poisson_rate, set_empty_grad_samples
from fedsim.seeding import derive_seed, torch_generator
from fedsim.types import AdapterState


@dataclass(frozen=True)
class TrainOutcome:
    steps: int  # optimiser steps taken (= federation.local_steps)
    examples: int  # size of the client's training shard
    train_loss: float  # mean training loss over the non-empty steps; nan if there was none
    seconds: float  # the client's training time (its share of a fused pass)


def batch_schedule(n: int, batch_size: int, steps: int, dp: bool, generator: torch.Generator) -> list[torch.Tensor]:
    """The example indices of each of ``steps`` local steps over a shard of ``n`` examples.

    ``dp``: Poisson sampling with rate ``q = min(1, batch_size / n)`` per step (batches may be empty).
    Otherwise: batches of ``min(batch_size, n)`` drawn without replacement from a random permutation, reshuffled
    when fewer than a batch remain (so every batch holds distinct examples). All draws come from ``generator``.
    """
    if dp:
        q = poisson_rate(batch_size, n)
        return [poisson_indices(n, q, generator) for _ in range(steps)]
    if n == 0:
        return []
    size = min(batch_size, n)
    out: list[torch.Tensor] = []
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        out.append(perm[pos : pos + size])
        pos += size
    return out


def isolated_rng(device: torch.device | None) -> contextlib.AbstractContextManager[None]:
    """A block whose draws from torch's global RNG (CPU, and ``device``'s when it is a GPU) leave the caller's RNG
    state as it was: the one place fedsim forks the global RNG."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@dataclass(frozen=True)
class ClientInput:
    """One client to train: its start state (None: what the live model holds now; a fused pass needs EVERY adapter
    key, frozen ones too), its shard (``ids``/``mask`` ``[n, L]``, ``labels`` ``[n]`` or ``[n, L]``; L the same
    for all clients of a pass) and, under DP, its noise multiplier (None: ``privacy.noise_multiplier``)."""

    client_id: int
    start: Mapping[str, torch.Tensor] | None
    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    noise_multiplier: float | None = None


@dataclass(frozen=True)
class ClientTrained:
    """One client's training: the outcome, the trained tensors (CPU), the gradients of its last two steps
    (privatised under DP) and the change the step before the last made (all three empty unless the trainer keeps
    gradients; the last two empty with fewer than two steps), and its last non-empty batch (for raw losses)."""

    outcome: TrainOutcome
    trained: AdapterState
    last_grads: dict[str, torch.Tensor]
    prev_grads: dict[str, torch.Tensor]
    prev_step: dict[str, torch.Tensor]
    last_batch: Batch | None


@dataclass
class _Run:
    """The mutable training state of one client."""

    position: int
    client: ClientInput
    schedule: list[torch.Tensor]
    data: tuple[torch.Tensor, ...]
    params: list[torch.Tensor] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    losses: list[float] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    prev_step: dict[str, torch.Tensor] = field(default_factory=dict)
    last_batch: Batch | None = None
    error: Exception | None = None

    @property
    def n(self) -> int:
        return len(self.client.labels)


class LocalTrainer:
    """The step loop (module docstring) over ``executor``. ``keep_gradients``: keep copies of the last two steps'
    gradients and of the step before the last (what a method's client signals read); False (a method without
    signals) saves the copies."""

    def __init__(
        self,
        executor: Executor,
        federation: FederationConfig,
        privacy: PrivacyConfig,
        seed: int,
        *,
        keep_gradients: bool = True,
    ) -> None:
        self.executor = executor
        self.federation = federation
        self.privacy = privacy
        self.seed = int(seed)
        self.dp = privacy.mode == "sample"
        self.keep_gradients = keep_gradients
        #: what the last :meth:`train_one` left for a method's signals (see :class:`ClientTrained`)
        self.last: ClientTrained | None = None

    def train(
        self, keys: Sequence[str], clients: Sequence[ClientInput], *, round: int, steps: int | None = None
    ) -> list[ClientTrained | Exception]:
        """Train every client of ``clients`` (at most the executor's ``max_clients``) on ``keys``, the same
        trained set for all; one result per client, in order: what it trained, or the exception that stopped it
        (ValueError for mismatched array lengths, the non-finite-loss error of :meth:`_step`; the other clients go
        on).
        ``steps`` overrides ``federation.local_steps`` (the timing probe). Raises ValueError for an empty ``keys``
        or too many clients, KeyError for unknown keys. Leaves the model in eval mode without gradient state."""
        started = time.perf_counter()
        keys = list(keys)
        if not keys:
            raise ValueError("train() needs at least one trainable adapter key")
        ex = self.executor
        if ex.max_clients is not None and len(clients) > ex.max_clients:
            raise ValueError(f"this executor trains at most {ex.max_clients} client(s) per call, got {len(clients)}")
        if not clients:
            return []
        runs = [self._run(i, c, round, steps) for i, c in enumerate(clients)]
        out: list[ClientTrained | Exception] = []
        try:
            params = ex.open(keys, [c.start for c in clients])
            for run, mine in zip(runs, params, strict=True):
                run.params, run.optimizer = mine, self._optimizer(mine, run, round)
            device = ex.live.device
            with isolated_rng(device):
                with warnings.catch_warnings():
                    # Opacus' full backward hooks on the first adapted layer (whose input needs no grad): harmless
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    # dropout draws of a lone client (a fused pass draws none)
                    torch.manual_seed(derive_seed(self.seed, "dropout", round, runs[0].client.client_id))
                    for i in range(max((len(r.schedule) for r in runs), default=0)):
                        self._step(i, keys, [r for r in runs if r.error is None and i < len(r.schedule)], round)
            share = (time.perf_counter() - started) / max(1, len(runs))
            out = [run.error if run.error is not None else self._trained(run, keys, share) for run in runs]
        finally:
            ex.close()
        return out

    def train_one(
        self,
        keys: Sequence[str],
        ids: np.ndarray,
        mask: np.ndarray,
        labels: np.ndarray,
        round: int,
        client_id: int,
        *,
        noise_multiplier: float | None = None,
    ) -> TrainOutcome:
        """:meth:`train` for one client from what the live model holds, in place; raises its exception. Afterwards
        :attr:`last` holds its gradient copies and last batch."""
        self.last = None
        (res,) = self.train(keys, [ClientInput(client_id, None, ids, mask, labels, noise_multiplier)], round=round)
        if isinstance(res, Exception):
            raise res
        self.last = res
        return res.outcome

    def _run(self, position: int, c: ClientInput, round: int, steps: int | None) -> _Run:
        n = len(c.labels)
        data = tuple(torch.as_tensor(np.asarray(a), dtype=torch.long) for a in (c.ids, c.mask, c.labels))
        gen = torch_generator(self.seed, "batches", round, c.client_id)
        steps = self.federation.local_steps if steps is None else steps
        run = _Run(position, c, batch_schedule(n, self.federation.batch_size, steps, self.dp, gen), data)
        if len(c.ids) != n or len(c.mask) != n:
            lengths = f"ids ({len(c.ids)}), mask ({len(c.mask)}) and labels ({n})"
            run.error = ValueError(f"{lengths} must have the same length")
        return run

    def _optimizer(self, params: list[torch.Tensor], run: _Run, round: int) -> torch.optim.Optimizer:
        """The client's optimizer; under DP its DPOptimizer with its own noise generator and multiplier."""
        fed = self.federation
        opt_cls = torch.optim.AdamW if fed.optimizer == "adamw" else torch.optim.SGD
        optimizer = opt_cls(params, lr=fed.lr)
        if not self.dp:
            return optimizer
        noise_gen = torch.Generator(device=self.executor.live.device)
        noise_gen.manual_seed(derive_seed(self.seed, "dp_noise", round, run.client.client_id))
        expected = expected_batch_size(fed.batch_size, run.n)
        sigma = run.client.noise_multiplier
        sigma = self.privacy.noise_multiplier if sigma is None else sigma
        from fedsim.privacy.dpsgd import make_dp_optimizer  # Opacus: imported only under DP

        across = self.executor.dp_across_group
        return make_dp_optimizer(optimizer, sigma, self.privacy.clip, expected, noise_gen, across_group=across)

    def _step(self, i: int, keys: list[str], active: list[_Run], round: int) -> None:
        """Local step ``i`` of the ``active`` clients: zero their gradients, one forward/backward of the non-empty
        batches, then each client's own optimiser step and gradient copies. A client whose loss is not finite
        takes no step and ends with the error raised below (a diverged client never reaches the aggregate)."""
        for run in active:
            run.optimizer.zero_grad(set_to_none=True)
            if len(run.schedule[i]) == 0:
                set_empty_grad_samples(run.params)  # a noise-only DP step
        rows = [r for r in active if len(r.schedule[i]) > 0]
        if rows:
            # CPU batches: an executor trims a batch to its longest row on the CPU, then moves it to the device
            batches = [(r.position, tuple(t[r.schedule[i]] for t in r.data)) for r in rows]
            values = self.executor.forward(batches)
            for run, (_, batch), value in zip(rows, batches, values, strict=True):
                if not math.isfinite(value):
                    run.error = FloatingPointError(
                        f"round {round}, client {run.client.client_id}: training loss is {value} at local step "
                        f"{i + 1}; lower federation.lr (or check this client's data)"
                    )
                    continue
                run.losses.append(value)
                run.last_batch = batch
            self.executor.backward([r.error is None for r in rows])
        for run in active:
            if run.error is None:
                self._optimizer_step(i, keys, run)

    def _optimizer_step(self, i: int, keys: list[str], run: _Run) -> None:
        """Step the client's optimizer; copy the last two steps' gradients (read AFTER step(): privatised under DP)
        and the change the step before the last made, when the trainer keeps gradients."""
        last_two = self.keep_gradients and i >= len(run.schedule) - 2
        second_last = self.keep_gradients and i == len(run.schedule) - 2
        before = [p.detach().clone() for p in run.params] if second_last else []
        run.optimizer.step()
        if last_two:
            pairs = zip(keys, run.params, strict=True)
            run.grads.append({k: p.grad.detach().to("cpu", copy=True) for k, p in pairs if p.grad is not None})
        if second_last:
            run.prev_step = {k: (p.detach() - b).to("cpu") for k, p, b in zip(keys, run.params, before, strict=True)}

    def _trained(self, run: _Run, keys: list[str], seconds: float) -> ClientTrained:
        outcome = TrainOutcome(
            steps=len(run.schedule),
            examples=run.n,
            train_loss=float(np.mean(run.losses)) if run.losses else math.nan,
            seconds=seconds,
        )
        grads = run.grads
        return ClientTrained(
            outcome,
            self.executor.trained(run.position, keys),
            grads[-1] if grads else {},
            grads[-2] if len(grads) == 2 else {},
            run.prev_step,
            trimmed_on(run.last_batch, self.executor.live.device) if run.last_batch else None,
        )
