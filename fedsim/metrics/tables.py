"""rounds.parquet and clients.parquet: the run's metric tables (part of the output contract).

Both files are rewritten after every round (atomically, via a temporary file), so a stopped
run leaves complete tables of the rounds it finished. :class:`MetricTables` is the round loop's first observer
(:mod:`fedsim.metrics.observers`): a round's tables are on disk before its checkpoint is written, so a checkpoint
never covers a round its tables lack.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedsim.metrics.observers import RoundRecord, RunObserver
from fedsim.model.keys import factor_of, layer_of
from fedsim.types import ClientResult, EvalResult, RoundPlan

ROUND_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("method", pa.string()),
        ("train_loss", pa.float64()),
        ("eval_loss", pa.float64()),
        ("eval_accuracy", pa.float64()),
        ("eval_perplexity", pa.float64()),  # task.kind causal_lm: exp(mean response-token NLL); null otherwise
        ("personal_accuracy", pa.float64()),
        ("personal_accuracy_unweighted", pa.float64()),
        ("personal_clients", pa.int32()),  # clients in the local evaluation: those that have trained at least once
        ("clients", pa.int32()),
        ("failed_clients", pa.int32()),
        ("budget_exhausted", pa.int32()),
        ("bytes_up", pa.int64()),
        ("bytes_down", pa.int64()),
        ("epsilon_max", pa.float64()),
        ("epsilon_median", pa.float64()),
        # seconds from the completion of the previous round's row to this one's: this round's plan, training,
        # aggregation and evaluation + the previous round's recording (see fedsim.metrics.observers)
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


ROLE_SCHEMA = pa.schema([("round", pa.int32()), ("layer", pa.string()), ("factor", pa.string()), ("role", pa.string())])
#: the table of every plan's roles (any method); runs before it existed wrote AS-LoRA's shared factors here
ROLES_FILE, LEGACY_CHOICES_FILE = "roles.parquet", "as_lora_choices.parquet"
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


def summarise_eval(results: Sequence[EvalResult]) -> dict[str, float | int | None]:
    """``eval_loss`` / ``eval_accuracy`` over the global chunks; local accuracy pooled (``personal_accuracy``) and
    as the per-client mean (``personal_accuracy_unweighted``) over the clients' own held-out examples, and how
    many clients it covers (``personal_clients``). ``eval_perplexity``: exp of the mean response-token NLL over the
    global chunks (causal_lm; None when no chunk scored tokens)."""
    glob = [r for r in results if r.name == "global"]
    pers = [r for r in results if r.name != "global" and r.count]
    n = sum(r.count for r in glob)
    tokens = sum(r.tokens for r in glob)
    return {
        "eval_loss": sum(r.loss_sum for r in glob) / n if n else None,
        "eval_accuracy": sum(r.correct for r in glob) / n if n else None,
        "eval_perplexity": math.exp(sum(r.token_loss_sum for r in glob) / tokens) if tokens else None,
        "personal_accuracy": sum(r.correct for r in pers) / sum(r.count for r in pers) if pers else None,
        "personal_accuracy_unweighted": float(np.mean([r.correct / r.count for r in pers])) if pers else None,
        "personal_clients": len(pers),
    }


def weighted_train_loss(results: Sequence[ClientResult]) -> float | None:
    """Mean training loss of the clients that trained, weighted by their examples (None if none did)."""
    ok = [r for r in results if r.status == "ok" and not math.isnan(r.train_loss)]
    total = sum(r.examples for r in ok)
    return sum(r.train_loss * r.examples for r in ok) / total if total else None


def round_row(
    round: int,
    method: str,
    results: Sequence[ClientResult],
    ev: dict[str, float | int | None],
    epsilon: dict[str, float | None],
    wall_s: float,
    busy_frac: float | None,
) -> dict[str, Any]:
    """One row of rounds.parquet from the round's client results, its evaluation (empty if not evaluated), the
    privacy tracker's epsilon columns and its timings. Pure: no I/O, no method-specific fields."""
    return {
        "round": round,
        "method": method,
        "train_loss": weighted_train_loss(results),
        **{
            k: ev.get(k)
            for k in (
                "eval_loss",
                "eval_accuracy",
                "eval_perplexity",
                "personal_accuracy",
                "personal_accuracy_unweighted",
            )
        },
        "personal_clients": ev.get("personal_clients"),
        "clients": sum(r.status == "ok" for r in results),
        "failed_clients": sum(r.status == "failed" for r in results),
        "budget_exhausted": sum(r.status == "budget_exhausted" for r in results),
        "bytes_up": sum(r.bytes_up for r in results),
        "bytes_down": sum(r.bytes_down for r in results),
        **epsilon,
        "wall_s": wall_s,
        "worker_busy_frac": busy_frac,
    }


def _write(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in rows], schema=schema)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class MetricTables(RunObserver):
    """Accumulates round and client rows; ``flush`` writes both Parquet files. As an observer: each round's rows
    (rounds, clients, roles, similarity when the analysis is on) are added and every table is written."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        self.roles: list[dict[str, Any]] = []  # per round, layer and factor: its role in the plan
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
        tables.roles = rows(ROLES_FILE)
        if (tables.out_dir / "similarity.parquet").is_file():
            tables.similarity = rows("similarity.parquet")
        return tables

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        self.rounds.append(row)
        self.clients.extend(client_rows)

    def add_roles(self, plan: RoundPlan) -> None:
        """Record the role (shared, kept, frozen) of every layer's A and B factor in ``plan`` (any method; for
        AS-LoRA the shared factor is its per-layer choice)."""
        for key, role in plan.roles.items():
            factor = factor_of(key)
            if factor in ("A", "B"):
                self.roles.append({"round": plan.round, "layer": layer_of(key), "factor": factor, "role": role.value})

    def add_similarity(self, rows: list[dict[str, Any]]) -> None:
        self.similarity = [*(self.similarity or []), *rows]

    def on_round(self, record: RoundRecord) -> None:
        self.add_round(dict(record.row), [dict(r) for r in record.client_rows])
        self.add_roles(record.plan)
        if record.similarity is not None:
            self.add_similarity([dict(r) for r in record.similarity])
        self.flush()

    def flush(self) -> None:
        _write(self.rounds, ROUND_SCHEMA, self.out_dir / "rounds.parquet")
        _write(self.clients, CLIENT_SCHEMA, self.out_dir / "clients.parquet")
        _write(self.roles, ROLE_SCHEMA, self.out_dir / ROLES_FILE)
        if self.similarity is not None:
            _write(self.similarity, SIMILARITY_SCHEMA, self.out_dir / "similarity.parquet")
