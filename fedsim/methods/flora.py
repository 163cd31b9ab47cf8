"""FLoRA: fold the stacked clients' product into the frozen base weight, then restart LoRA from scratch.

METHODS.md "SVD-family baselines". Per layer the server stacks B_st = [p_1 B_1 ... p_K B_K] and
A_st = [A_1; ...; A_K] (the weights may sit on either factor: the product is the same), adds
s * B_st A_st = s * sum_k p_k B_k A_k to the dense residual ``<layer>.base_residual`` of the global state, and
re-initialises the factors as PEFT does: A Kaiming-uniform (a = sqrt(5), bound 1 / sqrt(d_in)), B = 0. The
effective weight W0 + R + s B A is therefore exactly W0 + R_old + s sum_k p_k B_k A_k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedsim.methods.aggregation import LayerCtx, adapter_keys_only, fold_into_residual
from fedsim.methods.base import register_method
from fedsim.methods.layerwise import FoldingMethod
from fedsim.model.keys import layers_of
from fedsim.seeding import torch_generator

REINIT_PURPOSE = "flora_reinit"


def kaiming_a(shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default LoRA A init: ``kaiming_uniform_(A, a=sqrt(5))`` on an ``[r, d_in]`` tensor, i.e.
    U(-1/sqrt(d_in), 1/sqrt(d_in)), drawn in float32 from ``generator`` then cast to ``dtype`` (so the draw does
    not depend on the state's dtype)."""
    a = torch.empty(tuple(shape), dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a.to(dtype)


@register_method("flora")
class FLoRA(FoldingMethod):
    """Every adapter tensor SHARED. Server, per layer: residual += s * sum_k p_k B_k A_k (float64); then
    A = :func:`kaiming_a` from ``torch_generator(seed, "flora_reinit", round, layer index)`` (layer index: the
    position of the layer in ``layers_of(sorted adapter keys of the global state)``), B = 0; head: weighted mean.

    Residual keys, broadcast and plans: see :class:`~fedsim.methods.layerwise.FoldingMethod`. ``aggregate`` raises
    ValueError for an empty cohort.
    """

    def aggregate_layer(self, ctx: LayerCtx) -> dict[str, torch.Tensor]:
        """The layer's new residual, a fresh Kaiming A and B = 0."""
        index = layers_of(sorted(adapter_keys_only(list(ctx.global_state)))).index(ctx.layer)
        gen = torch_generator(self.seed, REINIT_PURPOSE, ctx.round, index)
        a = ctx.global_state[ctx.a_key]
        return {
            **fold_into_residual(ctx.global_state, ctx.layer, self.scale * ctx.mean_product()),
            ctx.a_key: kaiming_a(a.shape, a.dtype, gen),
            ctx.b_key: torch.zeros_like(ctx.global_state[ctx.b_key]),
        }
