"""TensorBoard event files of a run (``<run>/tb/``): one scalar per rounds.parquet column and round.

Contract: for every round row and every column of :data:`TAGS` whose value is a finite number, the scalar
``TAGS[column]`` at step ``round`` equals the row's value (stored as float32 by TensorBoard). A resumed run opens
the writer with ``purge_step`` = the first round it runs, so TensorBoard drops events a killed run wrote past its
checkpoint and the events equal rounds.parquet again. Written with ``torch.utils.tensorboard`` (imported here
only, when a run starts). The round loop's second observer (:mod:`fedsim.metrics.observers`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsim.metrics.observers import RoundRecord, RunObserver, RunStart

TB_DIR = "tb"

#: rounds.parquet column -> TensorBoard tag
TAGS: dict[str, str] = {
    "train_loss": "loss/train",
    "eval_loss": "loss/eval",
    "eval_accuracy": "accuracy/eval",
    "personal_accuracy": "accuracy/personal",
    "eval_perplexity": "perplexity/eval",
    "epsilon_max": "privacy/epsilon_max",
    "epsilon_median": "privacy/epsilon_median",
    "bytes_up": "bytes/up",
    "bytes_down": "bytes/down",
    "wall_s": "time/wall_s",
    "worker_busy_frac": "time/worker_busy_frac",
    "clients": "clients/ok",
    "failed_clients": "clients/failed",
}


class RoundEvents(RunObserver):
    """Writes each round's row of rounds.parquet as scalars under ``run_dir/tb`` (see the module doc): ``on_start``
    opens the writer at the run's first round (> 1, a resume: the events a killed run wrote from it on are purged),
    ``on_round`` adds the round's row, ``on_end`` closes it."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / TB_DIR
        self._writer: Any = None

    def on_start(self, start: RunStart) -> None:
        from torch.utils.tensorboard import SummaryWriter

        first = start.first_round
        self._writer = SummaryWriter(str(self.folder), purge_step=first if first > 1 else None)

    def on_round(self, record: RoundRecord) -> None:
        self.add_round(record.row)

    def on_end(self, summary: Mapping[str, Any] | None) -> None:
        self.close()

    def add_round(self, row: Mapping[str, Any]) -> None:
        """The row's numeric, finite values at step ``row["round"]``; flushed, so a mirror copies them. Raises
        RuntimeError when the writer is not open."""
        if self._writer is None:
            raise RuntimeError("RoundEvents: the writer is not open (on_start first)")
        step = int(row["round"])
        for column, tag in TAGS.items():
            value = row.get(column)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the writer (again: nothing)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
