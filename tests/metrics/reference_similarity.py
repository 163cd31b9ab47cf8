"""Test reference: cross-client similarity of trained adapter factors by the direct pairwise definition.

For each layer and factor: the mean pairwise cosine similarity, across clients, of their trained tensors
(flattened); fedsim computes it streamed (``PartialSum.similarity_rows``), and the tests compare against this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsim.model.keys import factor_of, layer_of


def mean_pairwise_cosine(tensors: Sequence[torch.Tensor]) -> float | None:
    """Mean cosine similarity over all unordered pairs (None for fewer than two tensors).

    A zero tensor has similarity 0 with everything."""
    if len(tensors) < 2:
        return None
    x = torch.stack([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    norms = x.norm(dim=1, keepdim=True)
    x = torch.where(norms > 0, x / norms.clamp_min(1e-300), torch.zeros_like(x))
    gram = x @ x.T
    n = len(tensors)
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def similarity_rows(
    round: int, states: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per A/B key in ``keys`` held by every state: round, layer, factor, similarity, clients."""
    rows = []
    for key in keys:
        factor = factor_of(key)
        if factor == "head" or not states or any(key not in s for s in states):
            continue
        sim = mean_pairwise_cosine([s[key] for s in states])
        if sim is not None:
            rows.append(
                {"round": round, "layer": layer_of(key), "factor": factor, "similarity": sim, "clients": len(states)}
            )
    return rows
