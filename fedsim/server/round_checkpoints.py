"""When a run writes its checkpoints: the round loop's checkpoint observer (see :mod:`fedsim.metrics.observers`).

Checkpoint ``round-000000`` before round 1 (a fresh start with ``runtime.checkpoint_every`` > 0: it carries the
initial evaluation), then one after every ``checkpoint_every``-th round and always one after the last round
(``checkpoint_every`` 0: that one only). It comes after the tables observer in the driver's list, so a checkpoint
never covers a round rounds.parquet lacks, and before the storage sync and the caller's observers, so a round a
caller (a Tune trial's report) sees is saved and mirrored. The layout and the atomic write are
:mod:`fedsim.server.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from fedsim.metrics.observers import RoundRecord, RunObserver, RunStart
from fedsim.run_state import RunState
from fedsim.server.checkpoint import Checkpoint, write_checkpoint


class RoundCheckpoints(RunObserver):
    """Writes the checkpoints of a run into ``run_dir/checkpoints`` (see the module doc).

    ``snapshot``: the server's and the client store's state now (the backend's ``checkpoint_state``; its ``round``
    and ``driver`` are replaced by the round saved and the driver's :class:`RunState`); ``every``:
    ``runtime.checkpoint_every``; ``rounds``: ``federation.rounds``."""

    def __init__(self, run_dir: Path, snapshot: Callable[[], Checkpoint], every: int, rounds: int) -> None:
        self.run_dir, self.snapshot, self.every, self.rounds = Path(run_dir), snapshot, int(every), int(rounds)

    def due(self, round: int) -> bool:
        """Whether the state after ``round`` is checkpointed (0: before round 1)."""
        if round == 0:
            return self.every > 0
        return round == self.rounds or (self.every > 0 and round % self.every == 0)

    def on_start(self, start: RunStart) -> None:
        if start.restored_round is None and start.state.round == 0 and self.due(0):
            self.write(start.state)

    def on_round(self, record: RoundRecord) -> None:
        if self.due(record.round):
            self.write(record.state)

    def write(self, state: RunState) -> Path:
        """Checkpoint the run after ``state.round`` (everything a resume needs; RNG draws are functions of
        (seed, round, client)); returns its folder."""
        ckpt = dataclasses.replace(self.snapshot(), round=state.round, driver=state.to_json())
        return write_checkpoint(self.run_dir, ckpt)
