"""FlexLoRA: clients train A and B; the server re-factorises the weighted mean of their products by SVD.

METHODS.md "SVD-family baselines" (arXiv 2402.11505). fedsim runs every client at the global rank r, so the
heterogeneous-rank part of the paper reduces to: Delta W = sum_k p_k B_k A_k, best rank-r approximation.
"""

from __future__ import annotations

import torch

from fedsim.config.schema import Config
from fedsim.methods.aggregation import LayerCtx, truncated_factors
from fedsim.methods.base import register_method
from fedsim.methods.layerwise import LayerwiseMethod


@register_method("flexlora")
class FlexLoRA(LayerwiseMethod):
    """Every tensor SHARED. Server, per layer: Delta W = sum_k p_k B_k A_k (float64), truncated SVD to the rank
    r of the global A, singular values split by ``method.flexlora.svd_split``
    (:func:`~fedsim.methods.aggregation.truncated_factors`), cast back to the factors' dtype; head tensors:
    weighted mean.

    The LoRA scale s (alpha / r or alpha / sqrt r) multiplies every client's product alike, and the rank-r
    truncation of s M is s times that of M, so the server works in factor space without s: the model applies s
    to the new B A exactly as it did to each B_k A_k. Not a weighted mean of the uploads (not linear).
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.split = cfg.method.flexlora.svd_split  # its choices are checked with the config

    def aggregate_layer(self, ctx: LayerCtx) -> dict[str, torch.Tensor]:
        """The layer's new factors: the truncated SVD of sum_k p_k B_k A_k at the global rank."""
        return ctx.factors(*truncated_factors(ctx.mean_product(), ctx.global_state[ctx.a_key].shape[0], self.split))
