"""Live progress: round i/N, loss, accuracy, elapsed and ETA (rich; plain lines when not a TTY)."""

from __future__ import annotations

import math
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


class RoundProgress:
    """Context manager; ``update(row)`` after each round with the round's metrics row."""

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

    def __enter__(self) -> RoundProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, row: dict[str, Any]) -> None:
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
            eta = elapsed / done * (self.rounds - done)
            self.console.print(f"round {done}/{self.rounds}  {text}  elapsed {elapsed:.0f}s  eta {eta:.0f}s")
