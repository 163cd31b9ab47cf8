"""Run a sweep's ``search:`` into a folder and keep its ``sweep.parquet`` current; rerunning continues it.

Layout of ``--out``::

    search.json      the search (its settings) and its trials' shared config: a rerun whose sweep file now gives
                     another search is refused before anything runs (choose another --out)
    tune/            the Ray Tune experiment; its saved state is what a rerun restores (Tuner.restore)
    cells/<trial>/   each trial's run folder (a stopped trial's holds the rounds it ran and no summary.json)
    sweep.parquet    one row per trial, in trial order (see :func:`trial_row`); ``fedsim report`` reads it
    tb/<trial>/      TensorBoard HParams of each ended trial (its sampled values and results)

Once a continued search ends, the cells/ and tb/ folders of trials its restored Tune state never knew (started
after the last save before a kill) are removed (:func:`drop_lost_trials`).

The Tune-specific part is :mod:`fedsim.runtime.tune_search`, which calls back :class:`SweepTrials` (through
:class:`fedsim.runtime.tune_protocol.SearchTrials`) to run, replay and record trials; this module imports no Ray.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from fedsim.errors import UserError
from fedsim.metrics.observers import RoundRecord, RunObserver
from fedsim.report.records import COMPLETE, read_run_table, run_record
from fedsim.runtime.tune_protocol import Report, TrialOutcome
from fedsim.storage import Location, local_location
from fedsim.sweep.runner import CELLS_DIR, HPARAMS_DIR, SWEEP_FILE, write_hparams, write_table
from fedsim.sweep.search import MetricTracker, SearchSpec, same_base, shared_config, trial_config
from fedsim.sweep.spec import SweepSpec

SEARCH_FILE = "search.json"
STOPPED, FAILED, UNFINISHED = "stopped", "failed", "unfinished"


def _round_rows(run_dir: Path) -> list[dict[str, Any]]:
    table = read_run_table(run_dir, "rounds") or {}
    names = list(table)
    return [dict(zip(names, values, strict=True)) for values in zip(*table.values(), strict=True)] if names else []


def _partial_results(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A stopped run's results from the rounds it ran (what summary.json gives a complete one)."""
    evaluated = [r for r in rounds if r.get("eval_accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    accs = [r["eval_accuracy"] for r in evaluated]

    def total(col: str) -> Any:
        vals = [r[col] for r in rounds if r.get(col) is not None]
        return sum(vals) if vals else None

    return {
        "final_accuracy": last.get("eval_accuracy"),
        "best_accuracy": max(accs) if accs else None,
        "final_loss": last.get("eval_loss"),
        "final_local_accuracy": last.get("personal_accuracy"),
        "epsilon_spent": rounds[-1].get("epsilon_max") if rounds else None,
        "wall_s": total("wall_s"),
        "bytes_up": total("bytes_up"),
        "bytes_down": total("bytes_down"),
    }


def trial_row(out: Path, spec: SearchSpec, trial: TrialOutcome) -> dict[str, Any]:
    """One trial's row of sweep.parquet: :func:`~fedsim.report.records.run_record`'s columns (for a stopped trial
    its results so far, from rounds.parquet), ``status`` (complete | stopped: by the scheduler | failed |
    unfinished: not ended yet), ``stopped_at_round`` (the last round a stopped trial ran), ``rounds_done``,
    ``search_metric`` and ``search_value`` (the trial's value of it), ``space:<key>`` (its sampled values),
    ``error``."""
    run_dir = Path(out) / CELLS_DIR / trial.trial_id
    if (run_dir / "config.yaml").is_file():
        row = run_record(run_dir, base=Path(out))
    else:
        row = {"cell": trial.trial_id, "run_dir": f"{CELLS_DIR}/{trial.trial_id}", "status": FAILED}
    rounds = _round_rows(run_dir)
    if row["status"] == COMPLETE:
        status = COMPLETE
    else:
        status = FAILED if trial.error is not None else STOPPED if trial.ended else UNFINISHED
        if rounds:
            row.update(_partial_results(rounds))
    tracker = MetricTracker(spec.metric, spec.mode)
    for r in rounds:
        tracker.update(r)
    row.update(
        cell=trial.trial_id,
        status=status,
        error=trial.error if status == FAILED else None,
        stopped_at_round=rounds[-1]["round"] if status == STOPPED and rounds else None,
        rounds_done=len(rounds),
        search_metric=spec.metric,
        search_value=tracker.value,
    )
    for key in spec.space:
        value = trial.params.get(key)
        row[f"space:{key}"] = value if value is None or isinstance(value, (bool, int, float)) else str(value)
    return row


def describe_trial(row: dict[str, Any]) -> str:
    """The line printed when a trial ends: its status, where it stopped, its metric or its error."""
    value = row.get("search_value")
    metric = f"{row['search_metric']} {value:.4g}" if isinstance(value, float) else f"no {row['search_metric']}"
    if row["status"] == STOPPED:
        return f"trial {row['cell']} stopped early after round {row['stopped_at_round']}: {metric}"
    if row["status"] == FAILED:
        lines = str(row.get("error") or "").strip().splitlines()
        return f"trial {row['cell']} FAILED: {lines[0] if lines else 'no error text'}"
    return f"trial {row['cell']} {row['status']}: {metric}"


def publish(
    out: Path, spec: SearchSpec, trials: Sequence[TrialOutcome], ended: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Write sweep.parquet (one row per trial, in trial order) and the HParams of the trials in ``ended`` (those
    that just ended); return the rows."""
    rows = [trial_row(out, spec, t) for t in sorted(trials, key=lambda t: (t.index, t.trial_id))]
    write_table(out, rows)
    for row in rows:
        if row["cell"] in ended and row["status"] != UNFINISHED:
            write_hparams(out, row)
    return rows


@dataclass(frozen=True)
class SweepTrials:
    """The trials of the search ``spec`` run into ``<out>/cells/<trial id>/`` (``out``: the sweep's local folder,
    as a string: plain data, pickled with the Tune experiment)."""

    spec: SearchSpec
    out: str

    @property
    def plan(self) -> SearchSpec:
        return self.spec

    @property
    def cells(self) -> Path:
        return Path(self.out) / CELLS_DIR

    def run(self, params: Mapping[str, Any], trial_id: str, report: Report) -> None:
        """One fedsim run with the sampled ``params`` into ``cells/<trial id>`` (a restarted trial starts over),
        reporting the metric after each evaluated round but the last and, last, after summary.json is written (so
        a trial that reaches the last round is complete, not cut short). Raises ConfigError for a bad sample."""
        from fedsim.simulation import run_simulation

        run_dir = self.cells / trial_id
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = trial_config(self.spec, params)
        reporter = TrialReport(MetricTracker(self.spec.metric, self.spec.mode), report)
        run_simulation(cfg, run_dir, label=trial_id, progress=False, observers=[reporter])

    def reported(self, trial_id: str) -> Iterator[tuple[int, float]]:
        """``(round, value)`` of each evaluated round before the last, from the trial's rounds.parquet: the values it
        reported while it ran."""
        tracker = MetricTracker(self.spec.metric, self.spec.mode)
        table = read_run_table(self.cells / trial_id, "rounds") or {}
        last = self.spec.config.federation.rounds
        for values in zip(*table.values(), strict=True):
            row = dict(zip(table, values, strict=True))
            value = tracker.update(row)
            if value is not None and row["round"] < last:
                yield row["round"], value

    def record(self, trials: Sequence[TrialOutcome], ended: Mapping[str, str | None]) -> None:
        """Write sweep.parquet (and the HParams of the trials in ``ended``); print a line for each ended trial."""
        for row in publish(Path(self.out), self.spec, trials, ended=set(ended)):
            if row["cell"] in ended:
                print(describe_trial(row), flush=True)


class TrialReport(RunObserver):
    """The round observer of a search trial: reports the search metric after each evaluated round but the last (its
    tables, checkpoint and sync written: the observers before it), and the last round's value once summary.json is
    written (``on_end``), so a trial that reaches the last round is complete when the scheduler sees it."""

    def __init__(self, tracker: MetricTracker, report: Report) -> None:
        self.tracker, self.report = tracker, report

    def on_round(self, record: RoundRecord) -> None:
        value = self.tracker.update(dict(record.row))
        if value is not None and not record.is_last:
            self.report(value, record.row["round"])

    def on_end(self, summary: Mapping[str, Any] | None) -> None:
        if summary is not None and self.tracker.value is not None:
            self.report(self.tracker.value, summary["rounds"])


def check_same_search(out: Path, spec: SearchSpec) -> None:
    """Raise UserError, before anything runs, when ``out`` holds another search (search.json differs from
    ``spec``, compared as :meth:`SearchSpec.fingerprint` and config) or a grid sweep."""
    path = Path(out) / SEARCH_FILE
    if not path.is_file():
        if (Path(out) / SWEEP_FILE).is_file():
            raise UserError(f"{out}: holds a grid sweep, not a search; choose another --out for the search")
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("search") != spec.fingerprint() or not same_base(saved.get("config") or {}, spec):
        raise UserError(
            f"{out}: holds a search with other settings or another config than the sweep file now gives; use "
            "another --out for the changed search, or delete that folder"
        )


def write_search_file(out: Path, spec: SearchSpec) -> None:
    """``out/search.json``: the search's settings and its trials' shared config (what :func:`check_same_search`
    compares a rerun against); kept when it exists."""
    path = Path(out) / SEARCH_FILE
    if not path.is_file():
        path.write_text(json.dumps({"search": spec.fingerprint(), "config": shared_config(spec)}, indent=1) + "\n")


def trial_folders(out: Path) -> set[str]:
    """The trial ids that have a run folder (``out/cells/<id>``) or an HParams record (``out/tb/<id>``)."""
    names: set[str] = set()
    for sub in (CELLS_DIR, HPARAMS_DIR):
        folder = Path(out) / sub
        if folder.is_dir():
            names |= {p.name for p in folder.iterdir() if p.is_dir()}
    return names


def drop_lost_trials(out: Path, rows: Sequence[dict[str, Any]], before: Collection[str], samples: int) -> list[str]:
    """Once a search has ended (``rows``, its sweep.parquet, lists ``samples`` trials and none ``unfinished``),
    delete the run folders and HParams records of the trials among ``before`` (those with folders when this session
    started) that ``rows`` does not list, and return their ids. Such a trial started after the last saved Tune
    state before a kill (and may even have ended): the restored experiment never knew it and its searcher suggested
    another trial instead, so nothing can continue or report it (a trial the state did know is run again from the
    start, in the same folder emptied). Deletes nothing while the search has not ended (an interrupted session, or
    no table yet)."""
    if len(rows) < samples or any(r["status"] == UNFINISHED for r in rows):
        return []
    listed = {r["cell"] for r in rows}
    lost = sorted(c for c in before if c not in listed)
    for cell in lost:
        for sub in (CELLS_DIR, HPARAMS_DIR):
            shutil.rmtree(Path(out) / sub / cell, ignore_errors=True)
    return lost


def _summary(name: str, spec: SearchSpec, rows: Sequence[dict[str, Any]], out: Path) -> list[str]:
    count = {s: sum(r["status"] == s for r in rows) for s in (COMPLETE, STOPPED, FAILED, UNFINISHED)}
    lines = [
        f"search {name}: {len(rows)} trials: {count[COMPLETE]} complete, {count[STOPPED]} stopped early, "
        f"{count[FAILED]} failed, {count[UNFINISHED]} unfinished -> {out / SWEEP_FILE}"
    ]
    done = [r for r in rows if r["status"] == COMPLETE and r["search_value"] is not None]
    if done:
        best = (max if spec.mode == "max" else min)(done, key=lambda r: r["search_value"])
        values = ", ".join(f"{k.removeprefix('space:')}={v}" for k, v in best.items() if k.startswith("space:"))
        lines.append(f"best: {best['cell']} {spec.metric} {best['search_value']:.4g} ({values})")
    if count[UNFINISHED]:
        lines.append("interrupted: rerun the same command (same --out) to continue the search")
    return lines


def run_search(
    sweep: SweepSpec,
    out: Path | Location,
    *,
    max_concurrent: int | str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run (or continue) the search of ``sweep`` into the local folder ``out``; return the rows of sweep.parquet.

    ``max_concurrent`` (default: ``search.max_concurrent``) caps the trials at once on a new search (a continued
    one keeps its own). Raises UserError for a URI ``out``, an ``out`` that holds another search or a grid
    sweep, or a Ray cluster address where no cluster answers (nothing runs)."""
    spec = sweep.search
    assert spec is not None, "run_search needs a sweep with a search: section"
    loc = out if isinstance(out, Location) else local_location(out)
    if loc.local is None:
        raise UserError(f"--out {loc}: a search writes to a local folder (its Tune experiment state); give a path")
    folder = loc.local
    check_same_search(folder, spec)
    folder.mkdir(parents=True, exist_ok=True)
    write_search_file(folder, spec)
    log(
        f"search {sweep.name}: {spec.algorithm}, {spec.samples} trials, {spec.metric} ({spec.mode}), scheduler "
        f"{spec.scheduler} -> {folder}"
    )
    from fedsim.runtime.tune_search import run_tune

    before = trial_folders(folder)
    concurrent = spec.max_concurrent if max_concurrent is None else max_concurrent
    run_tune(SweepTrials(spec, str(folder)), folder, concurrent, log)
    table = folder / SWEEP_FILE
    rows = pq.read_table(table).to_pylist() if table.is_file() else []
    lost = drop_lost_trials(folder, rows, before, spec.samples)
    if lost:
        log(
            f"search: removed the folders of {len(lost)} trial(s) the continued Tune experiment never recorded (they "
            f"started after its last saved state before the search was stopped): {', '.join(lost)}"
        )
    for line in _summary(sweep.name, spec, rows, folder):
        log(line)
    return rows
