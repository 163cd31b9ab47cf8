"""Client partitions: coverage, determinism, the skew each kind promises, and the user errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.config.schema import PartitionConfig
from fedsim.data.partition import apportion, partition
from fedsim.errors import DataError

KINDS = ["iid", "dirichlet", "label_proportions", "quantity"]
LABELS = np.repeat(np.arange(4), [150, 100, 80, 70])  # 400 examples, 4 unequal classes
PROPS = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]


def _cfg(kind: str, **kw) -> PartitionConfig:
    if kind == "label_proportions":
        kw.setdefault("proportions", PROPS)
    return PartitionConfig(kind=kind, **kw)


def _max_label_share(shards, labels, n_cls) -> float:
    return float(np.mean([np.bincount(labels[s], minlength=n_cls).max() / len(s) for s in shards]))


@pytest.mark.parametrize("kind", KINDS)
def test_disjoint_sorted_cover(kind):
    shards = partition(LABELS, 12, _cfg(kind), seed=0)
    assert len(shards) == 12
    for s in shards:
        assert s.dtype == np.int64 and len(s) >= 1 and np.all(np.diff(s) > 0)
    allidx = np.concatenate(shards)
    assert len(allidx) == len(LABELS) and np.array_equal(np.sort(allidx), np.arange(len(LABELS)))


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_seed_and_varies_across_seeds(kind):
    a = partition(LABELS, 8, _cfg(kind), seed=1)
    b = partition(LABELS, 8, _cfg(kind), seed=1)
    c = partition(LABELS, 8, _cfg(kind), seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_near_equal_sizes_and_mixed_labels():
    shards = partition(LABELS, 7, PartitionConfig(kind="iid"), seed=0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert _max_label_share(shards, LABELS, 4) < 0.6  # no client dominated by one class


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    labels = np.repeat(np.arange(5), 400)
    skew = {
        a: np.mean([_max_label_share(partition(labels, 20, PartitionConfig(alpha=a), s), labels, 5) for s in range(3)])
        for a in (0.05, 100.0)
    }
    assert skew[0.05] > 0.7
    assert skew[100.0] < 0.35  # near the iid value 1/5
    assert skew[0.05] > skew[100.0] + 0.4


def test_dirichlet_min_examples_honoured_even_when_redraws_fail():
    labels = np.repeat(np.arange(4), 250)
    shards = partition(labels, 200, PartitionConfig(alpha=0.05, min_examples=4), seed=0)
    assert min(len(s) for s in shards) >= 4
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(1000))


def test_dirichlet_impossible_min_examples_names_keys():
    with pytest.raises(DataError) as e:
        partition(LABELS, 100, PartitionConfig(min_examples=5), seed=0)
    msg = str(e.value)
    assert "federation.clients" in msg and "data.partition.min_examples" in msg and "400" in msg


def test_label_proportions_match_requested_rows():
    labels = np.repeat(np.arange(2), 600)
    rows = [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]
    shards = partition(labels, 6, PartitionConfig(kind="label_proportions", proportions=rows), seed=0)
    for k, s in enumerate(shards):
        share0 = np.mean(labels[s] == 0)
        assert abs(share0 - rows[k % 3][0]) < 0.02, (k, share0)
    # rows reused cyclically: clients k and k+3 get the same amount of each class
    for k in range(3):
        assert np.array_equal(np.bincount(labels[shards[k]]), np.bincount(labels[shards[k + 3]]))


def test_label_proportions_rows_are_normalised():
    labels = np.repeat(np.arange(2), 500)
    shards = partition(labels, 2, PartitionConfig(kind="label_proportions", proportions=[[1, 9], [0.9, 0.1]]), 0)
    assert abs(np.mean(labels[shards[0]] == 0) - 0.1) < 0.02


@pytest.mark.parametrize(
    "rows", [None, [[0.5, 0.5]], [[0.5, 0.5, 0.0, 0.0, 0.0]], [[1, 0, 0, -1]], [[1, 0, 0, 0], [1, 0, 0, 0]]]
)
def test_label_proportions_bad_rows(rows):
    with pytest.raises(DataError, match="data.partition.proportions"):
        partition(LABELS, 2, PartitionConfig(kind="label_proportions", proportions=rows), seed=0)


def test_label_proportions_uses_given_num_classes():
    labels = np.repeat(np.arange(2), 50)  # class 2 absent from this (training) split
    rows = [[0.5, 0.5, 0.0], [0.5, 0.5, 1.0]]
    shards = partition(labels, 2, PartitionConfig(kind="label_proportions", proportions=rows), 0, num_classes=3)
    assert sum(len(s) for s in shards) == 100


def test_quantity_skews_sizes_but_not_labels():
    labels = np.repeat(np.arange(4), 500)
    shards = partition(labels, 20, PartitionConfig(kind="quantity", alpha=0.3, min_examples=3), seed=0)
    sizes = np.array([len(s) for s in shards])
    assert sizes.min() >= 3
    assert sizes.max() > 2 * sizes.mean() and sizes.max() / sizes.min() > 10
    big = shards[int(sizes.argmax())]
    assert np.bincount(labels[big], minlength=4).max() / len(big) < 0.4  # labels stay iid


def test_too_many_clients():
    with pytest.raises(DataError, match=r"federation.clients: 401 clients but only 400 training examples"):
        partition(LABELS, 401, PartitionConfig(kind="iid"), seed=0)


def test_unknown_kind_and_bad_alpha():
    with pytest.raises(DataError, match="data.partition.kind"):
        partition(LABELS, 2, PartitionConfig(kind="zipf"), seed=0)
    with pytest.raises(DataError, match="data.partition.alpha"):
        partition(LABELS, 2, PartitionConfig(alpha=0.0), seed=0)


def test_apportion_exact():
    assert apportion(10, [1, 1, 2]).tolist() == [3, 2, 5]  # remainder ties go to the lower index
    assert apportion(12, [1, 1, 2]).tolist() == [3, 3, 6]
    assert apportion(7, [0, 1, 0]).tolist() == [0, 7, 0]
    capped = apportion(10, [1, 1, 8], caps=np.array([5, 5, 2]))
    assert capped.tolist()[2] == 2 and capped.sum() == 10 and np.all(capped <= [5, 5, 2])
    assert apportion(3, [0, 1], caps=np.array([5, 1])).tolist() == [2, 1]  # zero weight used once the rest is full
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.random(6)
        t = int(rng.integers(0, 100))
        parts = apportion(t, w)
        assert parts.sum() == t and np.all(np.abs(parts - t * w / w.sum()) < 1)
    with pytest.raises(ValueError):
        apportion(10, [1, 1], caps=np.array([3, 3]))
