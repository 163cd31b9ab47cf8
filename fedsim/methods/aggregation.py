"""Aggregation maths as plain functions (no orchestration, no Ray, no model).

The weighted mean has ONE definition, :meth:`fedsim.partial_sum.PartialSum.mean` (float64
``sum_k w_k x_k / sum_k w_k``, folded in the given order): the streamed linear methods use it through
``Method.aggregate_sums``, the buffered SVD family through :func:`weighted_means`. Besides, the SVD family's shared
maths: the weighted mean of the clients' products (:func:`mean_product`), the truncated SVD
(:func:`truncated_factors`), the dense residual folded into the frozen base weight (:func:`fold_into_residual` and
its key helpers) and the per-layer loop (:func:`aggregate_layers`, handing each layer a :class:`LayerCtx`)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedsim.model.keys import factor_of, is_residual, layers_of, lora_key, residual_key
from fedsim.partial_sum import PartialSum
from fedsim.types import AdapterState, ClientUpdate, RoundPlan

#: how :func:`truncated_factors` may place the singular values (``method.svd_split``)
SVD_SPLITS = ("sqrt", "B")


def normalised_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = w_k / sum(w). Raises ValueError on an empty cohort or non-positive total weight."""
    if not updates:
        raise ValueError("cannot aggregate an empty cohort")
    total = float(sum(u.weight for u in updates))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to > 0, got {total}")
    return [float(u.weight) / total for u in updates]


def weighted_means(round: int, updates: Sequence[ClientUpdate], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{key: sum_k w_k x_k / sum_k w_k}`` in float64 for each of ``keys``: :meth:`PartialSum.mean` of the
    ``updates`` (restricted to ``keys``) folded in the given (client-id) order into a :class:`PartialSum` of round
    ``round``, so the buffered and the streamed aggregation share one definition of the weighted mean. Raises
    ValueError for an empty cohort, a non-positive total weight, a client id twice, a key that not every update
    carries, or uploads of one key that differ in shape."""
    wanted = set(keys)
    sums = PartialSum.of(
        round,
        (ClientUpdate(u.client_id, u.weight, {k: t for k, t in u.tensors.items() if k in wanted}) for u in updates),
    )
    return {key: sums.mean(key) for key in keys}


def mean_product(
    updates: Sequence[ClientUpdate], global_state: Mapping[str, torch.Tensor], layer: str, weights: Sequence[float]
) -> torch.Tensor:
    """sum_k p_k B_k A_k in float64 for one layer, as ONE product of the stacked factors
    [p_1 B_1 ... p_K B_K] @ [A_1; ...; A_K] (a factor a client did not upload is the global one). ``weights``
    are the p_k, in the order of ``updates``."""
    a_key, b_key = lora_key(layer, "A"), lora_key(layer, "B")

    def factor(u: ClientUpdate, key: str) -> torch.Tensor:
        return (u.tensors[key] if key in u.tensors else global_state[key]).to(torch.float64)

    b_st = torch.cat([p * factor(u, b_key) for p, u in zip(weights, updates, strict=True)], dim=1)
    a_st = torch.cat([factor(u, a_key) for u in updates], dim=0)
    return b_st @ a_st


def truncated_factors(delta: torch.Tensor, rank: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B [d_out, rank], A [rank, d_in]) with B @ A the best rank-``rank`` approximation of ``delta``.

    Eckart–Young: the truncated SVD U_r S_r Vt_r (``torch.linalg.svd``, ``full_matrices=False``) minimises the
    Frobenius (and spectral) error among rank-r matrices; its Frobenius error is sqrt(sum of the discarded
    squared singular values). ``split`` places the singular values: ``"sqrt"``: B = U_r sqrt(S_r),
    A = sqrt(S_r) Vt_r (balanced: B^T B = A A^T = S_r); ``"B"``: B = U_r S_r, A = Vt_r (A has orthonormal
    rows). If ``rank`` exceeds min(d_out, d_in) the extra columns of B and rows of A are zero. The result has
    ``delta``'s dtype. Raises ValueError for a ``split`` not in :data:`SVD_SPLITS`.
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


def fold_into_residual(
    global_state: Mapping[str, torch.Tensor], layer: str, increment: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``{residual_key(layer): R_old + increment}``, summed in float64.

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
    return {key: total.to(dtype)}


def residual_broadcast(plan: RoundPlan) -> list[str]:
    """``plan.uploaded`` plus the residual key of every layer in it (the dense residuals are sent down).

    Before the first aggregation the global state holds no residual yet: a caller must skip names it lacks."""
    return list(plan.uploaded) + [residual_key(layer) for layer in layers_of(list(plan.uploaded))]


def adapter_keys_only(keys: Sequence[str]) -> list[str]:
    """``keys`` without residual keys (plans are over adapter tensors only)."""
    return [k for k in keys if not is_residual(k)]


@dataclass(frozen=True)
class LayerCtx:
    """What :func:`aggregate_layers` hands its per-layer callback for one uploaded layer.

    ``round`` is the plan's round; ``weights`` are the normalised p_k in the order of ``updates`` (client-id
    order); ``global_state`` is the state BEFORE the round; ``means`` holds the float64 weighted means of the
    keys :func:`aggregate_layers` averages (:func:`weighted_means`)."""

    layer: str
    a_key: str
    b_key: str
    round: int
    weights: tuple[float, ...]
    updates: Sequence[ClientUpdate]
    global_state: Mapping[str, torch.Tensor]
    means: Mapping[str, torch.Tensor]

    def mean(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weighted mean of an averaged ``key`` cast to ``dtype``, by default to the uploads' dtype: then it is
        bit-identical to what :func:`aggregate_layers` stores under ``key``. Raises KeyError for a key it did not
        average."""
        return self.means[key].to(dtype or self.updates[0].tensors[key].dtype)

    def mean_product(self) -> torch.Tensor:
        """sum_k p_k B_k A_k of this layer in float64 (:func:`mean_product`)."""
        return mean_product(self.updates, self.global_state, self.layer, self.weights)

    def factors(self, b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{b_key: b, a_key: a}`` cast to the dtypes of this layer's factors in the global state."""
        g = self.global_state
        return {self.b_key: b.to(g[self.b_key].dtype), self.a_key: a.to(g[self.a_key].dtype)}


def aggregate_layers(
    global_state: AdapterState,
    updates: Sequence[ClientUpdate],
    plan: RoundPlan,
    per_layer: Callable[[LayerCtx], Mapping[str, torch.Tensor]],
    mean_factors: Collection[str] = (),
) -> AdapterState:
    """The new global state of a layer-wise (SVD-family) aggregation of the buffered ``updates`` (client-id order).

    1. ValueError for an empty cohort or a non-positive total weight, before any work;
    2. a copy of ``global_state`` in which every uploaded head key, and every uploaded key whose factor is in
       ``mean_factors`` (``"A"``, ``"B"``), is replaced by its weighted mean (:func:`weighted_means`, cast back to
       the uploads' dtype);
    3. for each layer of ``layers_of(plan.uploaded)``, in that order, ``per_layer(ctx)`` once; the tensors it
       returns replace (or, for new keys such as residuals, are added to) those of the state.

    ``per_layer`` must not mutate the context's state. Also raises what :func:`weighted_means` and ``per_layer``
    raise (ValueError for a client id twice or an averaged key that not every update carries)."""
    weights = tuple(normalised_weights(updates))
    averaged = [k for k in plan.uploaded if factor_of(k) == "head" or factor_of(k) in mean_factors]
    means = weighted_means(plan.round, updates, averaged)
    new = dict(global_state)
    new.update({key: mean.to(updates[0].tensors[key].dtype) for key, mean in means.items()})
    for layer in layers_of(plan.uploaded):
        a_key, b_key = lora_key(layer, "A"), lora_key(layer, "B")
        new.update(per_layer(LayerCtx(layer, a_key, b_key, plan.round, weights, updates, global_state, means)))
    return new
