"""The Python API (``import fedsim``): run, resume, load, sweep and report from a notebook or a script.

The ``fedsim`` command line is a thin layer over these functions (same checks, same messages). Every function
raises :class:`~fedsim.errors.UserError` (a :class:`~fedsim.errors.ConfigError` listing every config problem) for
bad input before any training starts or any file is written. Heavy modules (torch, transformers, Ray) are imported
only when a run starts.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.config.load import config_to_dict, expand_dotted, merge_nested
from fedsim.config.schema import Config
from fedsim.errors import UserError
from fedsim.storage import (
    CONFIG,
    SPILL_DIR,
    SUMMARY,
    Location,
    RunMirror,
    is_uri,
    local_folder,
    local_location,
    parse_location,
    pull,
    push,
)
from fedsim.validation import config_from_dict, load_config

if TYPE_CHECKING:
    import pyarrow as pa

    from fedsim.metrics.observers import RunObserver

__all__ = ["RunResult", "load_run", "report", "resume", "run", "sweep", "validate"]

ConfigLike = Config | Mapping[str, Any] | str | Path


@dataclass(frozen=True)
class RunResult:
    """One run's outputs, read back from its folder (or URI).

    ``summary``: summary.json as a dict (empty for a run that has not finished); ``rounds`` / ``clients``: the
    rounds.parquet / clients.parquet tables; ``out``: the run folder (a path) or its URI; ``adapter``: the final
    adapter folder in PEFT format (``out``/adapter); ``tb``: the TensorBoard event folder (``out``/tb)."""

    summary: dict[str, Any]
    rounds: pa.Table
    clients: pa.Table
    out: str
    adapter: str
    tb: str


def _override_text(key: str, value: Any) -> str:
    """``key=value`` as ``--set`` takes it (JSON is YAML, so lists, strings, numbers and null survive)."""
    return f"{key}={json.dumps(value)}"


def resolve_config(config: ConfigLike | None, overrides: Mapping[str, Any] | None = None) -> tuple[Config, str]:
    """``(Config, label)`` from a Config, a (nested or dotted-key) dict, a preset name or a YAML path (None: the
    quickstart preset), with ``overrides`` (dotted keys, as ``--set`` takes them) applied and everything checked.

    Raises ConfigError listing every problem; TypeError for a ``config`` of another type."""
    overrides = dict(overrides or {})
    if config is None or isinstance(config, (str, Path)):
        return load_config(
            None if config is None else str(config), [_override_text(k, v) for k, v in overrides.items()]
        )
    if isinstance(config, Config):
        data: dict[str, Any] = config_to_dict(config)
        label = "run"
    elif isinstance(config, Mapping):
        data, label = dict(config), "run"
    else:
        raise TypeError(f"config must be a Config, a dict, a preset name or a YAML path, got {type(config).__name__}")
    merged = merge_nested(expand_dotted(data), expand_dotted(overrides))
    return config_from_dict(merged), label


def validate(config: ConfigLike | None, *, overrides: Mapping[str, Any] | None = None) -> Config:
    """The checked :class:`Config` (what ``fedsim validate`` prints). Raises ConfigError listing every problem."""
    return resolve_config(config, overrides)[0]


def out_location(out: str | Path | None, label: str, overwrite: bool = False) -> Location:
    """The run's output location (``out``: a local folder or a URI; default ``runs/<label>-<YYYYmmdd-HHMMSS>``).

    Raises UserError if it exists and is not empty (nothing is written), unless ``overwrite`` and it holds a run
    (config.yaml), which is then emptied; for a URI also when pyarrow cannot open it or its bucket is missing."""
    out = str(out) if out is not None else None
    if out and is_uri(out):
        loc = parse_location(out, "--out")
        if loc.remote:
            _check_remote_out(loc, overwrite)
            return loc
        assert loc.local is not None
        path = loc.local
    else:
        path = Path(out) if out else Path("runs") / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if overwrite and path.is_dir() and (path / "config.yaml").is_file():
            shutil.rmtree(path)
            return local_location(path)
        what = "is a file" if not path.is_dir() else "exists and is not empty"
        if path.is_dir() and (path / "config.yaml").is_file():
            state = "a finished run" if (path / "summary.json").is_file() else "a stopped run"
            hint = "" if (path / "summary.json").is_file() else f", `fedsim resume {path}` to continue it"
            raise UserError(
                f"output folder {path} holds {state}; refusing to overwrite; choose another --out, pass "
                f"--overwrite to replace it{hint}"
            )
        raise UserError(f"output folder {path} {what}; refusing to overwrite; choose another --out or delete it")
    return local_location(path)


def _check_remote_out(loc: Location, overwrite: bool) -> None:
    """The rule of :func:`out_location` for a remote ``out``: empty, or a run (config.yaml) replaced on
    ``overwrite``."""
    if loc.is_file(CONFIG):
        if overwrite:
            loc.delete()
            return
        finished = loc.is_file(SUMMARY)
        state = "a finished run" if finished else "a stopped run"
        hint = "" if finished else f", `fedsim resume {loc}` to continue it"
        raise UserError(
            f"output {loc} holds {state}; refusing to overwrite; choose another --out, pass --overwrite to replace "
            f"it{hint}"
        )
    if loc.files():
        raise UserError(
            f"output {loc} exists and is not empty; refusing to overwrite; choose another --out or delete it"
        )


def describe_run(cfg: Config, label: str, out: Location) -> str:
    """The line printed when a run starts (method, model, data, federation, privacy, where the outputs go)."""
    fe = cfg.federation
    return (
        f"fedsim run {label}: method {cfg.method.name}, model {cfg.model.name}, data {cfg.data.source}, "
        f"{fe.clients} clients ({fe.clients_per_round}/round), {fe.rounds} rounds, privacy {cfg.privacy.mode} "
        f"-> {out}"
    )


def _read_result(folder: Path, shown: str, summary: Mapping[str, Any] | None = None) -> RunResult:
    """A :class:`RunResult` read from a local run ``folder``; ``shown``: the path or URI it is known by;
    ``summary``: the run's summary when the caller has it (else summary.json, or empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(name: str) -> pa.Table:
        path = folder / name
        return pq.read_table(path) if path.is_file() else pa.table({})

    summary_path = folder / SUMMARY
    if summary is None:
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}

    def child(name: str) -> str:
        return f"{shown.rstrip('/')}/{name}" if is_uri(shown) else str(Path(shown) / name)

    return RunResult(
        summary=dict(summary),
        rounds=table("rounds.parquet"),
        clients=table("clients.parquet"),
        out=shown,
        adapter=child("adapter"),
        tb=child("tb"),
    )


def execute_run(
    cfg: Config, label: str, out: Location, *, progress: bool = True, observers: Sequence[RunObserver] = ()
) -> RunResult:
    """Run ``cfg`` into ``out`` (checked by :func:`out_location`); a URI is staged locally and mirrored as the run
    goes; ``observers`` see its rounds (after the run's own outputs). Raises UserError for bad input (before
    training), RunStopped when too many clients fail."""
    from fedsim.simulation import run_simulation  # heavy imports only when a run starts

    extra: dict[str, Any] = {} if progress else {"progress": False}
    if observers:
        extra["observers"] = tuple(observers)
    if out.local is not None:
        summary = run_simulation(cfg, out.local, label=label, **extra)
        return _read_result(out.local, str(out.local), summary)
    with RunMirror.staged(out) as mirror:  # written into a node-local staging folder, mirrored to the URI
        summary = run_simulation(cfg, mirror.folder, label=label, mirror=mirror, **extra)
        return _read_result(mirror.folder, str(out), summary)


def run(
    config: ConfigLike | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    observers: Sequence[RunObserver] = (),
) -> RunResult:
    """Run one simulation and return its outputs.

    ``config``: a :class:`Config`, a dict (nested or dotted keys), a preset name or a YAML path (None: the
    quickstart preset); ``overrides``: dotted keys as ``--set`` takes them, e.g. ``{"federation.rounds": 3}``;
    ``out``: a folder or an ``s3://`` / ``gs://`` / ``file://`` URI (default ``runs/<label>-<time>``), which must
    be empty (``overwrite`` replaces a run there); ``progress``: print the start line and a progress bar;
    ``observers``: :class:`~fedsim.metrics.observers.RunObserver` objects told of the run's start, each round
    (its rounds.parquet row and what produced it, once its tables and checkpoint are written) and its end, after
    the run's own outputs (an exception one raises stops the run).

    Raises ConfigError (every config problem at once), UserError (an ``out`` that holds something, unreadable data,
    no Ray cluster) before any training; RunStopped when more than ``runtime.max_failed_fraction`` of a cohort
    fails (continue with :func:`resume`)."""
    cfg, label = resolve_config(config, overrides)
    loc = out_location(out, label, overwrite)
    if progress:
        print(describe_run(cfg, label, loc))
    return execute_run(cfg, label, loc, progress=progress, observers=observers)


def resume(path_or_uri: str | Path, *, progress: bool = True, observers: Sequence[RunObserver] = ()) -> RunResult:
    """Continue a stopped run (a folder or URI holding config.yaml) from its newest checkpoint; the result equals
    an uninterrupted run's; ``observers`` as for :func:`run` (their ``on_start`` gets the restored round). Raises
    UserError if it is not a run or is already complete."""
    from fedsim.server.checkpoint import latest_checkpoint_dir
    from fedsim.simulation import run_simulation

    loc = parse_location(str(path_or_uri), "RUN_DIR")
    if loc.local is None:
        if not loc.is_file(CONFIG):
            raise UserError(f"{loc}: not a run folder (no config.yaml); give the --out URI of a `fedsim run`")
        if loc.is_file(SUMMARY):
            raise UserError(f"{loc}: the run is already complete (summary.json exists); nothing to resume")
        with RunMirror.staged(loc, resume=True) as mirror:
            cfg, _ = load_config(str(mirror.folder / CONFIG))
            found = mirror.folder / "checkpoints" / "LATEST"
            name = found.read_text(encoding="utf-8").strip() if found.is_file() else "the start (no checkpoint)"
            print(f"fedsim resume {loc}: from {name}")
            summary = run_simulation(
                cfg, mirror.folder, label=loc.name, resume=True, mirror=mirror, progress=progress, observers=observers
            )
            return _read_result(mirror.folder, str(loc), summary)
    run_dir = loc.local
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml); give the --out folder of a `fedsim run`")
    if (run_dir / SUMMARY).is_file():
        raise UserError(f"{run_dir}: the run is already complete (summary.json exists); nothing to resume")
    cfg, _ = load_config(str(run_dir / CONFIG))
    found_dir = latest_checkpoint_dir(run_dir)
    print(f"fedsim resume {run_dir}: from {found_dir.name if found_dir else 'the start (no checkpoint)'}")
    summary = run_simulation(cfg, run_dir, label=run_dir.name, resume=True, progress=progress, observers=observers)
    return _read_result(run_dir, str(run_dir), summary)


def load_run(path_or_uri: str | Path) -> RunResult:
    """The outputs of a run (finished or stopped) in a folder or at a URI (its summary and tables are read; a URI's
    adapter and checkpoints stay there). Raises UserError if there is no run (no config.yaml)."""
    loc = parse_location(str(path_or_uri), "RUN_DIR")
    if loc.local is not None:
        if not (loc.local / CONFIG).is_file():
            raise UserError(f"{loc.local}: not a run folder (no config.yaml); give the --out folder of a run")
        return _read_result(loc.local, str(loc.local))
    if not loc.is_file(CONFIG):
        raise UserError(f"{loc}: not a run folder (no config.yaml); give the --out URI of a run")
    with local_folder(loc, prefix="fedsim-load-") as tmp:
        pull(loc, tmp, lambda rel: "/" not in rel and rel.rsplit(".", 1)[-1] in ("parquet", "json", "yaml"))
        return _read_result(tmp, str(loc))


def sweep(sweep_file: str | Path, *, out: str | Path | None = None, parallel: int | str | None = None) -> pa.Table:
    """Run every cell of a sweep file that is not complete yet (rerunning resumes) into ``out`` (a folder or URI;
    default ``runs/sweeps/<sweep name>``), ``parallel`` cells at once (an int >= 1, ``"auto"``, or None for the
    file's own setting). Returns sweep.parquet's rows (one per cell, with its ``status``). Raises ConfigError for
    every problem of the sweep file, before anything runs.

    A sweep file with ``search:`` runs a Ray Tune search instead (``out`` a local folder; ``parallel``: trials at
    once, default ``search.max_concurrent``); rerunning continues its Tune experiment. Its rows are one per trial
    (``status`` complete, stopped, failed or unfinished)."""
    import pyarrow as pa

    from fedsim.sweep.runner import run_sweep
    from fedsim.sweep.spec import load_sweep

    spec = load_sweep(sweep_file)
    if parallel is not None and parallel != "auto" and not (isinstance(parallel, int) and parallel >= 1):
        raise UserError(f"--parallel: expected an integer >= 1 or auto, got {parallel!r}")
    loc = sweep_location(out, spec.name)
    if spec.search is not None:
        from fedsim.sweep.search_run import run_search

        return pa.Table.from_pylist(list(run_search(spec, loc, max_concurrent=parallel)))
    rows = run_sweep(spec, loc.local if loc.local is not None else loc, parallel=parallel)
    return pa.Table.from_pylist(list(rows))


def sweep_location(out: str | Path | None, name: str) -> Location:
    """Where a sweep writes: ``out`` (folder or URI) or ``runs/sweeps/<name>``."""
    return parse_location(str(out), "--out") if out else local_location(Path("runs") / "sweeps" / name)


def report(
    inputs: str | Path | Sequence[str | Path], *, out: str | Path | None = None, machine: str | None = None
) -> str:
    """Write report.md and its figures over run and sweep folders (or URIs); returns the report's path or URI.

    ``out``: the report folder (default: the single input, or ``runs/report``); ``machine``: how to name the
    machine in the report. Raises UserError for an input that holds no run or sweep."""
    from fedsim.report.build import make_report

    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    locs = [parse_location(str(p), "RUN_OR_SWEEP_DIR") for p in items]
    if out:
        out_loc = parse_location(str(out), "--out")
    else:
        out_loc = locs[0] if len(locs) == 1 else local_location(Path("runs") / "report")
    if all(loc.local is not None for loc in [*locs, out_loc]):
        return str(make_report([loc.local for loc in locs], out_loc.local, machine=machine))
    with ExitStack() as stack:  # remote inputs: their tables, summaries and configs (no checkpoints) into temp dirs
        folders = [stack.enter_context(_report_input(loc)) for loc in locs]
        out_folder = stack.enter_context(local_folder(out_loc, prefix="fedsim-report-"))
        shown = {str(f): str(loc) for f, loc in zip(folders, locs, strict=True) if loc.remote}
        path = make_report(folders, out_folder, machine=machine, shown=shown)
        if out_loc.remote:
            push(out_folder, out_loc)
            return str(out_loc.child(path.name))
        return str(path)


@contextmanager
def _report_input(loc: Location) -> Iterator[Path]:
    """A local folder holding what the report reads of ``loc``: itself, or for a URI a temporary copy of its
    config.yaml, summary.json and Parquet tables (a sweep's cells too; no checkpoints, adapters or spill files)."""
    if loc.local is not None:
        yield loc.local
        return
    with local_folder(loc, prefix="fedsim-report-in-") as tmp:
        folder = tmp / loc.name  # the folder's name is the run's name in the report
        skip = {"checkpoints", "adapter", "tb", SPILL_DIR}

        def wanted(rel: str) -> bool:
            return not skip & set(rel.split("/")[:-1]) and rel.rsplit(".", 1)[-1] in ("parquet", "json", "yaml")

        if not pull(loc, folder, wanted):
            raise UserError(f"{loc}: not found (no run or sweep files there); give the --out URI of a run or sweep")
        yield folder
