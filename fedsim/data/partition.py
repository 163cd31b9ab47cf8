"""Split training examples across clients: iid, Dirichlet label skew, fixed label proportions, quantity skew.

Contract of :func:`partition`: it returns ``num_clients`` disjoint, sorted int64 index arrays that
together cover ``range(len(labels))``, every one non-empty; the result depends only on the inputs
(all randomness from ``fedsim.seeding.numpy_rng(seed, "partition", ...)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsim.config.schema import PartitionConfig
from fedsim.errors import DataError
from fedsim.seeding import numpy_rng

DIRICHLET_ATTEMPTS = 100


def apportion(total: int, weights: Sequence[float] | np.ndarray, caps: np.ndarray | None = None) -> np.ndarray:
    """Split the integer ``total`` into parts proportional to ``weights`` (largest remainder), each ``<= caps``.

    Parts of zero weight get nothing unless every positive-weight part is full, then the rest is
    spread evenly over the parts with room left. Returns int64 parts summing to ``total``.

    Raises:
        ValueError: negative/non-finite weights, or ``total`` exceeds ``caps.sum()``.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    cap = np.full(len(w), np.iinfo(np.int64).max, dtype=np.int64) if caps is None else np.asarray(caps, np.int64)
    if total < 0 or (caps is not None and total > int(cap.sum())):
        raise ValueError(f"cannot apportion {total} within caps summing to {int(cap.sum())}")
    alloc = np.zeros(len(w), dtype=np.int64)
    remaining = int(total)
    for _ in range(len(w) + 1):
        if remaining == 0:
            break
        room = cap - alloc
        ww = np.where(room > 0, w, 0.0)
        if ww.sum() <= 0:
            ww = (room > 0).astype(np.float64)
        exact = remaining * ww / ww.sum()
        part = np.floor(exact).astype(np.int64)
        short = remaining - int(part.sum())
        if short > 0:
            order = np.argsort(-(exact - part), kind="stable")
            part[order[:short]] += 1
        part = np.minimum(part, room)
        alloc += part
        remaining -= int(part.sum())
    return alloc


def partition(
    labels: np.ndarray,
    num_clients: int,
    cfg: PartitionConfig,
    seed: int,
    *,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Split example indices ``0..len(labels)-1`` into ``num_clients`` shards by ``cfg.kind``.

    - ``iid``: seeded shuffle, then near-equal split.
    - ``dirichlet``: for each class, client proportions ~ Dir(alpha) split its shuffled examples;
      re-drawn up to 100 times until every client has ``>= min_examples``; if no draw satisfies it,
      the best draw is repaired by moving random surplus examples to the short clients.
    - ``label_proportions``: ``cfg.proportions[k % rows]`` is client k's label distribution; class c is
      split over clients in proportion to each row's (row-normalised) entry c.
    - ``quantity``: client sizes ``min_examples + Dir(alpha) share of the rest``, labels iid.

    ``num_classes`` (default ``labels.max() + 1``) is the row length ``label_proportions`` expects.
    ``min_examples`` is taken as at least 1: every client always gets an example.

    Raises:
        DataError: more clients than examples, ``clients * min_examples`` larger than the data,
            bad ``proportions`` rows or a client left with no examples, unknown kind, ``alpha <= 0``.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    n, k = len(labels), int(num_clients)
    if k < 1:
        raise DataError(f"federation.clients: {k}; a federation needs at least 1 client (--set federation.clients=10).")
    if k > n:
        raise DataError(
            f"federation.clients: {k} clients but only {n} training examples; lower federation.clients "
            "or use more data."
        )
    n_cls = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if np.any(labels < 0) or np.any(labels >= n_cls):
        raise ValueError(f"labels must lie in 0..{n_cls - 1}")
    if cfg.kind in ("dirichlet", "quantity") and not cfg.alpha > 0:
        raise DataError(f"data.partition.alpha: {cfg.alpha}; it must be > 0 (e.g. --set data.partition.alpha=0.5).")

    if cfg.kind == "iid":
        rng = numpy_rng(seed, "partition")
        sizes = np.full(k, n // k, dtype=np.int64) + (np.arange(k) < n % k)
        owner = _assign(rng.permutation(n), sizes, n)
    elif cfg.kind == "dirichlet":
        owner = _dirichlet(labels, k, n_cls, cfg, seed)
    elif cfg.kind == "label_proportions":
        owner = _label_proportions(labels, k, n_cls, cfg, seed)
    elif cfg.kind == "quantity":
        owner = _quantity(n, k, cfg, seed)
    else:
        raise DataError(
            f"data.partition.kind: unknown {cfg.kind!r}; use iid, dirichlet, label_proportions or quantity."
        )
    return _shards(owner, k)


# ----------------------------------------------------------------------------- helpers


def _assign(order: np.ndarray, sizes: np.ndarray, n: int) -> np.ndarray:
    """owner[order[:sizes[0]]] = 0, the next sizes[1] -> 1, ..."""
    owner = np.empty(n, dtype=np.int64)
    owner[order] = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    return owner


def _shards(owner: np.ndarray, k: int) -> list[np.ndarray]:
    order = np.argsort(owner, kind="stable")  # stable: indices stay sorted within a client
    counts = np.bincount(owner, minlength=k)
    return [s.astype(np.int64) for s in np.split(order, np.cumsum(counts)[:-1])]


def _min_size(k: int, n: int, cfg: PartitionConfig) -> int:
    m = max(int(cfg.min_examples), 1)
    if k * m > n:
        raise DataError(
            f"federation.clients / data.partition.min_examples: {k} clients x {m} examples each needs {k * m} "
            f"training examples but there are {n}; lower federation.clients or data.partition.min_examples, "
            "or use more data."
        )
    return m


def _dirichlet_draw(rng: np.random.Generator, alpha: float, k: int, rows: int = 1) -> np.ndarray:
    """``[rows, k]`` draws of Dir(alpha, ..., alpha); a row that underflows puts all mass on one random client."""
    p = rng.dirichlet(np.full(k, alpha), size=rows)
    bad = ~np.all(np.isfinite(p), axis=1) | (np.nan_to_num(p).sum(axis=1) <= 0)
    for r in np.flatnonzero(bad):  # tiny alpha can underflow
        p[r] = 0.0
        p[r, rng.integers(k)] = 1.0
    return p


def _cut_counts(totals: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Row i: ``totals[i]`` split at ``floor(cumsum(shares[i]) * totals[i])`` (the usual Dirichlet cut points)."""
    cuts = np.floor(np.cumsum(shares, axis=1) * totals[:, None]).astype(np.int64)
    cuts = np.minimum(cuts, totals[:, None])
    cuts[:, -1] = totals
    return np.diff(cuts, axis=1, prepend=0)


def _dirichlet(labels: np.ndarray, k: int, n_cls: int, cfg: PartitionConfig, seed: int) -> np.ndarray:
    n = len(labels)
    m = _min_size(k, n, cfg)
    class_sizes = np.bincount(labels, minlength=n_cls)
    best: tuple[int, int] | None = None  # (shortfall, attempt)
    best_counts: np.ndarray | None = None
    for attempt in range(DIRICHLET_ATTEMPTS):
        rng = numpy_rng(seed, "partition", attempt)
        counts = _cut_counts(class_sizes, _dirichlet_draw(rng, cfg.alpha, k, rows=n_cls))
        shortfall = int(np.maximum(m - counts.sum(axis=0), 0).sum())
        if best is None or shortfall < best[0]:
            best, best_counts = (shortfall, attempt), counts
        if shortfall == 0:
            break
    assert best is not None and best_counts is not None
    rng = numpy_rng(seed, "partition", best[1], 1)
    owner = np.empty(n, dtype=np.int64)
    for c in range(n_cls):
        idx = rng.permutation(np.flatnonzero(labels == c))
        owner[idx] = np.repeat(np.arange(k, dtype=np.int64), best_counts[c])
    if best[0] > 0:
        _repair(owner, k, m, numpy_rng(seed, "partition", DIRICHLET_ATTEMPTS))
    return owner


def _repair(owner: np.ndarray, k: int, m: int, rng: np.random.Generator) -> None:
    """Give every client ``>= m`` examples by moving random surplus examples (beyond m) of other clients."""
    sizes = np.bincount(owner, minlength=k)
    need = np.maximum(m - sizes, 0)
    surplus = np.maximum(sizes - m, 0)
    groups = _shards(owner, k)
    pool = np.concatenate([rng.permutation(g)[:s] for g, s in zip(groups, surplus, strict=True) if s > 0])
    take = rng.choice(pool, size=int(need.sum()), replace=False)
    owner[take] = np.repeat(np.arange(k, dtype=np.int64), need)


def _label_proportions(labels: np.ndarray, k: int, n_cls: int, cfg: PartitionConfig, seed: int) -> np.ndarray:
    rows = cfg.proportions
    key = "data.partition.proportions"
    if not rows:
        raise DataError(
            f"{key}: label_proportions needs one row per client with its label distribution, e.g. "
            "[[0.1,0.9],[0.9,0.1],[0.5,0.5]] (set it in the config file)."
        )
    table = []
    for i, row in enumerate(rows):
        try:
            r = np.asarray(row, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"{key}: row {i} ({row!r}) is not a list of numbers.") from None
        if len(r) != n_cls:
            raise DataError(
                f"{key}: row {i} has {len(r)} entries but the data has {n_cls} classes; give one proportion per class."
            )
        if np.any(~np.isfinite(r)) or np.any(r < 0) or r.sum() <= 0:
            raise DataError(f"{key}: row {i} ({row!r}) must be non-negative numbers with a positive sum.")
        table.append(r / r.sum())
    w = np.stack([table[j % len(table)] for j in range(k)])  # [clients, classes]
    rng = numpy_rng(seed, "partition")
    owner = np.empty(len(labels), dtype=np.int64)
    for c in range(n_cls):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) and w[:, c].sum() <= 0:
            raise DataError(
                f"{key}: class {c} has proportion 0 for every client, so its {len(idx)} examples have nowhere to go; "
                "give it a positive entry in at least one row."
            )
        owner[idx] = np.repeat(np.arange(k, dtype=np.int64), apportion(len(idx), w[:, c]))
    sizes = np.bincount(owner, minlength=k)
    if sizes.min() == 0:
        empty = np.flatnonzero(sizes == 0)
        raise DataError(
            f"{key}: {len(empty)} client(s) (e.g. client {int(empty[0])}) receive no examples with these rows; "
            "lower federation.clients or give those rows more weight on common classes."
        )
    return owner


def _quantity(n: int, k: int, cfg: PartitionConfig, seed: int) -> np.ndarray:
    m = _min_size(k, n, cfg)
    rng = numpy_rng(seed, "partition")
    sizes = m + apportion(n - k * m, _dirichlet_draw(rng, cfg.alpha, k)[0])
    return _assign(rng.permutation(n), sizes, n)
