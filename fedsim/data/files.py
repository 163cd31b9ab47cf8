"""Classification data from the user's files: ``csv:PATH`` (pyarrow.csv), ``jsonl:PATH`` (JSON lines,
pyarrow.json), ``parquet:PATH`` (pyarrow.parquet) and ``disk:PATH`` (a ``datasets`` ``save_to_disk`` folder: a
Dataset, or a DatasetDict whose splits are concatenated in sorted split order).

The text and label columns are ``data.text_field`` / ``data.label_field``; rows with either null are dropped;
labels map to ids ``0..C-1`` in sorted order of their values (a ClassLabel's names are kept). Every failure raises
:class:`~fedsim.errors.DataError` naming the config key and the fix. The prompt/response form of the same files
(task.kind causal_lm) is :mod:`fedsim.data.instruct_files`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config.schema import DataConfig
from fedsim.data.registry import register_source, source_help
from fedsim.data.types import TextDataset
from fedsim.errors import DataError


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
            f"or choose the matching reader ({source_help('classification')})."
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


@register_source("csv", "jsonl", "parquet", argument="file")
def _table_file_source(cfg: DataConfig, seed: int, arg: str | None) -> TextDataset:
    kind = cfg.source.partition(":")[0]
    return _load_file(kind, Path(str(arg)).expanduser(), cfg)


@register_source("disk", argument="folder")
def _disk_source(cfg: DataConfig, seed: int, arg: str | None) -> TextDataset:
    return _load_file("disk", Path(str(arg)).expanduser(), cfg)
