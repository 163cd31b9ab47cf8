"""FederatedData: test / client-train / client-holdout split, tokenisation, early errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedsim.config.schema import Config, DataConfig, FederationConfig, PartitionConfig
from fedsim.data.federated import build_federated_data, tokenize
from fedsim.data.synthetic import make_synthetic
from fedsim.data.types import TextDataset
from fedsim.errors import DataError

MAX_LEN = 16


@pytest.fixture(scope="module")
def dataset() -> TextDataset:
    return make_synthetic(400, 4, seed=0)  # balanced: 100 per class


@pytest.fixture(scope="module")
def tokenizer(dataset):
    """A tiny word-level stand-in for a transformers tokenizer, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in dataset.texts for w in t.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _cfg(clients: int = 5, kind: str = "dirichlet", seed: int = 0, **data) -> Config:
    data.setdefault("max_length", MAX_LEN)
    return Config(
        seed=seed,
        data=DataConfig(partition=PartitionConfig(kind=kind), **data),
        federation=FederationConfig(clients=clients),
    )


class _ExplodingTokenizer:
    def __call__(self, *a, **kw):
        raise AssertionError("tokenizer must not be called")


def test_tokenize_pads_truncates_and_matches_tokenizer(tokenizer):
    texts = ["apple river stone", "the " * 40, "zzz-unknown"]
    ids, mask = tokenize(texts, tokenizer, MAX_LEN)
    assert ids.shape == mask.shape == (3, MAX_LEN) and ids.dtype == np.int32 and mask.dtype == np.int8
    assert not ids.flags.writeable and not mask.flags.writeable  # views of the Arrow table, not copies
    ref = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LEN)
    assert np.array_equal(ids, np.asarray(ref["input_ids"])) and np.array_equal(mask, np.asarray(ref["attention_mask"]))
    assert mask[0].sum() == 3 and mask[1].sum() == MAX_LEN  # padded / truncated
    empty_ids, empty_mask = tokenize([], tokenizer, MAX_LEN)
    assert empty_ids.shape == empty_mask.shape == (0, MAX_LEN)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "quantity"])
def test_split_shapes_disjoint_and_cover(dataset, tokenizer, kind):
    fd = build_federated_data(_cfg(kind=kind), dataset, tokenizer)
    n = len(dataset.texts)
    assert fd.input_ids.shape == fd.attention_mask.shape == (n, MAX_LEN)
    assert fd.labels.dtype == np.int64 and np.array_equal(fd.labels, dataset.labels)
    assert fd.num_labels == 4 and fd.num_clients == 5 and fd.label_names == dataset.label_names
    parts = [fd.test_indices, *fd.client_train, *fd.client_holdout]
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))
    assert all(len(t) >= 1 for t in fd.client_train)


def test_test_split_is_stratified(dataset, tokenizer):
    fd = build_federated_data(_cfg(test_fraction=0.2), dataset, tokenizer)
    assert len(fd.test_indices) == 80
    assert np.bincount(fd.labels[fd.test_indices], minlength=4).tolist() == [20, 20, 20, 20]


def test_test_split_without_stratification_when_a_class_is_a_singleton(tokenizer):
    labels = np.asarray([0] * 30 + [1] * 29 + [2], dtype=np.int64)
    ds = TextDataset([f"apple {i}" for i in range(60)], labels, ("a", "b", "c"))
    fd = build_federated_data(_cfg(clients=3, kind="iid", test_fraction=0.25), ds, tokenizer)
    assert len(fd.test_indices) == 15


def test_personal_holdout_sizes(dataset, tokenizer):
    fd = build_federated_data(_cfg(kind="quantity", personal_fraction=0.2), dataset, tokenizer)
    for tr, ho in zip(fd.client_train, fd.client_holdout, strict=True):
        shard = len(tr) + len(ho)
        expected = min(max(int(np.floor(0.2 * shard)), 1 if shard >= 2 else 0), shard - 1)
        assert len(ho) == expected and len(tr) >= 1
    none = build_federated_data(_cfg(personal_fraction=0.0), dataset, tokenizer)
    assert all(len(h) == 0 for h in none.client_holdout)


def test_deterministic_and_seed_dependent(dataset, tokenizer):
    a = build_federated_data(_cfg(seed=3), dataset, tokenizer)
    b = build_federated_data(_cfg(seed=3), dataset, tokenizer)
    c = build_federated_data(_cfg(seed=4), dataset, tokenizer)
    assert np.array_equal(a.test_indices, b.test_indices)
    assert all(
        np.array_equal(x, y)
        for x, y in zip(a.client_train + a.client_holdout, b.client_train + b.client_holdout, strict=True)
    )
    assert not np.array_equal(a.test_indices, c.test_indices)


def test_client_arrays_gathers_rows(dataset, tokenizer):
    fd = build_federated_data(_cfg(), dataset, tokenizer)
    idx = fd.client_train[2]
    ids, mask, y = fd.client_arrays(idx)
    assert ids.shape == (len(idx), MAX_LEN) and mask.shape == ids.shape
    assert np.array_equal(ids, fd.input_ids[idx]) and np.array_equal(y, dataset.labels[idx])
    assert ids.dtype == mask.dtype == y.dtype == np.int64  # widened for torch's embedding at gather time
    assert ids.flags.writeable and mask.flags.writeable
    assert fd.input_ids.nbytes + fd.attention_mask.nbytes == 5 * fd.input_ids.size  # int32 ids + int8 mask


def test_too_many_clients_fails_before_tokenising(dataset):
    cfg = _cfg(clients=321)  # 400 examples, 80 test -> 320 for training
    with pytest.raises(DataError, match=r"federation.clients: 321 clients but only 320 training examples"):
        build_federated_data(cfg, dataset, _ExplodingTokenizer())


def test_partition_errors_surface_before_tokenising(dataset):
    cfg = _cfg(kind="label_proportions")
    cfg = replace(cfg, data=replace(cfg.data, partition=PartitionConfig(kind="label_proportions", proportions=[[1]])))
    with pytest.raises(DataError, match="data.partition.proportions"):
        build_federated_data(cfg, dataset, _ExplodingTokenizer())


def test_client_shards_are_read_only_views_of_one_flat_array(dataset, tokenizer):
    import pickle

    from fedsim.data.federated import ClientShards

    fd = build_federated_data(_cfg(kind="quantity", personal_fraction=0.2), dataset, tokenizer)
    shards = fd.client_train
    assert isinstance(shards, ClientShards) and len(shards) == fd.num_clients == 5
    assert np.array_equal(fd.client_sizes, [len(s) for s in shards]) and fd.client_sizes.sum() == len(shards.flat)
    assert np.array_equal(shards[-1], shards[4]) and [len(x) for x in shards[1:3]] == [len(shards[1]), len(shards[2])]
    with pytest.raises(IndexError):
        shards[5]
    assert shards[2].base is not None and not shards[2].flags.writeable  # a view: no per-client copy
    with pytest.raises(ValueError):
        shards[2][0] = 0
    back = pickle.loads(pickle.dumps(shards))  # what Ray ships: two arrays, not one object per client
    assert all(np.array_equal(x, y) for x, y in zip(back, shards, strict=True))
    assert len(shards + fd.client_holdout) == 10  # tuple-like concatenation, as before
    rebuilt = ClientShards.from_arrays([np.arange(3), np.zeros(0, np.int64), np.arange(3, 5)])
    assert [x.tolist() for x in rebuilt] == [[0, 1, 2], [], [3, 4]] and rebuilt.sizes.tolist() == [3, 0, 2]
    with pytest.raises(ValueError, match="offsets"):
        ClientShards(np.arange(4), np.asarray([0, 2, 3]))
