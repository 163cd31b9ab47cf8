"""Round observers: what the round loop tells the run's outputs, and the order it tells them in.

The driver (:func:`fedsim.simulation.run_simulation`) computes; everything that records or reports a round is an
observer with three hooks, no-ops by default (the shape of pfl-research's training-process callbacks):

- ``on_start(start)``: once, after set-up (backend ready, a resume's state restored, the initial evaluation made
  when it is due before round 1), before the first round this process runs;
- ``on_round(record)``: once per round, in round order, with the round's :class:`RoundRecord` (its rounds.parquet
  row complete, ``wall_s`` included);
- ``on_end(summary)``: once, last, for every observer whose ``on_start`` was called: with the summary dict after
  summary.json is written (a finished run), or with None when the run stops with an exception (after the backend
  is shut down; the exception then propagates).

Observers are called in the order of their list; the driver's list is fixed: tables (rounds.parquet and the other
tables), TensorBoard, progress, checkpoints, storage sync, then the caller's observers (a search trial's Tune
reporter, the ``on_round`` callback). So a caller sees a round only once its tables and checkpoint are written and
mirrored, and the sync sees a round's files only once they are all written. An exception raised by an observer's
``on_start`` or ``on_round`` stops the run as any other error does: no later observer sees that round, the backend
shuts down and every observer's ``on_end(None)`` runs.

``wall_s`` of round t (the rounds.parquet column) is the time between two consecutive completed rows: from the moment
round t-1's row was completed (for the first round a process runs: the end of set-up, ``on_start`` included) to the
moment round t's row is completed (after its evaluation). So it holds round t's plan, cohort, training, aggregation
and evaluation, and the recording of round t-1 (every observer's ``on_round``: tables, TensorBoard, checkpoint,
sync, reporting); the rounds of a run tile its loop without gaps. A row cannot hold the time spent writing itself
and what must follow it (its checkpoint, its upload, the report that reads it), so that time falls into the next
row, as it does in Flower's and pfl-research's per-round clocks; the last round's recording and the final export
are in summary.json's ``wall_s`` only.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fedsim.run_state import RunState
from fedsim.types import ClientResult, RoundPlan


@dataclass(frozen=True)
class RunStart:
    """What an observer learns once, before the first round this process runs.

    ``out_dir``: the run folder (node-local staging folder for a remote ``--out``); ``rounds``: the run's rounds
    (``federation.rounds``); ``first_round``: the first round this process runs (1, or the restored checkpoint's
    round + 1); ``state``: the driver's state before it (``initial_eval`` filled when already made);
    ``restored_round``: the round of the checkpoint the state was restored from (None: a fresh start)."""

    out_dir: Path
    rounds: int
    first_round: int
    state: RunState
    restored_round: int | None = None


@dataclass(frozen=True)
class RoundRecord:
    """What one round produced, as the observers see it (read-only).

    ``row``: the rounds.parquet row (every column of ``ROUND_SCHEMA``, ``wall_s`` included; a read-only mapping);
    ``client_rows``: its clients.parquet rows (one per cohort client, with its epsilon); ``results``: the clients'
    results; ``plan``: the round's plan (roles per tensor); ``evaluation``: its evaluation's metrics (empty when the
    round did not evaluate); ``similarity``: the analysis.similarity rows (None when the analysis is off);
    ``state``: the driver's state after the round (what a checkpoint of it saves); ``is_last``: the run's last
    round."""

    round: int
    row: Mapping[str, Any]
    client_rows: tuple[Mapping[str, Any], ...]
    results: tuple[ClientResult, ...]
    plan: RoundPlan
    evaluation: Mapping[str, float | int | None]
    similarity: tuple[Mapping[str, Any], ...] | None
    state: RunState
    is_last: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "row", types.MappingProxyType(dict(self.row)))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (a read-only mapping is not): the row goes as a dict
        values = (dict(self.row) if f.name == "row" else getattr(self, f.name) for f in dataclasses.fields(self))
        return (type(self), tuple(values))


@runtime_checkable
class RunObserver(Protocol):
    """An observer of the round loop (see the module doc for when each hook runs). Subclass it for the no-op
    defaults, or give any object the three methods."""

    def on_start(self, start: RunStart) -> None:
        """Once, before the first round this process runs."""

    def on_round(self, record: RoundRecord) -> None:
        """Once per round, in order, with everything the round produced."""

    def on_end(self, summary: Mapping[str, Any] | None) -> None:
        """Once, last: the summary of a finished run (summary.json written), or None when the run stops with an
        exception (then: release what ``on_start`` took, write nothing new)."""


class RowCallback(RunObserver):
    """``on_round`` as a plain function of the round's row: ``fn(row)`` with a fresh ``dict`` of the rounds.parquet
    row (what ``run_simulation(on_round=...)`` has always called)."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_round(self, record: RoundRecord) -> None:
        self.fn(dict(record.row))


class MirrorSync(RunObserver):
    """Copies the run folder to its remote ``--out`` (``sync``: :meth:`fedsim.storage.RunMirror.sync`) after
    set-up (config.yaml, the checkpoint before round 1), after each round (its tables, events and, when due, its
    checkpoint: the observers before this one in the driver's list) and after summary.json (which marks the run
    complete). Nothing is copied when the run stops with an exception."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync

    def on_start(self, start: RunStart) -> None:
        self.sync()

    def on_round(self, record: RoundRecord) -> None:
        self.sync()

    def on_end(self, summary: Mapping[str, Any] | None) -> None:
        if summary is not None:
            self.sync()


class ObserverList:
    """Calls a list of observers in order. ``end`` calls ``on_end`` of every observer whose ``on_start`` was called
    (also when that raised), even when one of them raises, then raises the first error."""

    def __init__(self, observers: Sequence[RunObserver]) -> None:
        self.observers = list(observers)
        self._started = 0

    def start(self, start: RunStart) -> None:
        for observer in self.observers:
            self._started += 1
            observer.on_start(start)

    def round(self, record: RoundRecord) -> None:
        for observer in self.observers:
            observer.on_round(record)

    def end(self, summary: Mapping[str, Any] | None) -> None:
        first: BaseException | None = None
        started, self._started = self.observers[: self._started], 0
        for observer in started:
            try:
                observer.on_end(summary)
            except BaseException as err:  # noqa: BLE001 - every observer ends; the first error is re-raised
                first = first or err
        if first is not None:
            raise first
