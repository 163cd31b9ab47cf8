"""Drive a sweep's ``search:`` with Ray Tune (the only Tune-specific part of searches). The sweep's side (what a trial
runs, what an ended trial reported, how trials are recorded) comes in as a
:class:`~fedsim.runtime.tune_protocol.SearchTrials`; this module never imports :mod:`fedsim.sweep` (a layer above).

One Tune trial = one fedsim run, in-process in the trial's actor (``runtime.backend: local``, seeds fixed by the
config), into ``<out>/cells/<trial id>/`` (:meth:`SearchTrials.run`). After every evaluated round but the last the
trial reports the search metric and ``round`` with ``tune.report``, so ASHA (``time_attr="round"``, ``max_t`` =
the rounds) can stop it: Tune then ends the report call with ``SystemExit`` and the run folder keeps its rounds so
far (tables and checkpoints are written before the report). The last round is reported after the run's
summary.json is written, so a trial that reaches ``max_t`` is complete, not cut short.

The experiment lives in ``<out>/tune/``: when it holds a Tune experiment (``Tuner.can_restore``) the search is
restored (``Tuner.restore``; Tune writes it through :mod:`fedsim.runtime.tune_storage`, so a kill leaves no
half-written state file): trials that ended (complete, stopped) are kept, trials that were running or pending
and trials that failed are run again from the start, the searcher continues from its saved state and ASHA's rungs
are rebuilt from the ended trials' reported values (:class:`ResumableASHA`). The experiment state is saved every
:data:`STATE_PERIOD_S` seconds at most, so a trial that ended within that time before a kill may run again.
:class:`RecordTrials` (a Tune callback, pickled with the experiment) records the trials through
:meth:`SearchTrials.record` whenever a trial ends and at the end.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from fedsim.config.schema import Config
from fedsim.runtime.cluster import connect, disconnect
from fedsim.runtime.ray_compat import asha_bracket, asha_rung_values
from fedsim.runtime.sweep_pool import cell_cpus
from fedsim.runtime.tune_protocol import Domain, SearchPlan, SearchTrials, TrialOutcome
from fedsim.runtime.tune_storage import drop_partial_writes, replacing_local_filesystem

EXPERIMENT = "tune"  # <out>/tune: the Tune experiment
#: seconds between saves of the experiment state (Tune's default adapts upwards from 10 s)
STATE_PERIOD_S = 2


def tune_domain(dist: Domain) -> Any:
    """The Tune search-space domain of a fedsim distribution (``randint``'s upper bound is included in fedsim's
    syntax, excluded in Tune's)."""
    a = dist.args
    if dist.kind == "loguniform":
        return tune.loguniform(a[0], a[1])
    if dist.kind == "uniform":
        return tune.uniform(a[0], a[1])
    if dist.kind == "quniform":
        return tune.quniform(a[0], a[1], a[2])
    if dist.kind == "randint":
        return tune.randint(a[0], a[1] + 1)
    return tune.choice(list(a))


def trial_resources(cfg: Config, node_ip: str, cluster_gpus: float) -> dict[str, float]:
    """What one trial holds: its run's CPUs (workers x cpus_per_worker) and GPUs (workers x gpus_per_worker; auto:
    one GPU when the cluster has any), and a sliver of the driver's node (``node:<ip>``): trials write their run
    folders on the node where the search's sweep.parquet is kept."""
    rt = cfg.runtime
    workers = 1 if rt.workers == "auto" else rt.workers
    gpus = (1.0 if cluster_gpus else 0.0) if rt.gpus_per_worker == "auto" else workers * rt.gpus_per_worker
    return {"cpu": cell_cpus(cfg), "gpu": float(gpus), f"node:{node_ip}": 0.001}


def run_trial(params: dict[str, Any], trials: SearchTrials, cwd: str) -> None:
    """The Tune trainable: :meth:`SearchTrials.run` of this trial, in ``cwd``, each value it reports sent to Tune as
    ``{metric: value, "round": round}``."""
    os.chdir(cwd)  # relative paths in the config mean what they mean for the sweep command, not Tune's trial dir
    metric = trials.plan.metric

    def report(value: float, round: int) -> None:
        tune.report({metric: value, "round": round})

    trials.run(params, tune.get_context().get_trial_id(), report)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_text(trial: Trial) -> str:
    """A failed trial's error as a grid cell's reads: the exception line first, then the end of the traceback Tune
    recorded (its driver-side copy, else the one in storage), without terminal colours."""
    local = trial.error_file
    text = Path(local).read_text(errors="replace") if local and Path(local).is_file() else trial.get_error()
    lines = _ANSI.sub("", str(text or "")).strip().splitlines() or ["the trial failed (no error text recorded)"]
    return lines[-1] + "\n" + "\n".join(lines[-40:])


def outcome(trial: Trial, ended: bool = False, error: str | None = None) -> TrialOutcome:
    """What the sweep records of a Tune trial (``ended``/``error``: known before Tune sets the trial's status)."""
    failed = trial.status == Trial.ERROR or error is not None
    if failed and error is None:
        error = error_text(trial)
    tag = trial.experiment_tag.split("_", 1)[0]  # Tune's tags start with the trial's running number
    return TrialOutcome(
        trial_id=trial.trial_id,
        index=int(tag) if tag.isdigit() else 1 << 30,
        params=dict(trial.config),
        ended=ended or failed or trial.status == Trial.TERMINATED,
        error=error,
    )


class RecordTrials(tune.Callback):
    """Prints a line when a trial starts; records the trials (:meth:`SearchTrials.record`) when a trial ends and
    when the experiment ends. It holds plain data only (``search``): it is pickled with the experiment and restored
    with it."""

    def __init__(self, search: SearchTrials) -> None:
        self.search = search

    def _publish(self, trials: list[Trial], ended: Mapping[str, str | None] | None = None) -> None:
        ended = dict(ended or {})
        outcomes = [outcome(t, t.trial_id in ended, ended.get(t.trial_id)) for t in trials]
        self.search.record(outcomes, ended)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        print(f"trial {trial.trial_id} started: {values}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._publish(trials, {trial.trial_id: None})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._publish(trials, {trial.trial_id: error_text(trial)})

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._publish(trials)


def _searcher(spec: SearchPlan, concurrent: int | None) -> Any:
    if spec.algorithm == "random":
        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrent or 0)
    import optuna as ot
    from ray.tune.search.optuna import OptunaSearch

    ot.logging.set_verbosity(ot.logging.WARNING)  # not a line per study and trial
    optuna = OptunaSearch(seed=spec.seed)
    return ConcurrencyLimiter(optuna, max_concurrent=concurrent) if concurrent else optuna


class ResumableASHA(ASHAScheduler):
    """ASHA (``time_attr="round"``, ``max_t`` = the rounds) whose rungs survive a restore. Tune saves no scheduler
    state, so a restored search would judge new trials against empty rungs; here the trials that had ended are
    replayed into their bracket, round by round, from the values they reported (:meth:`SearchTrials.reported`) when
    the restored experiment adds them back. Plain data only: it is pickled with the experiment."""

    def __init__(self, search: SearchTrials) -> None:
        spec = search.plan
        super().__init__(
            time_attr="round",
            max_t=spec.config.federation.rounds,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
        self.search = search

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.status != Trial.TERMINATED:  # a new trial, or one a restore runs again
            return
        bracket = asha_bracket(self, trial.trial_id)
        max_t, metric_op = asha_rung_values(self)
        for round, value in self.search.reported(trial.trial_id):
            if round < max_t:
                bracket.on_result(trial, round, metric_op * value)


def _scheduler(search: SearchTrials) -> Any:
    return ResumableASHA(search) if search.plan.scheduler == "asha" else FIFOScheduler()


@contextmanager
def _tune_env() -> Iterator[None]:
    """Environment Tune's driver reads while it runs: frequent experiment-state saves, and only the JSON and CSV
    result loggers (no TensorBoardX warning; fedsim writes its own TensorBoard files)."""
    wanted = {"TUNE_GLOBAL_CHECKPOINT_S": str(STATE_PERIOD_S), "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update({k: v for k, v in wanted.items() if before[k] is None})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)


def run_tune(search: SearchTrials, out: Path, max_concurrent: int | str, log: Any = print) -> None:
    """Run (or continue) the search ``search`` (its Tune experiment in ``<out>/tune``; ``out``: a local folder) on
    Ray Tune; returns when every trial has ended or the experiment was interrupted (Ctrl-C). Starts a local Ray
    or joins a cluster as :func:`fedsim.runtime.cluster.connect` decides (``runtime.address`` of the base config).
    Each trial holds :func:`trial_resources` on this node; ``max_concurrent`` ("auto": as many as fit) caps the
    trials at once."""
    spec = search.plan
    out = Path(out).resolve()
    experiment = out / EXPERIMENT
    storage = replacing_local_filesystem()  # a kill never leaves a half-written state file for the restore
    connection = connect(spec.config.runtime.address, cpus_needed=cell_cpus(spec.config))
    try:
        need = trial_resources(spec.config, ray.util.get_node_ip_address(), ray.cluster_resources().get("GPU", 0))
        trainable = tune.with_resources(tune.with_parameters(run_trial, trials=search, cwd=os.getcwd()), need)
        with _tune_env():
            if tune.Tuner.can_restore(str(experiment), storage_filesystem=storage):
                log(f"search: continuing the Tune experiment in {experiment}")
                drop_partial_writes(experiment)
                tuner = tune.Tuner.restore(
                    str(experiment), trainable, resume_unfinished=True, restart_errored=True, storage_filesystem=storage
                )
            else:
                concurrent = None if max_concurrent == "auto" else int(max_concurrent)
                tuner = tune.Tuner(
                    trainable,
                    param_space={k: tune_domain(d) for k, d in spec.space.items()},
                    tune_config=tune.TuneConfig(
                        metric=spec.metric,
                        mode=spec.mode,
                        num_samples=spec.samples,
                        search_alg=_searcher(spec, concurrent),
                        scheduler=_scheduler(search),
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=EXPERIMENT,
                        storage_path=str(out),
                        storage_filesystem=storage,
                        verbose=0,
                        callbacks=[RecordTrials(search), JsonLoggerCallback(), CSVLoggerCallback()],
                    ),
                )
            with warnings.catch_warnings():  # Optuna, when a restored trial that was running reports round 1 again
                warnings.filterwarnings("ignore", message="The reported value is ignored", category=UserWarning)
                tuner.fit()
    finally:
        disconnect(connection)
