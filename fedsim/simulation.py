"""THE driver: one federated run, read top to bottom. No Ray import here (the backend owns it).

config -> backend starts (Ray, worker processes) -> data, base model + initial adapter (while the workers import)
-> backend completes (server, workers' models) -> per round: plan, cohort, train, aggregate, evaluate, then the
observers record it (:mod:`fedsim.metrics.observers`: tables, TensorBoard, progress, checkpoints, storage sync, the
caller's) -> run directory (config.yaml, rounds/clients.parquet, summary.json, adapter/, tb/), mirrored to a URI
when asked

Start-up overlaps: the backend's first half needs only the config (:func:`fedsim.runtime.start.start_backend`: on
Ray it starts the cluster and creates the worker actors, whose processes then import torch, transformers and PEFT),
so it comes first (the model libraries import in a thread meanwhile, as ray.init mostly waits); this process then
reads and tokenises the data and builds the base model (:func:`build_inputs`) while the workers import, and the
backend is completed with what that produced.
Module-level imports here are light (no PEFT / transformers): a script that imports this module reaches
:func:`run_simulation`, and so Ray's start, seconds earlier.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.config.load import dump_config
from fedsim.config.schema import Config
from fedsim.data.federated import FederatedData, build_federated_data, release_freed_memory
from fedsim.data.sources import load_source
from fedsim.errors import RunStopped
from fedsim.methods.base import get_method
from fedsim.metrics.console import RoundProgress
from fedsim.metrics.observers import MirrorSync, ObserverList, RoundRecord, RowCallback, RunObserver, RunStart
from fedsim.metrics.tables import MetricTables, round_row, summarise_eval, worker_busy_frac
from fedsim.metrics.tensorboard import RoundEvents
from fedsim.model.build import BaseBlueprint, blueprint_of, build_base_model, build_tokenizer
from fedsim.model.registry import resolve_model_config
from fedsim.privacy.mechanism import make_mechanism
from fedsim.privacy.tracker import PrivacyTracker
from fedsim.process_lifecycle import ImportAhead, freeze_gc_at_exit
from fedsim.run_state import RunState
from fedsim.seeding import numpy_rng
from fedsim.server.checkpoint import latest_checkpoint_dir, read_checkpoint
from fedsim.server.client_store import SPILL_DIR
from fedsim.server.cohort import sample_cohort
from fedsim.server.round_checkpoints import RoundCheckpoints
from fedsim.types import AdapterState, ClientResult, ClientTask, EvalTask

if TYPE_CHECKING:
    from peft import PeftModel

    from fedsim.runtime.backend import Backend
    from fedsim.storage import RunMirror


def eval_tasks(data: FederatedData, chunk: int, local_clients: int, seed: int) -> list[EvalTask]:
    """Global test set in fixed chunks (same batches whatever the worker count) + one task per client holdout for
    at most ``local_clients`` clients with a holdout (all of them if there are no more; else a seeded sample, the
    same at every evaluation), in client-id order."""
    test = data.test_indices
    tasks = [EvalTask("global", tuple(int(i) for i in test[s : s + chunk])) for s in range(0, len(test), chunk)]
    with_holdout = [cid for cid, hold in enumerate(data.client_holdout) if len(hold)]
    if len(with_holdout) > local_clients:
        pick = numpy_rng(seed, "local_eval").choice(len(with_holdout), size=local_clients, replace=False)
        with_holdout = sorted(with_holdout[i] for i in pick)
    for cid in with_holdout:
        tasks.append(EvalTask(f"client:{cid}", tuple(int(i) for i in data.client_holdout[cid]), client_id=cid))
    return tasks


#: what :func:`build_inputs` and the round loop import (seconds, mostly PEFT -> transformers' modelling code)
AHEAD_MODULES = ("fedsim.model.adapters", "torch.utils.tensorboard")


@dataclass(frozen=True)
class RunInputs:
    """What the run is built from, made by :func:`build_inputs`: the tokenised data, the calibrated privacy tracker,
    the base model's blueprint, the driver's adapted model (for the PEFT export) and the initial adapter state."""

    data: FederatedData
    privacy: PrivacyTracker
    blueprint: BaseBlueprint
    adapted: PeftModel
    initial_state: AdapterState


def build_inputs(cfg: Config) -> RunInputs:
    """Read, split and tokenise the data; calibrate the privacy; build the frozen base model (shipped to the workers
    as a blueprint) and the shared initial adapter. Imports PEFT (seconds). Raises DataError / ConfigError / UserError
    for bad input, before anything is trained or written."""
    from fedsim.model.adapters import attach_adapter, get_state

    # 1. Data: read, split, tokenise once.
    dataset = load_source(cfg.data, cfg.seed, cfg.task.kind)
    model_cfg = resolve_model_config(cfg.model, cfg.task.kind)  # a user model builder: the folder it writes
    tokenizer = build_tokenizer(model_cfg, dataset.texts)
    data = build_federated_data(cfg, dataset, tokenizer)
    del dataset  # the raw texts (population-sized) are not needed once tokenised
    privacy = PrivacyTracker(cfg, [int(n) for n in data.client_sizes])  # the privacy mechanism, calibrated once

    # 2. The frozen base model (built once, shipped to workers) and the shared initial adapter.
    base = build_base_model(model_cfg, data.num_labels, tokenizer, cfg.seed, cfg.task.kind)
    blueprint = blueprint_of(base)
    adapted = attach_adapter(base, cfg.lora, blueprint.family, cfg.seed, blueprint.task)
    return RunInputs(data, privacy, blueprint, adapted, get_state(adapted))


def initial_evaluation(backend: Backend, tasks: list[EvalTask]) -> dict[str, float | None]:
    """The untrained model (the initial global adapter, a no-op: LoRA's B starts at zero) on the global test
    chunks of ``tasks``, before round 1: ``eval_loss``, ``eval_accuracy`` (exact match for causal_lm) and
    ``eval_perplexity`` (causal_lm; None otherwise). Kept in the RunState (so in every checkpoint)."""
    ev = summarise_eval(backend.evaluate([e for e in tasks if e.client_id is None], 1))  # round 1's start
    return {k: ev.get(k) for k in ("eval_loss", "eval_accuracy", "eval_perplexity")}


def run_simulation(
    cfg: Config,
    out_dir: Path,
    label: str = "run",
    progress: bool = True,
    inspect: Callable[[Backend], None] | None = None,
    resume: bool = False,
    mirror: RunMirror | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    observers: Sequence[RunObserver] = (),
) -> dict[str, Any]:
    """Run one simulation into ``out_dir``; returns the summary dict (also written to summary.json).

    Set up, loop over the rounds (plan, train, aggregate, evaluate, notify the observers), finish. What records or
    reports a round is an observer (:mod:`fedsim.metrics.observers`, which also defines a round's ``wall_s``),
    called in this order: the tables, TensorBoard, the progress bar (``progress``), the checkpoints, the storage
    sync (``mirror``), then ``observers`` and last ``on_round``.

    ``resume``: continue the run in ``out_dir`` from its newest checkpoint (``cfg`` must be its config.yaml);
    the result equals an uninterrupted run's. ``inspect`` (for tests and tools) is called with the live backend
    after the last round. ``mirror`` (a remote ``--out``): ``out_dir`` is its node-local staging folder, and
    ``mirror.sync()`` copies it to the URI after set-up, after each round (tables and checkpoint) and after
    summary.json. ``observers``: more :class:`~fedsim.metrics.observers.RunObserver` objects. ``on_round`` (a
    search trial's report to Ray Tune) is called with each round's rounds.parquet row (a fresh dict) once its
    tables and checkpoint are written and mirrored. An exception raised by an observer stops the run like any
    other error (the backend shuts down, every started observer's ``on_end(None)`` runs, the exception propagates).

    Raises UserError (ConfigError / DataError; a ``runtime.address`` where no Ray cluster answers) for bad input
    before any training or any file is written, and
    RunStopped when more than ``runtime.max_failed_fraction`` of a cohort fails (resumable).
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    where = mirror.uri if mirror is not None else str(out_dir)  # where the outputs end up
    fed, rt = cfg.federation, cfg.runtime
    run = start_run(cfg, out_dir)  # 1-3. backend, data, base model, privacy
    backend, privacy = run.backend, run.privacy

    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        dump_config(cfg, out_dir / "config.yaml")
    caveats = get_method(cfg.method.name).privacy_caveats(cfg)  # opt-ins: uploads depend on more than DP-SGD output
    for caveat in caveats:
        print(f"WARNING (privacy): {caveat}", file=sys.stderr)

    tables = MetricTables(out_dir)
    watchers = ObserverList([])
    try:
        # 3b. Continue a stopped run from its newest checkpoint, or start: the checkpoint before round 1 (written by
        # RoundCheckpoints.on_start) carries the initial evaluation. checkpoint_every 0: no checkpoint before
        # round 1 (a resume without one starts over), and the initial evaluation runs once round 1 has trained,
        # before its aggregation (same global state and plan, so the same result): the first clients train sooner.
        found = latest_checkpoint_dir(out_dir) if resume else None
        restored_round = None
        if found is not None:
            tables, state = restore(backend, privacy, out_dir, found)
            restored_round = state.round
        else:
            state = RunState()
            if rt.checkpoint_every:
                state = dataclasses.replace(state, initial_eval=initial_evaluation(backend, run.tasks_eval))
        resumed_from = state.round if resume else None
        watchers = ObserverList(
            [
                tables,  # rounds.parquet first: a checkpoint never covers a round the tables lack
                RoundEvents(out_dir),  # tb/: TensorBoard scalars of rounds.parquet
                RoundProgress(fed.rounds, f"{label} · {cfg.method.name}", enabled=progress),
                RoundCheckpoints(out_dir, backend.checkpoint_state, rt.checkpoint_every, fed.rounds),
                *([MirrorSync(mirror.sync)] if mirror is not None else []),
                *observers,
                *([RowCallback(on_round)] if on_round is not None else []),
            ]
        )
        watchers.start(RunStart(out_dir, fed.rounds, state.round + 1, state, restored_round))

        # 4-6. The rounds: plan, train, aggregate, evaluate (play_round), then notify the observers.
        clock = RoundClock()  # a round's wall_s: from the previous row's completion to its own
        for t in range(state.round + 1, fed.rounds + 1):
            record = play_round(run, t, state, clock, where)
            state = record.state
            watchers.round(record)

        # 7. Final adapter in PEFT format.
        from fedsim.model.export import export_adapter

        export_adapter(run.adapted, backend.global_state(), out_dir / "adapter")
        if inspect is not None:
            inspect(backend)
    except BaseException:
        release_backend(backend, out_dir)
        try:
            watchers.end(None)
        except Exception as err:  # the run's own error is the one to report
            print(f"WARNING: an observer failed to end after the run stopped: {err!r}", file=sys.stderr)
        raise
    release_backend(backend, out_dir)

    # 8. The summary, then the observers' end (the storage sync uploads summary.json last: it marks the run complete).
    summary = run_summary(cfg, label, state, privacy.summary(), caveats, tables, t_start, resumed_from, where)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    watchers.end(summary)
    return summary


@dataclass(frozen=True)
class StartedRun:
    """What :func:`start_run` made: the config, the run folder, the completed backend, the calibrated privacy
    tracker, the driver's adapted model (for the PEFT export) and the evaluation tasks."""

    cfg: Config
    out_dir: Path
    backend: Backend
    privacy: PrivacyTracker
    adapted: PeftModel
    tasks_eval: list[EvalTask]


def start_run(cfg: Config, out_dir: Path) -> StartedRun:
    """Steps 1-3: the backend starts with what needs only the config (on Ray: Ray itself and the worker actors,
    which return at once and import torch / transformers / PEFT in their own processes); meanwhile this process
    builds the data and base model (:func:`build_inputs`); then the backend completes with them. Input errors
    (UserError; a ``runtime.address`` where no Ray cluster answers) surface before anything is trained or written
    (a half-started backend is shut down first)."""
    get_method(cfg.method.name)  # an unknown method fails before anything starts
    if cfg.runtime.backend == "ray":  # no cluster at runtime.address, or one that can never hold the workers:
        from fedsim.runtime.cluster import check as check_cluster  # fails here, before any work

        check_cluster(cfg.runtime.address, cfg.runtime)
    from fedsim.runtime.backend import RunSetup
    from fedsim.runtime.start import start_backend

    freeze_gc_at_exit()  # the interpreter's exit skips its last full collection (see fedsim.process_lifecycle)
    # on Ray, the model libraries import in a thread while ray.init waits for the processes it spawns
    ahead = ImportAhead(AHEAD_MODULES) if cfg.runtime.backend == "ray" else None
    starting = start_backend(cfg, make_mechanism(cfg), out_dir)  # the mechanism needs only the config
    try:
        if ahead is not None:
            ahead.join()
        inputs = build_inputs(cfg)
    except BaseException:
        starting.shutdown()
        raise
    rt = cfg.runtime
    tasks_eval = eval_tasks(inputs.data, rt.eval_batch_size, cfg.federation.local_eval_clients, cfg.seed)
    backend = starting.complete(
        RunSetup(cfg, inputs.blueprint, inputs.data, inputs.initial_state, inputs.privacy.mechanism, run_dir=out_dir)
    )
    started = StartedRun(cfg, out_dir, backend, inputs.privacy, inputs.adapted, tasks_eval)
    # the backend holds what it needs of the data (on Ray: the object store's copy, which the workers map): this
    # process's own copy of the token table (N x L x 5 bytes: 128 MB at 800,000 examples) goes now
    del inputs
    release_freed_memory()
    return started


class RoundClock:
    """The rounds' clock: :meth:`lap` gives the seconds since the previous lap (or since the clock was made) and
    starts the next. The driver laps when a round's row is completed, so the rounds tile the loop (see
    :mod:`fedsim.metrics.observers` for what a round's ``wall_s`` holds)."""

    def __init__(self) -> None:
        self._since = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self._since = now - self._since, now
        return seconds


def play_round(run: StartedRun, t: int, state: RunState, clock: RoundClock, where: str) -> RoundRecord:
    """Round ``t`` from the driver's ``state`` after round t-1: plan, cohort, local training, aggregation,
    evaluation (every ``eval_every`` rounds and always the last; local: the clients that have trained); returns
    its record (its row complete: ``wall_s`` is ``clock.lap()`` once the round's metrics are in; the state after
    it). Raises RunStopped when too many clients failed (naming how to resume ``where``)."""
    cfg, backend, privacy = run.cfg, run.backend, run.privacy
    fed = cfg.federation
    plan = backend.plan(t)
    cohort = sample_cohort(cfg.seed, t, fed.clients, fed.clients_per_round)
    t_train = time.perf_counter()
    results = backend.train([ClientTask(t, cid, plan, **privacy.task_fields(cid)) for cid in cohort])
    t_train = time.perf_counter() - t_train
    check_failures(t, results, cfg.runtime.max_failed_fraction, run.out_dir, where)
    if not state.initial_eval:  # checkpoint_every 0 (see run_simulation); the global state is still round 1's
        state = dataclasses.replace(state, initial_eval=initial_evaluation(backend, run.tasks_eval))

    info = backend.aggregate(t)
    ev: dict[str, float | int | None] = {}
    if t % fed.eval_every == 0 or t == fed.rounds:
        trained = state.trained_with(results)
        todo = [e for e in run.tasks_eval if e.client_id is None or e.client_id in trained]
        ev = summarise_eval(backend.evaluate(todo, t))

    epsilon = privacy.observe(t, results)
    state = state.after_round(t, results, ev, privacy.state())
    busy = worker_busy_frac(results, backend.worker_count, t_train)
    row = round_row(t, cfg.method.name, results, ev, epsilon, clock.lap(), busy)
    return RoundRecord(
        round=t,
        row=row,
        client_rows=tuple({**r.__dict__, "epsilon": privacy.client_epsilon(r)} for r in results),
        results=tuple(results),
        plan=plan,
        evaluation=ev,
        similarity=tuple(info.similarity) if cfg.analysis.similarity else None,
        state=state,
        is_last=t == fed.rounds,
    )


def restore(backend: Backend, privacy: PrivacyTracker, out_dir: Path, found: Path) -> tuple[MetricTables, RunState]:
    """Restore the stopped run in ``out_dir`` from its checkpoint folder ``found``: the backend's server and client
    store, the privacy tracker, the tables (rounds up to the checkpoint's) and the driver's state."""
    ckpt = read_checkpoint(found)
    backend.restore(ckpt)
    tables = MetricTables.resume(out_dir, ckpt.round)
    trained = (r["client_id"] for r in tables.clients if r["status"] == "ok")
    state = dataclasses.replace(RunState.from_json(ckpt.driver, trained), round=ckpt.round)
    privacy.load_state(state.privacy)
    return tables, state


def check_failures(
    round: int, results: Sequence[ClientResult], max_failed_fraction: float, out_dir: Path, where: str
) -> None:
    """Raise RunStopped when more than ``max_failed_fraction`` of the round's clients failed (naming the first
    error and the checkpoint a resume of ``where`` continues from)."""
    failed = [r for r in results if r.status == "failed"]
    if len(failed) > max_failed_fraction * len(results):
        newest = latest_checkpoint_dir(out_dir)
        raise RunStopped(
            f"round {round}: {len(failed)} of {len(results)} clients failed (more than "
            f"runtime.max_failed_fraction = {max_failed_fraction}); first error: "
            f"{(failed[0].error or '').strip().splitlines()[0] if failed[0].error else '?'}. Fix the "
            f"cause, then `fedsim resume {where}` continues from {newest.name if newest else 'the start'}"
        )


def release_backend(backend: Backend, out_dir: Path) -> None:
    """Shut the backend down and remove the spilled clients (the checkpoints hold their own links)."""
    backend.shutdown()
    shutil.rmtree(out_dir / SPILL_DIR, ignore_errors=True)


def run_summary(
    cfg: Config,
    label: str,
    state: RunState,
    privacy_summary: dict[str, Any],
    caveats: list[str],
    tables: MetricTables,
    t_start: float,
    resumed_from: int | None,
    where: str,
) -> dict[str, Any]:
    """summary.json of a finished run (``wall_s``: this process's whole run, set-up and the final export
    included)."""
    fed = cfg.federation
    return {
        "label": label,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "data": cfg.data.source,
        "rounds": fed.rounds,
        "clients": fed.clients,
        "clients_per_round": fed.clients_per_round,
        "task": cfg.task.kind,
        "initial_eval_accuracy": state.initial_eval.get("eval_accuracy"),
        "initial_eval_loss": state.initial_eval.get("eval_loss"),
        "initial_eval_perplexity": state.initial_eval.get("eval_perplexity"),
        "final_eval_accuracy": state.eval.get("eval_accuracy"),
        "final_eval_loss": state.eval.get("eval_loss"),
        "final_eval_perplexity": state.eval.get("eval_perplexity"),
        "best_eval_accuracy": state.best_accuracy,
        "final_personal_accuracy": state.eval.get("personal_accuracy"),
        "final_personal_clients": state.eval.get("personal_clients"),
        "method_capabilities": get_method(cfg.method.name).capabilities.as_dict(),
        **privacy_summary,
        "privacy_caveats": caveats,
        "epsilon_covers_uploads": not caveats,
        "failed_client_rounds": sum(r["failed_clients"] for r in tables.rounds),
        "bytes_up": state.bytes_up,
        "bytes_down": state.bytes_down,
        "wall_s": time.perf_counter() - t_start,
        "resumed_from_round": resumed_from,
        "out_dir": where,
    }
