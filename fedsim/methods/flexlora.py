"""FlexLoRA: clients train A and B; the server re-factorises the weighted mean of their products by SVD.

METHODS.md "SVD-family baselines" (arXiv 2402.11505). fedsim runs every client at the global rank r, so the
heterogeneous-rank part of the paper reduces to: Delta W = sum_k p_k B_k A_k, best rank-r approximation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.config.schema import Config
from fedsim.methods.aggregation import mean_of_keys, normalised_weights
from fedsim.methods.base import PRODUCT_AGGREGATION, Method, ServerState, register_method
from fedsim.model.keys import factor_of, layers_of, lora_key
from fedsim.types import AdapterState, ClientUpdate, Role, RoundPlan

SVD_SPLITS = ("sqrt", "B")


def truncated_factors(delta: torch.Tensor, rank: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B [d_out, rank], A [rank, d_in]) with B @ A the best rank-``rank`` approximation of ``delta``.

    Eckart–Young: the truncated SVD U_r S_r Vt_r (``torch.linalg.svd``, ``full_matrices=False``) minimises the
    Frobenius (and spectral) error among rank-r matrices; its Frobenius error is sqrt(sum of the discarded
    squared singular values). ``split`` places the singular values: ``"sqrt"``: B = U_r sqrt(S_r),
    A = sqrt(S_r) Vt_r (balanced: B^T B = A A^T = S_r); ``"B"``: B = U_r S_r, A = Vt_r (A has orthonormal
    rows). If ``rank`` exceeds min(d_out, d_in) the extra columns of B and rows of A are zero. The result has
    ``delta``'s dtype. Raises ValueError for an unknown ``split``.
    """
    if split not in SVD_SPLITS:
        raise ValueError(f"svd split must be one of {SVD_SPLITS}, got {split!r}")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if split == "sqrt":
        root = s.sqrt()
        b, a = u * root, root[:, None] * vh
    else:
        b, a = u * s, vh
    if k < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    return b, a


def mean_product(
    updates: Sequence[ClientUpdate], global_state: AdapterState, layer: str, weights: Sequence[float]
) -> torch.Tensor:
    """sum_k p_k B_k A_k in float64 for one layer, as ONE product of the stacked factors
    [p_1 B_1 ... p_K B_K] @ [A_1; ...; A_K] (a factor a client did not upload is the global one)."""
    a_key, b_key = lora_key(layer, "A"), lora_key(layer, "B")

    def factor(u: ClientUpdate, key: str) -> torch.Tensor:
        return (u.tensors[key] if key in u.tensors else global_state[key]).to(torch.float64)

    b_st = torch.cat([p * factor(u, b_key) for p, u in zip(weights, updates, strict=True)], dim=1)
    a_st = torch.cat([factor(u, a_key) for u in updates], dim=0)
    return b_st @ a_st


@register_method("flexlora")
class FlexLoRA(Method):
    """Every tensor SHARED. Server, per layer: Delta W = sum_k p_k B_k A_k (float64), truncated SVD to the rank
    r of the global A, singular values split by ``method.flexlora.svd_split`` (:func:`truncated_factors`), cast back to
    the factors' dtype; head tensors: weighted mean.

    The LoRA scale s (alpha / r or alpha / sqrt r) multiplies every client's product alike, and the rank-r
    truncation of s M is s times that of M, so the server works in factor space without s: the model applies s
    to the new B A exactly as it did to each B_k A_k. Not a weighted mean of the uploads (``linear = False``).
    """

    capabilities = PRODUCT_AGGREGATION

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.split = cfg.method.flexlora.svd_split  # its choices are checked with the config

    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        return Role.SHARED

    def aggregate(
        self,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """New global state (see the class docstring); ValueError for an empty cohort."""
        weights = normalised_weights(updates)
        new = mean_of_keys(global_state, updates, [k for k in plan.uploaded if factor_of(k) == "head"])
        for layer in layers_of(plan.uploaded):
            a_key, b_key = lora_key(layer, "A"), lora_key(layer, "B")
            delta = mean_product(updates, global_state, layer, weights)
            b, a = truncated_factors(delta, global_state[a_key].shape[0], self.split)
            new[b_key] = b.to(global_state[b_key].dtype)
            new[a_key] = a.to(global_state[a_key].dtype)
        return new, server_state
