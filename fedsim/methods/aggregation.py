"""Aggregation maths as plain functions (no orchestration, no Ray, no model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.types import AdapterState, ClientUpdate


def normalised_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = w_k / sum(w). Raises ValueError on an empty cohort or non-positive total weight."""
    if not updates:
        raise ValueError("cannot aggregate an empty cohort")
    total = float(sum(u.weight for u in updates))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to > 0, got {total}")
    return [float(u.weight) / total for u in updates]


def weighted_mean(updates: Sequence[ClientUpdate], key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_k p_k * tensors_k[key], accumulated in float64 in the given (client-id) order, cast back to the
    tensors' dtype (or to ``dtype``, e.g. float64 for a method that keeps computing on the mean)."""
    weights = normalised_weights(updates)
    first = updates[0].tensors[key]
    acc = torch.zeros(first.shape, dtype=torch.float64)
    for p, u in zip(weights, updates, strict=True):
        acc += p * u.tensors[key].to(torch.float64)
    return acc.to(dtype or first.dtype)


def mean_of_keys(global_state: AdapterState, updates: Sequence[ClientUpdate], keys: Sequence[str]) -> AdapterState:
    """A copy of ``global_state`` whose ``keys`` are replaced by the weighted mean of the uploads."""
    new = dict(global_state)
    for key in keys:
        new[key] = weighted_mean(updates, key)
    return new
