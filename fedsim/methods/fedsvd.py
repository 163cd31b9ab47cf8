"""FedSVD: A frozen on clients, B trained and shared; the server re-orthogonalises A by an SVD of B_bar A.

METHODS.md "SVD-family baselines" (FedSVD, NeurIPS 2025).
"""

from __future__ import annotations

import torch

from fedsim.methods.aggregation import LayerCtx, truncated_factors
from fedsim.methods.base import register_method
from fedsim.methods.layerwise import LayerwiseMethod
from fedsim.model.keys import factor_of, layers_of, lora_key
from fedsim.types import Role, RoundPlan, ServerState


@register_method("fedsvd")
class FedSVD(LayerwiseMethod):
    """A FROZEN on clients; B and head SHARED. Server, per layer: B_bar = sum_k p_k B_k (float64), then the
    truncated SVD B_bar A = U_r S_r Vt_r and A_new = Vt_r (orthonormal rows), B_new = U_r S_r, cast back to
    the factors' dtype; head tensors: weighted mean. A layer whose B_bar is exactly 0 keeps its A (B = 0). If
    B_bar A has rank < r, the trailing rows of A are the orthonormal completion LAPACK returns (B is 0 there).

    B_bar A has rank <= r, so the re-factorisation is exact: the new global Delta W equals the weighted mean of
    the clients' Delta W (A is identical on all clients), as for FFA-LoRA. The LoRA scale s is common to all
    terms and left out (see :class:`~fedsim.methods.flexlora.FlexLoRA`).

    Although clients never train A, the server changes it every round, so A is re-broadcast with B:
    :meth:`broadcast_keys` adds it (counted in ``bytes_down``). Not linear: the SVD step must see the
    mean, so uploads may not be pre-summed past it (and client-level DP, which bypasses ``aggregate``, would
    skip it).
    """

    mean_factors = ("B",)

    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        return Role.FROZEN if factor_of(key) == "A" else Role.SHARED

    def broadcast_keys(self, plan: RoundPlan) -> list[str]:
        """The shared tensors plus the A of every layer whose B is shared (the server re-sets it each round)."""
        shared = plan.uploaded
        return shared + [lora_key(layer, "A") for layer in layers_of(shared) if lora_key(layer, "A") in plan.roles]

    def aggregate_layer(self, ctx: LayerCtx) -> dict[str, torch.Tensor]:
        """The layer's new factors from B_bar (float64) and the global A."""
        b_bar = ctx.mean(ctx.b_key, torch.float64)
        a = ctx.global_state[ctx.a_key]
        if not torch.any(b_bar):  # no update: keep A (an SVD of 0 would give an arbitrary basis)
            return {ctx.b_key: b_bar.to(ctx.global_state[ctx.b_key].dtype)}
        return ctx.factors(*truncated_factors(b_bar @ a.to(torch.float64), a.shape[0], "B"))
