"""FedEx-LoRA: FedAvg on A and B, plus the exact-aggregation residual folded into the frozen base weight.

METHODS.md "SVD-family baselines". Per layer the server sets A = sum p_k A_k, B = sum p_k B_k (as FedAvg-LoRA)
and adds s * (sum_k p_k B_k A_k - B A) to the dense residual R held in the global state under
``residual_key(layer)`` (``<layer>.base_residual``, shape [d_out, d_in]). Every worker runs the layer with base
weight W0 + R, so the model's effective weight W0 + R + s B A equals W0 + R_old + s sum_k p_k B_k A_k: the exact
weighted mean of the clients' weights. The residual is the TOTAL since round 1 (not an increment).

This module also holds the helpers FLoRA (:mod:`fedsim.methods.flora`) shares: :func:`fold_into_residual`,
:func:`residual_broadcast`, :func:`adapter_keys_only`. The LoRA scale is :func:`fedsim.model.scale.lora_scale`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.config.schema import Config
from fedsim.methods.aggregation import mean_of_keys, normalised_weights
from fedsim.methods.base import Method, ServerState, register_method
from fedsim.methods.flexlora import mean_product
from fedsim.model.keys import factor_of, is_residual, layers_of, lora_key, residual_key
from fedsim.model.scale import lora_scale
from fedsim.types import AdapterState, ClientUpdate, Role, RoundPlan


def fold_into_residual(new: AdapterState, global_state: AdapterState, layer: str, increment: torch.Tensor) -> None:
    """``new[residual_key(layer)] = R_old + increment`` (in place on ``new``), summed in float64.

    R_old is ``global_state``'s residual of ``layer``, or zeros of ``increment``'s shape if it has none yet. The
    result has the dtype of the layer's A factor in ``global_state`` (the adapter's dtype), so the state keeps one
    dtype. Raises ValueError if an existing residual's shape differs from ``increment``'s."""
    key = residual_key(layer)
    dtype = global_state[lora_key(layer, "A")].dtype
    old = global_state.get(key)
    if old is None:
        total = increment.to(torch.float64)
    else:
        if tuple(old.shape) != tuple(increment.shape):
            raise ValueError(f"{key}: residual shape {tuple(old.shape)} != increment shape {tuple(increment.shape)}")
        total = old.to(torch.float64) + increment.to(torch.float64)
    new[key] = total.to(dtype)


def residual_broadcast(plan: RoundPlan) -> list[str]:
    """``plan.uploaded`` plus the residual key of every layer in it (the dense residuals are sent down).

    Before the first aggregation the global state holds no residual yet: a caller must skip names it lacks."""
    return list(plan.uploaded) + [residual_key(layer) for layer in layers_of(list(plan.uploaded))]


def adapter_keys_only(keys: Sequence[str]) -> list[str]:
    """``keys`` without residual keys (plans are over adapter tensors only)."""
    return [k for k in keys if not is_residual(k)]


class FoldingMethod(Method):
    """Shared skeleton of the methods that fold a residual into the base: every adapter tensor SHARED, plans
    over adapter keys only, the dense residual broadcast with the shared tensors, LoRA scale s at hand.
    Abstract: subclasses give ``role`` (every adapter tensor SHARED) and ``aggregate``."""

    linear = False
    folds_into_base = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.scale = lora_scale(cfg.lora)

    def plan(self, round: int, keys: Sequence[str], server_state: ServerState) -> RoundPlan:
        return super().plan(round, adapter_keys_only(keys), server_state)

    def broadcast_keys(self, plan: RoundPlan) -> list[str]:
        return residual_broadcast(plan)


@register_method("fedex_lora")
class FedExLoRA(FoldingMethod):
    """Every adapter tensor SHARED. Server, per layer: A and B = weighted means (cast back to their dtype);
    residual += s * (sum_k p_k B_k A_k - B A) in float64 with B A the stored (cast) means; head: weighted mean.

    ``folds_into_base``: the global state gains ``<layer>.base_residual`` after the first aggregation, which the
    worker adds to W0 and which :meth:`broadcast_keys` sends down. Residual keys never enter a plan
    (:meth:`plan` drops them). Not a weighted mean of the uploads (``linear = False``). ``aggregate`` raises
    ValueError for an empty cohort.
    """

    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        return Role.SHARED

    def aggregate(
        self,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """New global state (see the class docstring)."""
        weights = normalised_weights(updates)
        factors = [k for k in plan.uploaded if factor_of(k) in ("A", "B", "head")]
        new = mean_of_keys(global_state, updates, factors)
        for layer in layers_of(list(plan.uploaded)):
            exact = mean_product(updates, global_state, layer, weights)
            a, b = (new[lora_key(layer, f)].to(torch.float64) for f in ("A", "B"))
            fold_into_residual(new, global_state, layer, self.scale * (exact - b @ a))
        return new, server_state
