"""rounds.parquet and clients.parquet: the run's metric tables (part of the output contract).

Both files are rewritten after every round (atomically, via a temporary file), so a stopped
run leaves complete tables of the rounds it finished.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fedsim.model.keys import factor_of, layer_of
from fedsim.types import ClientResult, RoundPlan

ROUND_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("method", pa.string()),
        ("train_loss", pa.float64()),
        ("eval_loss", pa.float64()),
        ("eval_accuracy", pa.float64()),
        ("personal_accuracy", pa.float64()),
        ("personal_accuracy_unweighted", pa.float64()),
        ("clients", pa.int32()),
        ("failed_clients", pa.int32()),
        ("budget_exhausted", pa.int32()),
        ("bytes_up", pa.int64()),
        ("bytes_down", pa.int64()),
        ("epsilon_max", pa.float64()),
        ("epsilon_median", pa.float64()),
        ("wall_s", pa.float64()),
        # mean over workers of (their clients' training seconds) / (wall seconds of the round's training phase)
        ("worker_busy_frac", pa.float64()),
    ]
)

CLIENT_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("client_id", pa.int32()),
        ("worker_id", pa.int32()),
        ("examples", pa.int32()),
        ("steps", pa.int32()),
        ("train_loss", pa.float64()),
        ("epsilon", pa.float64()),
        ("noise_multiplier", pa.float64()),
        ("sample_rate", pa.float64()),
        ("seconds", pa.float64()),
        ("status", pa.string()),
        ("bytes_up", pa.int64()),
        ("bytes_down", pa.int64()),
        ("error", pa.string()),
    ]
)


CHOICE_SCHEMA = pa.schema([("round", pa.int32()), ("layer", pa.string()), ("factor", pa.string())])
SIMILARITY_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("layer", pa.string()),
        ("factor", pa.string()),
        ("similarity", pa.float64()),
        ("clients", pa.int32()),
    ]
)


def worker_busy_frac(results: Sequence[ClientResult], workers: int, train_wall_s: float) -> float | None:
    """Mean over workers of (sum of that worker's client training seconds) / ``train_wall_s``.

    ``workers``: how many workers could take clients; a worker that got none counts as idle (0), so the value is
    the fraction of the training phase's worker-time spent training. Results without a worker (``worker_id`` < 0,
    e.g. lost with a dead actor) are not counted. None when ``train_wall_s`` is not positive or there are no
    workers; not clipped, so a value above 1 exposes double-counted seconds."""
    seen = {r.worker_id for r in results if r.worker_id >= 0}
    n = max(int(workers), len(seen))
    if n <= 0 or not train_wall_s > 0:
        return None
    busy = sum(r.seconds for r in results if r.worker_id >= 0)
    return busy / (n * train_wall_s)


def _write(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in rows], schema=schema)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class MetricTables:
    """Accumulates round and client rows; ``flush`` writes both Parquet files."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        self.choices: list[dict[str, Any]] = []  # per round and layer: the factor trained and shared
        self.similarity: list[dict[str, Any]] | None = None  # analysis.similarity rows (None = analysis off)

    @classmethod
    def resume(cls, out_dir: Path, upto_round: int) -> MetricTables:
        """The tables of a stopped run, keeping only rounds ``<= upto_round`` (those its checkpoint covers)."""
        tables = cls(out_dir)

        def rows(name: str) -> list[dict[str, Any]]:
            path = tables.out_dir / name
            if not path.is_file():
                return []
            return [r for r in pq.read_table(path).to_pylist() if r["round"] <= upto_round]

        tables.rounds = rows("rounds.parquet")
        tables.clients = rows("clients.parquet")
        tables.choices = rows("as_lora_choices.parquet")
        if (tables.out_dir / "similarity.parquet").is_file():
            tables.similarity = rows("similarity.parquet")
        return tables

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        self.rounds.append(row)
        self.clients.extend(client_rows)

    def add_choices(self, round: int, plan: RoundPlan) -> None:
        """Record which factor of each layer was SHARED in ``round`` (AS-LoRA's per-layer choice)."""
        for key in plan.uploaded:
            factor = factor_of(key)
            if factor != "head":
                self.choices.append({"round": round, "layer": layer_of(key), "factor": factor})

    def add_similarity(self, rows: list[dict[str, Any]]) -> None:
        self.similarity = [*(self.similarity or []), *rows]

    def flush(self) -> None:
        _write(self.rounds, ROUND_SCHEMA, self.out_dir / "rounds.parquet")
        _write(self.clients, CLIENT_SCHEMA, self.out_dir / "clients.parquet")
        if self.choices:
            _write(self.choices, CHOICE_SCHEMA, self.out_dir / "as_lora_choices.parquet")
        if self.similarity is not None:
            _write(self.similarity, SIMILARITY_SCHEMA, self.out_dir / "similarity.parquet")
