"""One client's local training (torch + Opacus only), on the one resident PeftModel of a worker.

Determinism: every random draw of client ``k`` in round ``t`` comes from ``(seed, t, k)``:
batch sampling from ``torch_generator(seed, "batches", t, k)``, dropout from
``torch.manual_seed(derive_seed(seed, "dropout", t, k))`` (inside ``fork_rng``, so the caller's global RNG is left
as it was) and DP noise from ``torch_generator(seed, "dp_noise", t, k)``. Tensors outside the trainable set are
never written (bit-identical after training).

Causal LM (labels ``[n, L]``, -100 outside the response; rows left-padded): per-sequence losses and the
one-prompt-pass evaluation live in :mod:`fedsim.client.causal_lm`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from fedsim.client.causal_lm import causal_lm_forward
from fedsim.client.padding import trim_padding
from fedsim.config.schema import FederationConfig, PrivacyConfig
from fedsim.model.adapters import adapter_keys, parameters_for, set_trainable
from fedsim.model.train_mode import set_train_mode
from fedsim.privacy.sampling import expected_batch_size, poisson_indices, poisson_rate, set_empty_grad_samples
from fedsim.seeding import derive_seed, torch_generator


@dataclass(frozen=True)
class TrainOutcome:
    steps: int  # optimiser steps taken (= federation.local_steps)
    examples: int  # size of the client's training shard
    train_loss: float  # mean training loss over the non-empty steps; nan if there was none
    seconds: float


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


class LocalTrainer:
    """Owns ONE PeftModel for a worker; wraps it for Opacus ONCE (when ``privacy.mode == "sample"``), never per client.

    Per client only ``requires_grad`` and the optimizer's parameter list change. The caller sets the adapter state
    (``fedsim.model.adapters.set_state``) before :meth:`train` and reads it afterwards.

    ``keep_gradients``: keep copies of the last two steps' gradients and of the step before the last
    (:attr:`last_grads`, :attr:`prev_grads`, :attr:`prev_step`: what a method's client signals read); False (a
    method without signals) leaves them empty and saves the copies.
    """

    def __init__(
        self,
        model: PeftModel,
        federation: FederationConfig,
        privacy: PrivacyConfig,
        seed: int,
        *,
        base_dropout: bool = True,
        keep_gradients: bool = True,
    ):
        self.model = model
        self.base_dropout = base_dropout  # model.base_dropout: false keeps the frozen base in eval mode
        self.federation = federation
        self.privacy = privacy
        self.seed = int(seed)
        self.dp = privacy.mode == "sample"
        self.keep_gradients = keep_gradients
        self._all_keys = adapter_keys(model)
        # every tensor that may ever be trained, and (under DP) every module Opacus hooks: what the per-client
        # clean-up visits (it never walks the whole model)
        self._adapter_params = parameters_for(model, self._all_keys)
        self._hooked: list[torch.nn.Module] = []
        self.last_grads: dict[str, torch.Tensor] = {}  # the (privatised, under DP) gradients of the last step
        self.prev_grads: dict[str, torch.Tensor] = {}  # ... of the step before (empty with fewer than 2 steps)
        self.prev_step: dict[str, torch.Tensor] = {}  # parameter change made by the step before the last one
        # (key -> trained parameter, (ids, mask, labels)) of the last non-empty batch, for raw_loss
        self._last_batch: tuple[dict[str, torch.nn.Parameter], tuple[torch.Tensor, ...]] | None = None
        if self.dp:
            from fedsim.privacy.dpsgd import dp_hooked_modules, wrap_for_dp  # Opacus: imported only under DP

            set_trainable(model, self._all_keys)  # hooks for every adapter tensor, whatever a client trains later
            self._forward_module: torch.nn.Module = wrap_for_dp(model)
            self._hooked = dp_hooked_modules(self._forward_module)
        else:
            self._forward_module = model

    def _clear(self) -> None:
        """Drop every gradient, per-example gradient and stored activation (between clients: nothing of one
        client's data reaches the next one)."""
        if not self.dp:
            for p in self._adapter_params:
                p.grad = None
            return
        from fedsim.privacy.dpsgd import clear_dp_state

        clear_dp_state(self._adapter_params, self._hooked)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._forward_module(input_ids=ids, attention_mask=mask).logits

    def _loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean loss of a batch ``(ids, mask, labels)``: cross-entropy on class labels ``[B]``, or the mean of the
        per-sequence response losses for causal-LM labels ``[B, L]`` (see the module docstring)."""
        ids, mask, labels = batch
        if labels.dim() == 2:
            return causal_lm_forward(module, ids, mask, labels)[0].mean()
        return F.cross_entropy(module(input_ids=ids, attention_mask=mask).logits.float(), labels)

    def _backward(self, batch: tuple[torch.Tensor, ...], params: list[torch.nn.Parameter]) -> float:
        """One non-empty batch ``(ids, mask, labels)``: its mean loss, backpropagated (per-example gradients under
        DP). Returns the loss. A subclass may split the batch over processes (``fedsim.client.zero_worker``)."""
        loss = self._loss(self._forward_module, batch)
        loss.backward()
        return float(loss.detach())

    def _dp_optimizer(
        self, optimizer: torch.optim.Optimizer, sigma: float, expected: int, generator: torch.Generator
    ) -> torch.optim.Optimizer:
        """The DP-SGD optimizer around ``optimizer`` (:func:`fedsim.privacy.dpsgd.make_dp_optimizer`)."""
        from fedsim.privacy.dpsgd import make_dp_optimizer

        return make_dp_optimizer(optimizer, sigma, self.privacy.clip, expected, generator)

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        lr = self.federation.lr
        if self.federation.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr)
        return torch.optim.SGD(params, lr=lr)

    def train(
        self,
        trainable_keys: Sequence[str],
        ids: np.ndarray,
        mask: np.ndarray,
        labels: np.ndarray,
        round: int,
        client_id: int,
        *,
        noise_multiplier: float | None = None,
    ) -> TrainOutcome:
        """Run exactly ``federation.local_steps`` optimiser steps on this client's shard, training ``trainable_keys``.

        ``ids``/``mask``: ``[n, L]`` integer arrays; ``labels``: ``[n]`` (classification) or ``[n, L]`` (causal LM,
        -100 outside the response). Under DP every step is a DP-SGD step, an
        empty Poisson batch included (noise only); the expected batch size is ``min(batch_size, n)`` (= q * n) and
        ``noise_multiplier`` (e.g. one calibrated per client) overrides ``privacy.noise_multiplier``. Afterwards
        :attr:`last_grads` holds the last step's gradients of the trainable tensors (privatised under DP),
        :attr:`prev_grads` those of the step before and :attr:`prev_step` the change that step made to the tensors
        (both empty with fewer than two steps; all three empty unless ``keep_gradients``); :meth:`raw_loss`
        evaluates the last non-empty batch.
        Raises KeyError for unknown keys, ValueError for an empty trainable set or mismatched array lengths.
        """
        start = time.perf_counter()
        keys = list(trainable_keys)
        if not keys:
            raise ValueError("train() needs at least one trainable adapter key")
        n = len(labels)
        if len(ids) != n or len(mask) != n:
            raise ValueError(f"ids ({len(ids)}), mask ({len(mask)}) and labels ({n}) must have the same length")
        device = self.device
        ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        mask_t = torch.as_tensor(np.asarray(mask), dtype=torch.long)
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)

        set_trainable(self.model, keys)
        params = parameters_for(self.model, keys)
        self._clear()
        optimizer = self._optimizer(params)
        if self.dp:
            noise_gen = torch.Generator(device=device)
            noise_gen.manual_seed(derive_seed(self.seed, "dp_noise", round, client_id))
            expected = expected_batch_size(self.federation.batch_size, n)
            sigma = self.privacy.noise_multiplier if noise_multiplier is None else noise_multiplier
            optimizer = self._dp_optimizer(optimizer, sigma, expected, noise_gen)
        batches = batch_schedule(
            n,
            self.federation.batch_size,
            self.federation.local_steps,
            self.dp,
            torch_generator(self.seed, "batches", round, client_id),
        )
        losses: list[float] = []
        grads: list[dict[str, torch.Tensor]] = []  # the last two steps' gradients
        self.prev_step, self._last_batch = {}, None
        by_key = dict(zip(keys, params, strict=True))
        devices = [device.index or 0] if device.type == "cuda" else []
        set_train_mode(self.model, self.base_dropout)
        try:
            with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
                # Opacus' full backward hooks on the first adapted layer (whose input needs no grad): harmless.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                torch.manual_seed(derive_seed(self.seed, "dropout", round, client_id))
                for i, idx in enumerate(batches):
                    optimizer.zero_grad(set_to_none=True)
                    if len(idx) == 0:
                        set_empty_grad_samples(params)
                    else:
                        batch = tuple(t.to(device) for t in trim_padding(ids_t[idx], mask_t[idx], labels_t[idx]))
                        losses.append(self._backward(batch, params))
                        if not math.isfinite(losses[-1]):  # never let a diverged client reach the aggregate
                            raise FloatingPointError(
                                f"round {round}, client {client_id}: training loss is {losses[-1]} at local step "
                                f"{i + 1}; lower federation.lr (or check this client's data)"
                            )
                        self._last_batch = (by_key, batch)
                    second_last = self.keep_gradients and i == len(batches) - 2
                    before = [p.detach().clone() for p in params] if second_last else []
                    optimizer.step()
                    if self.keep_gradients and i >= len(batches) - 2:  # read AFTER step(): privatised under DP
                        grads.append(
                            {k: p.grad.detach().to("cpu", copy=True) for k, p in by_key.items() if p.grad is not None}
                        )
                    if second_last:
                        moved = zip(by_key.items(), before, strict=True)
                        self.prev_step = {k: (p.detach() - b).to("cpu") for (k, p), b in moved}
            self.last_grads = grads[-1] if grads else {}
            self.prev_grads = grads[-2] if len(grads) == 2 else {}
        finally:
            self._clear()
            self.model.eval()
        return TrainOutcome(
            steps=len(batches),
            examples=n,
            train_loss=float(np.mean(losses)) if losses else math.nan,
            seconds=time.perf_counter() - start,
        )

    def adopt_signals(
        self,
        keys: Sequence[str],
        last_grads: dict[str, torch.Tensor],
        prev_grads: dict[str, torch.Tensor],
        prev_step: dict[str, torch.Tensor],
        last_batch: tuple[torch.Tensor, ...] | None,
    ) -> None:
        """Take over what :meth:`train` leaves for a method's signals, for a client trained elsewhere
        (:mod:`fedsim.client.batched_trainer`) whose trained tensors ``keys`` the caller has put into this model:
        :attr:`last_grads`, :attr:`prev_grads`, :attr:`prev_step` and the last non-empty batch for
        :meth:`raw_loss` (None: it had none). KeyError for unknown keys."""
        self.last_grads, self.prev_grads, self.prev_step = last_grads, prev_grads, prev_step
        by_key = dict(zip(keys, parameters_for(self.model, keys), strict=True))
        self._last_batch = (by_key, last_batch) if last_batch is not None else None

    @torch.no_grad()
    def raw_loss(self, offsets: dict[str, torch.Tensor]) -> float:
        """Mean loss (cross-entropy, or the causal-LM response loss) of the last non-empty training batch at
        (trained tensors + ``offsets``), in eval mode
        (no dropout), leaving the tensors as they were. Uses RAW data: outside any DP guarantee.

        Raises RuntimeError if the last :meth:`train` had no non-empty batch, KeyError for a key it did not train.
        """
        if self._last_batch is None:
            raise RuntimeError("raw_loss: the last train() call had no non-empty batch")
        by_key, (ids, mask, labels) = self._last_batch
        saved = {k: by_key[k].detach().clone() for k in offsets}
        self.model.eval()
        try:
            for k, off in offsets.items():
                by_key[k].add_(off.to(device=by_key[k].device, dtype=by_key[k].dtype))
            return float(self._loss(self.model, (ids, mask, labels)))
        finally:
            for k, v in saved.items():
                by_key[k].copy_(v)

    @torch.no_grad()
    def evaluate(
        self, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, batch_size: int
    ) -> tuple[float, int, int]:
        """(summed cross-entropy, correct predictions, count) of the current model, in eval() mode, no grad."""
        self.model.eval()
        device = self.device
        loss_sum, correct, n = 0.0, 0, len(labels)
        for s in range(0, n, batch_size):
            b_ids, b_mask, b_y = (
                t.to(device)
                for t in trim_padding(
                    *(torch.as_tensor(np.asarray(a[s : s + batch_size]), dtype=torch.long) for a in (ids, mask, labels))
                )
            )
            logits = self.model(input_ids=b_ids, attention_mask=b_mask).logits.float()
            loss_sum += float(F.cross_entropy(logits, b_y, reduction="sum"))
            correct += int((logits.argmax(-1) == b_y).sum())
        return loss_sum, correct, n
