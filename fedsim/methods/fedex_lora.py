"""FedEx-LoRA: FedAvg on A and B, plus the exact-aggregation residual folded into the frozen base weight.

METHODS.md "SVD-family baselines". Per layer the server sets A = sum p_k A_k, B = sum p_k B_k (as FedAvg-LoRA)
and adds s * (sum_k p_k B_k A_k - B A) to the dense residual R held in the global state under
``residual_key(layer)`` (``<layer>.base_residual``, shape [d_out, d_in]). Every worker runs the layer with base
weight W0 + R, so the model's effective weight W0 + R + s B A equals W0 + R_old + s sum_k p_k B_k A_k: the exact
weighted mean of the clients' weights. The residual is the TOTAL since round 1 (not an increment).
"""

from __future__ import annotations

import torch

from fedsim.methods.aggregation import LayerCtx, fold_into_residual
from fedsim.methods.base import register_method
from fedsim.methods.layerwise import FoldingMethod


@register_method("fedex_lora")
class FedExLoRA(FoldingMethod):
    """Every adapter tensor SHARED. Server, per layer: A and B = weighted means (cast back to their dtype);
    residual += s * (sum_k p_k B_k A_k - B A) in float64 with B A the stored (cast) means; head: weighted mean.

    The global state gains ``<layer>.base_residual`` after the first aggregation, which the worker adds to W0 and
    which :meth:`broadcast_keys` sends down (see :class:`~fedsim.methods.layerwise.FoldingMethod`). ``aggregate``
    raises ValueError for an empty cohort.
    """

    mean_factors = ("A", "B")

    def aggregate_layer(self, ctx: LayerCtx) -> dict[str, torch.Tensor]:
        """The layer's new residual (its A and B are the weighted means ``aggregate_layers`` stores)."""
        a, b = (ctx.mean(key).to(torch.float64) for key in (ctx.a_key, ctx.b_key))
        return fold_into_residual(ctx.global_state, ctx.layer, self.scale * (ctx.mean_product() - b @ a))
