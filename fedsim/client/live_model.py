"""A worker's ONE resident PeftModel as training and evaluation use it (torch + Opacus only).

Under sample-level DP the model is wrapped for Opacus ONCE (every adapter tensor requires grad at wrap time, so
every module a client may ever train carries hooks); per client only ``requires_grad`` and the optimizer's
parameter list change. Dense residual keys (FedEx-LoRA, FLoRA) are folded into the base weights
(``W = W0 + residual``) unless the base is partitioned (a ZeRO group), which refuses them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from fedsim.client.causal_lm import causal_lm_forward
from fedsim.client.padding import trim_padding
from fedsim.model.adapters import adapter_keys, parameters_for, set_state, set_trainable
from fedsim.model.keys import is_residual, layer_of
from fedsim.model.train_mode import set_train_mode
from fedsim.types import AdapterState

#: one batch on the device: (ids [B, L], mask [B, L], labels [B] or [B, L])
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def batch_loss(module: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean loss of a batch ``(ids, mask, labels)``: cross-entropy on class labels ``[B]``, or the mean of the
    per-sequence response losses for causal-LM labels ``[B, L]`` (:mod:`fedsim.client.causal_lm`)."""
    ids, mask, labels = batch
    if labels.dim() == 2:
        return causal_lm_forward(module, ids, mask, labels)[0].mean()
    return F.cross_entropy(module(input_ids=ids, attention_mask=mask).logits.float(), labels)


class LiveModel:
    """``model`` (on its device) with what every executor of a worker shares: the Opacus wrapper (``dp``), the
    adapter tensors the per-client clean-up visits, the training mode (``base_dropout``: false keeps the frozen
    base in eval mode) and, when ``folds_residuals``, the original weights of layers that got a dense residual."""

    def __init__(self, model: PeftModel, *, dp: bool, base_dropout: bool, folds_residuals: bool = True) -> None:
        self.model = model
        self.dp = dp
        self.base_dropout = base_dropout
        self.folds_residuals = folds_residuals
        # every tensor that may ever be trained, and (under DP) every module Opacus hooks: what the per-client
        # clean-up visits (it never walks the whole model)
        self.adapter_params = parameters_for(model, adapter_keys(model))
        self.hooked: list[torch.nn.Module] = []
        self.w0: dict[str, torch.Tensor] = {}  # original base weights of layers that received a residual
        self.applied: dict[str, torch.Tensor] = {}  # residual currently folded into each base weight
        if dp:
            from fedsim.privacy.dpsgd import dp_hooked_modules, wrap_for_dp  # Opacus: imported only under DP

            set_trainable(model, adapter_keys(model))  # hooks for every adapter tensor, whatever a client trains
            self.forward_module: torch.nn.Module = wrap_for_dp(model)
            self.hooked = dp_hooked_modules(self.forward_module)
        else:
            self.forward_module = model

    @property
    def device(self) -> torch.device:
        return next(p for p in self.model.parameters() if not hasattr(p, "ds_id")).device

    def clear(self) -> None:
        """Drop every gradient, per-example gradient and stored activation (between clients: nothing of one
        client's data reaches the next one)."""
        if not self.dp:
            for p in self.adapter_params:
                p.grad = None
            return
        from fedsim.privacy.dpsgd import clear_dp_state

        clear_dp_state(self.adapter_params, self.hooked)

    def train_mode(self, base_dropout: bool | None = None) -> None:
        """Training mode for a local step (:func:`fedsim.model.train_mode.set_train_mode`); ``base_dropout``
        overrides the model's setting (a fused pass needs it off)."""
        set_train_mode(self.model, self.base_dropout if base_dropout is None else base_dropout)

    def base_weight(self, layer: str) -> torch.nn.Parameter:
        """The frozen base weight of ``layer`` (the one residuals are folded into)."""
        module = self.model.base_model.model.get_submodule(layer)
        return module.base_layer.weight if hasattr(module, "base_layer") else module.weight

    @torch.no_grad()
    def load(self, state: AdapterState) -> None:
        """Put ``state`` into the model: base weight = W0 + residual for residual keys, adapter tensors in place.
        Raises NotImplementedError for a residual key when the base does not fold residuals (a ZeRO group)."""
        if not self.folds_residuals and any(is_residual(k) for k in state):
            raise NotImplementedError(
                "ZeRO worker groups do not fold dense residuals into the partitioned base (FedEx-LoRA, FLoRA); "
                "use runtime.zero.stage: 0 with this method"
            )
        for key, residual in state.items():
            if not is_residual(key):
                continue
            if key in self.applied and torch.equal(self.applied[key], residual):
                continue
            layer = layer_of(key)
            weight = self.base_weight(layer)
            if layer not in self.w0:
                self.w0[layer] = weight.detach().clone()
            weight.copy_(self.w0[layer] + residual.to(device=weight.device, dtype=weight.dtype))
            self.applied[key] = residual.detach().clone()
        set_state(self.model, {k: v for k, v in state.items() if not is_residual(k)})

    @torch.no_grad()
    def raw_loss(self, keys: list[str], batch: Batch, offsets: dict[str, torch.Tensor]) -> float:
        """Mean loss (:func:`batch_loss`) of ``batch`` at (the model's tensors + ``offsets``, keys among ``keys``),
        in eval mode (no dropout), leaving the tensors as they were. KeyError for a key outside ``keys``."""
        by_key = dict(zip(keys, parameters_for(self.model, keys), strict=True))
        saved = {k: by_key[k].detach().clone() for k in offsets}
        self.model.eval()
        try:
            for k, off in offsets.items():
                by_key[k].add_(off.to(device=by_key[k].device, dtype=by_key[k].dtype))
            return float(batch_loss(self.model, batch))
        finally:
            for k, v in saved.items():
                by_key[k].copy_(v)

    @torch.no_grad()
    def evaluate(
        self, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, batch_size: int
    ) -> tuple[float, int, int]:
        """(summed cross-entropy, correct predictions, count) of the current classifier, in eval() mode, no grad."""
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
