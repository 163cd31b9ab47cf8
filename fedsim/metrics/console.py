"""Live progress: round i/N, loss, accuracy, elapsed and ETA (rich; plain lines when not a TTY)."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedsim.metrics.observers import RoundRecord, RunObserver, RunStart


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


class RoundProgress(RunObserver):
    """The progress bar as an observer of the round loop: ``on_start`` shows it (a resumed run's bar starts at the
    rounds already done), ``on_round`` updates it with the round's row, ``on_end`` takes it down (once)."""

    def __init__(self, rounds: int, title: str, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.rounds = rounds
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
        )
        self.task = self.progress.add_task(title, total=rounds, metrics="")
        self._acc: float | None = None
        self._done_before = 0  # rounds finished before this process started (a resume)
        self._started = False

    def on_start(self, start: RunStart) -> None:
        self._done_before = start.first_round - 1
        self.progress.update(self.task, completed=self._done_before)
        self.progress.start()
        self._started = True

    def on_round(self, record: RoundRecord) -> None:
        self.update(record.row)

    def on_end(self, summary: Mapping[str, Any] | None) -> None:
        if self._started:  # once, also when the run stops
            self._started = False
            self.progress.stop()

    def update(self, row: Mapping[str, Any]) -> None:
        if row.get("eval_accuracy") is not None:
            self._acc = row["eval_accuracy"]
        text = f"loss {_fmt(row.get('train_loss'))}  acc {_fmt(self._acc)}"
        if row.get("epsilon_max") is not None:
            text += f"  eps {row['epsilon_max']:.2f}"
        if row.get("budget_exhausted"):
            text += f"  exhausted {row['budget_exhausted']}"
        if row.get("failed_clients"):
            text += f"  failed {row['failed_clients']}"
        self.progress.update(self.task, advance=1, metrics=text)
        if self.enabled and not self.live:
            elapsed = self.progress.tasks[0].elapsed or 0.0
            done = row["round"]
            eta = elapsed / max(done - self._done_before, 1) * (self.rounds - done)  # from this process's rounds
            self.console.print(f"round {done}/{self.rounds}  {text}  elapsed {elapsed:.0f}s  eta {eta:.0f}s")
