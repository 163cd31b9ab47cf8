"""The contract between a sweep's ``search:`` (:mod:`fedsim.sweep`) and the Ray Tune driver that runs it
(:mod:`fedsim.runtime.tune_search`). No Ray import: the sweep package imports this module to build what it hands over.

``fedsim.runtime`` sits below ``fedsim.sweep`` in the layers, so the Tune driver never imports the sweep package:
the sweep gives it a :class:`SearchTrials` (plain data, pickled with the Tune experiment and sent to the trials)
that runs one trial, replays an ended trial's reported values and records the trials; the driver owns everything
Tune-specific (the Tuner and its restore, searchers, ASHA, resources, callbacks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedsim.config.schema import Config


@dataclass(frozen=True)
class TrialOutcome:
    """What the search's driver knows of one trial: its id, its place in the order trials were created, the sampled
    values, whether it ended (complete, or stopped early by the scheduler, or failed) and, when it failed, the error
    text."""

    trial_id: str
    index: int
    params: Mapping[str, Any]
    ended: bool
    error: str | None = None


class Domain(Protocol):
    """One key's distribution: ``kind`` (loguniform, uniform, quniform, randint, choice) and its arguments
    (``randint``'s upper bound included; the choices for ``choice``)."""

    @property
    def kind(self) -> str: ...

    @property
    def args(self) -> tuple[Any, ...]: ...


class SearchPlan(Protocol):
    """The settings of a search the driver reads (:class:`fedsim.sweep.search.SearchSpec` is one). ``config``: a
    trial's config before its sampled values (its runtime keys size the trials; its rounds are ASHA's ``max_t``)."""

    @property
    def algorithm(self) -> str: ...  # "random" or "optuna"

    @property
    def metric(self) -> str: ...

    @property
    def mode(self) -> str: ...  # "max" or "min"

    @property
    def samples(self) -> int: ...

    @property
    def space(self) -> Mapping[str, Domain]: ...

    @property
    def scheduler(self) -> str: ...  # "none" or "asha"

    @property
    def seed(self) -> int: ...

    @property
    def grace_period(self) -> int: ...

    @property
    def reduction_factor(self) -> float: ...

    @property
    def config(self) -> Config: ...


#: ``report(value, round)``: the search metric after an evaluated round (Tune may end the call with SystemExit)
Report = Callable[[float, int], None]


class SearchTrials(Protocol):
    """The sweep's side of a Tune search. Plain data (it is pickled with the experiment and into each trial)."""

    @property
    def plan(self) -> SearchPlan: ...

    def run(self, params: Mapping[str, Any], trial_id: str, report: Report) -> None:
        """Run the trial ``trial_id`` with the sampled ``params`` from the start (into its own folder), calling
        ``report`` after each evaluated round but the last and, once the run's results are written, for the last."""
        ...

    def reported(self, trial_id: str) -> Iterable[tuple[int, float]]:
        """``(round, value)`` for each value the ended trial ``trial_id`` reported before its last round, read back
        from its folder (a restored search rebuilds ASHA's rungs from them)."""
        ...

    def record(self, trials: Sequence[TrialOutcome], ended: Mapping[str, str | None]) -> None:
        """Write the search's table of ``trials``; ``ended``: the trials that just ended -> their error (None when
        they did not fail)."""
        ...
