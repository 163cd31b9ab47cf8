"""Prompt/response data from the user's files (task.kind causal_lm): ``jsonl:PATH``, ``parquet:PATH`` and
``csv:PATH`` with the columns ``data.prompt_field`` / ``data.response_field`` (one group), and ``gsm8k:PATH``: JSON
lines with ``question`` and ``answer`` (a worked solution ending in ``#### N``), trained on the whole solution and
scored by exact match on N. Every failure raises :class:`~fedsim.errors.DataError` naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config.schema import DataConfig
from fedsim.data.instruct import extract_number
from fedsim.data.registry import register_source
from fedsim.data.types import InstructDataset
from fedsim.errors import DataError


def _read_table(kind: str, path: Path, source: str) -> Any:
    import pyarrow as pa

    try:
        if kind == "jsonl":
            import pyarrow.json as pjson

            return pjson.read_json(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind == "csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowException, OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data.source: cannot read {source!r} as {kind} ({type(e).__name__}: {first}); check the file."
        ) from e
    raise DataError(
        f"data.source: {kind}:PATH has no prompt/response reader; under task.kind causal_lm use jsonl:, parquet:, "
        "csv: or gsm8k:PATH."
    )


def _text_column(table: Any, column: str, key: str, source: str) -> list[str | None]:
    import pyarrow as pa

    if column not in table.column_names:
        raise DataError(
            f"{key}: column {column!r} is not in {source!r} (columns: {', '.join(map(repr, table.column_names))}); "
            f"name the right one with --set {key}=<column>."
        )
    col = table.column(column)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    return col.to_pylist()


def _pairs_from_table(table: Any, cfg: DataConfig) -> InstructDataset:
    prompts = _text_column(table, cfg.prompt_field, "data.prompt_field", cfg.source)
    responses = _text_column(table, cfg.response_field, "data.response_field", cfg.source)
    rows = [(p, r) for p, r in zip(prompts, responses, strict=True) if p and r and r.strip()]
    if not rows:
        raise DataError(
            f"data.source: no rows of {cfg.source!r} have both {cfg.prompt_field!r} and {cfg.response_field!r} set; "
            "check the file and data.prompt_field / data.response_field."
        )
    ps, rs = [p for p, _ in rows], [r.strip() for _, r in rows]
    return InstructDataset(ps, rs, list(rs), np.zeros(len(rows), dtype=np.int64), ("all",), "text")


def _gsm8k_from_table(table: Any, source: str) -> InstructDataset:
    questions = _text_column(table, "question", "data.source", source)
    solutions = _text_column(table, "answer", "data.source", source)
    ps, rs, ans = [], [], []
    for i, (q, a) in enumerate(zip(questions, solutions, strict=True)):
        if not q or not a:
            continue
        number = extract_number(a) if "####" in a else None
        if number is None:
            raise DataError(
                f"data.source: row {i} of {source!r} has an answer without a final '#### N' line; a gsm8k: file "
                "needs GSM8K's format (use jsonl:PATH with data.prompt_field / data.response_field otherwise)."
            )
        ps.append(q)
        rs.append(a.strip())
        ans.append(number)
    if not ps:
        raise DataError(f"data.source: {source!r} has no rows with both 'question' and 'answer' set.")
    return InstructDataset(ps, rs, ans, np.zeros(len(ps), dtype=np.int64), ("all",), "number")


def _field_problems(cfg: DataConfig, arg: str | None) -> list[str]:
    """data.prompt_field and data.response_field name columns: both must be non-empty."""
    return [
        f"data.{key} must be non-empty; name the column, e.g. {key.split('_')[0]}"
        for key in ("prompt_field", "response_field")
        if not getattr(cfg, key)
    ]


@register_source(
    "csv",
    "jsonl",
    "parquet",
    tasks=("causal_lm",),
    argument="file",
    checks=_field_problems,
    note="with data.prompt_field and data.response_field",
)
def _pairs_file_source(cfg: DataConfig, seed: int, arg: str | None) -> InstructDataset:
    kind = cfg.source.partition(":")[0]
    return _pairs_from_table(_read_table(kind, Path(str(arg)).expanduser(), cfg.source), cfg)


@register_source("gsm8k", tasks=("causal_lm",), argument="file")
def _gsm8k_source(cfg: DataConfig, seed: int, arg: str | None) -> InstructDataset:
    return _gsm8k_from_table(_read_table("jsonl", Path(str(arg)).expanduser(), cfg.source), cfg.source)
