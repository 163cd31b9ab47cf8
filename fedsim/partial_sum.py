"""Streaming aggregation: a round's uploads folded into float64 running sums (no orchestration, no Ray).

A :class:`PartialSum` holds, for one round, ``sum_k w_k x_k`` per uploaded key (float64), ``sum_k w_k``, the
weighted sums of the finite scalar signals, the client ids folded in and the logical bytes they uploaded. A worker
folds its clients' uploads into one and sends it to the parameter server in ONE message; the server merges the
partial sums of all workers (:meth:`PartialSum.merge`) and a linear method turns the total into the new global
state (:meth:`fedsim.methods.base.Method.aggregate_sums`). Memory is one float64 copy of the uploaded tensors,
whatever the cohort size. Sums are independent of the folding order up to float64 rounding, so the result (cast
back to the adapter dtype) does not depend on which worker trained which client, nor on arrival order.

Non-linear methods (the SVD family) cannot be pre-summed: a ``buffer=True`` partial keeps the uploads themselves
(one per client), and the server hands them, in client-id order, to ``Method.aggregate``.

A privacy mechanism may hand a method an already formed total instead (:meth:`PartialSum.of_totals`: client-level
DP's noised sum, see :mod:`fedsim.privacy.mechanism`); the uploads it folds are whatever the mechanism let the
clients send (clipped deltas of weight 1 under client-level DP).

``analysis.similarity`` (``similarity``), folded the same way: per key, the sum of the unit vectors of the
clients' trained tensors — the uploaded ones and, passed beside the upload as ``kept``, the ones they keep
(FedSA-LoRA's B) — and the count of non-zero ones, from which the mean pairwise cosine across clients follows
exactly: ``sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - #nonzero`` over ``n (n - 1)`` ordered pairs. This is the
ONE place similarity is computed; it is an analysis of the simulation (the kept tensors never reach the method's
aggregation and are not counted as uploaded bytes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fedsim.model.keys import factor_of, layer_of
from fedsim.types import AdapterState, ClientUpdate, state_bytes


class PartialSum:
    """Float64 running sums of one round's uploads (or, with ``buffer=True``, the uploads themselves).

    Raises ValueError when a client id is folded in twice, when partial sums of different rounds or settings are
    merged, and (in :meth:`mean`) for an empty cohort or a non-positive total weight."""

    def __init__(self, round: int, *, similarity: bool = False, buffer: bool = False):
        self.round = int(round)
        self.similarity = bool(similarity)
        self.buffer = bool(buffer)
        self.weight = 0.0  # sum of the folded uploads' weights
        self.sums: dict[str, torch.Tensor] = {}  # key -> float64 sum_k w_k x_k
        self.dtypes: dict[str, torch.dtype] = {}  # key -> dtype of the uploads (the mean is cast back to it)
        self.counts: dict[str, int] = {}  # key -> number of uploads that carried it
        self.signals: dict[str, list[float]] = {}  # name -> [sum_k w_k s_k, sum_k w_k] over finite values
        self.unit_sums: dict[str, torch.Tensor] = {}  # similarity: key -> float64 sum of unit vectors
        self.nonzero: dict[str, int] = {}  # similarity: key -> clients with a non-zero tensor
        self.sim_counts: dict[str, int] = {}  # similarity: key -> clients whose tensor was folded in
        self.totals = False  # True: the sums are a formed total (of_totals), not folded uploads
        self.client_ids: list[int] = []
        self.bytes_up = 0  # what the clients sent: tensors as uploaded + 4 bytes per signal
        self.updates: dict[int, ClientUpdate] = {}  # buffer mode only
        self._id_set: set[int] = set()

    @classmethod
    def of_totals(
        cls, round: int, sums: Mapping[str, torch.Tensor], weight: float, dtypes: Mapping[str, torch.dtype]
    ) -> PartialSum:
        """A partial sum holding an already formed float64 total per key and its weight (``mean(key) =
        sums[key] / weight``), e.g. a privacy mechanism's noised sum; it names no clients and carries no signals."""
        out = cls(round)
        out.sums = {k: v.to(torch.float64) for k, v in sums.items()}
        out.dtypes = dict(dtypes)
        out.weight = float(weight)
        out.totals = True
        return out

    @classmethod
    def of(cls, round: int, updates: Iterable[ClientUpdate], **kw: Any) -> PartialSum:
        """A partial sum with ``updates`` folded in (in the given order)."""
        out = cls(round, **kw)
        for u in updates:
            out.add(u)
        return out

    def __len__(self) -> int:
        return len(self.client_ids)

    # ------------------------------------------------------------------ folding
    def add(self, update: ClientUpdate, kept: Mapping[str, torch.Tensor] | None = None) -> None:
        """Fold one client's upload in (and, for ``analysis.similarity`` only, the tensors it keeps). Raises
        ValueError if that client is already in."""
        if update.client_id in self._id_set:
            raise ValueError(f"client {update.client_id} uploaded twice in round {self.round}")
        tensors: Mapping[str, torch.Tensor] = update.tensors
        self.bytes_up += state_bytes(tensors) + 4 * len(update.signals)
        self.client_ids.append(int(update.client_id))
        self._id_set.add(int(update.client_id))
        if self.buffer:
            self.updates[update.client_id] = update
        w = float(update.weight)
        self.weight += w
        for key, t in tensors.items():
            x = t.detach().to(device="cpu", dtype=torch.float64)
            self.dtypes.setdefault(key, t.dtype)
            self.counts[key] = self.counts.get(key, 0) + 1
            if not self.buffer:
                _add_into(self.sums, key, w * x)
        if self.similarity:
            for key, t in {**tensors, **(kept or {})}.items():
                if factor_of(key) == "head":
                    continue
                x = t.detach().to(device="cpu", dtype=torch.float64)
                norm = float(x.norm())
                _add_into(self.unit_sums, key, x / norm if norm > 0 else torch.zeros_like(x))
                self.nonzero[key] = self.nonzero.get(key, 0) + (norm > 0)
                self.sim_counts[key] = self.sim_counts.get(key, 0) + 1
        for name, value in update.signals.items():
            if math.isfinite(float(value)):
                acc = self.signals.setdefault(name, [0.0, 0.0])
                acc[0] += w * float(value)
                acc[1] += w

    def merge(self, other: PartialSum) -> None:
        """Fold another partial sum of the same round and settings in (e.g. one worker's). Raises ValueError on a
        round or settings mismatch, or when a client id is in both."""
        if (other.round, other.similarity, other.buffer) != (self.round, self.similarity, self.buffer):
            raise ValueError(f"cannot merge a partial sum of round {other.round} into one of round {self.round}")
        twice = sorted(self._id_set & set(other.client_ids))
        if twice:
            raise ValueError(f"client(s) {twice[:10]} uploaded twice in round {self.round}")
        self.client_ids.extend(other.client_ids)
        self._id_set.update(other.client_ids)
        self.weight += other.weight
        self.bytes_up += other.bytes_up
        self.updates.update(other.updates)
        for key, t in other.sums.items():
            _add_into(self.sums, key, t)
        for key, t in other.unit_sums.items():
            _add_into(self.unit_sums, key, t)
        pairs = ((self.counts, other.counts), (self.nonzero, other.nonzero), (self.sim_counts, other.sim_counts))
        for mine, theirs in pairs:
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        for key, dt in other.dtypes.items():
            self.dtypes.setdefault(key, dt)
        for name, (ws, w) in other.signals.items():
            acc = self.signals.setdefault(name, [0.0, 0.0])
            acc[0] += ws
            acc[1] += w

    # ------------------------------------------------------------------ results
    def mean(self, key: str) -> torch.Tensor:
        """``sum_k w_k x_k / sum_k w_k`` in float64 (the weighted mean). Raises ValueError for an empty cohort, a
        non-positive total weight, a key not every upload carried, or a buffering partial."""
        if self.buffer:
            raise ValueError("a buffering PartialSum keeps the uploads, not their sums (non-linear method)")
        if not self.client_ids and not self.totals:
            raise ValueError("cannot aggregate an empty cohort")
        if not self.weight > 0:
            raise ValueError(f"aggregation weights must sum to > 0, got {self.weight}")
        if self.totals:
            if key not in self.sums:
                raise ValueError(f"{key!r} is not in this total")
        elif self.counts.get(key, 0) != len(self.client_ids):
            raise ValueError(f"{key!r} was uploaded by {self.counts.get(key, 0)} of {len(self.client_ids)} clients")
        return self.sums[key] / self.weight

    def mean_of_keys(self, global_state: AdapterState, keys: Sequence[str]) -> AdapterState:
        """A copy of ``global_state`` whose ``keys`` are replaced by the weighted mean (cast to the uploads'
        dtype and the global tensor's device). The buffered SVD family averages through :meth:`mean` too
        (:func:`fedsim.methods.aggregation.weighted_means`)."""
        new = dict(global_state)
        for key in keys:
            new[key] = self.mean(key).to(device=global_state[key].device, dtype=self.dtypes[key])
        return new

    def signal_mean(self, name: str) -> float | None:
        """Weighted mean of signal ``name`` over the clients that sent a finite value (None if none did)."""
        acc = self.signals.get(name)
        if acc is None or not acc[1] > 0:
            return None
        return acc[0] / acc[1]

    def buffered(self) -> list[ClientUpdate]:
        """The kept uploads in client-id order (``buffer=True`` only)."""
        if not self.buffer:
            raise ValueError("this PartialSum sums its uploads; it does not keep them")
        return [self.updates[c] for c in sorted(self.updates)]

    def similarity_rows(self, keys: Sequence[str]) -> list[dict[str, Any]]:
        """``analysis.similarity`` rows: per A/B key of ``keys`` that two or more clients trained (uploaded or
        kept), the mean pairwise cosine similarity of their tensors (a zero tensor has similarity 0 with
        everything): ``round, layer, factor, similarity, clients``. Empty without ``similarity=True``."""
        rows: list[dict[str, Any]] = []
        if not self.similarity:
            return rows
        for key in keys:
            n = self.sim_counts.get(key, 0)
            if factor_of(key) == "head" or n < 2:
                continue
            s = self.unit_sums[key]
            sim = (float(s.square().sum()) - self.nonzero.get(key, 0)) / (n * (n - 1))
            rows.append(
                {"round": self.round, "layer": layer_of(key), "factor": factor_of(key), "similarity": sim, "clients": n}
            )
        return rows

    def __setstate__(self, state: dict[str, Any]) -> None:  # travels between Ray processes by pickle
        self.__dict__.update(state)
        self._id_set = set(self.client_ids)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_id_set"}


def _add_into(acc: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    if key in acc:
        if acc[key].shape != value.shape:
            raise ValueError(f"upload {key!r} has shape {tuple(value.shape)}, expected {tuple(acc[key].shape)}")
        acc[key] += value
    else:
        acc[key] = value.clone() if value.dtype == torch.float64 else value.to(torch.float64)
