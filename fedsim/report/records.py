"""Run directories and sweep directories -> one flat record (row) per run.

:func:`run_record` is THE place that turns a run directory (config.yaml + summary.json) into a row;
the sweep module uses it for the rows of ``sweep.parquet`` and the report for plain run directories.
:func:`load_records` reads the report's inputs (run or sweep directories) into such rows, each with
its run directory (``path``) and its flattened config (``settings``) attached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from fedsim.config.load import config_to_dict, flatten_dotted, merge_nested
from fedsim.config.schema import Config
from fedsim.errors import UserError

# The columns every row has (sweep.parquet has these plus one column per grid key).
RECORD_COLUMNS = (
    "cell",  # id: the run directory's name (a sweep's cell id)
    "run_dir",  # the run directory, relative to the sweep directory when ``base`` is given
    "status",  # "complete" (summary.json written) | "failed"
    "method",  # method.name
    "privacy_mode",  # privacy.mode: none | sample | client
    "epsilon_target",  # privacy.epsilon (None without DP or with a fixed noise multiplier)
    "noise_multiplier",  # privacy.noise_multiplier when DP runs with a fixed sigma, else None
    "partition",  # "iid", "dirichlet(0.5)", "quantity(0.5)", "label_proportions"
    "task",  # data.source
    "model",  # model.name
    "seed",  # seed
    "rounds",  # federation.rounds
    "final_accuracy",  # global eval accuracy of the last evaluated round
    "best_accuracy",  # best global eval accuracy over the evaluated rounds
    "final_loss",  # global eval loss of the last evaluated round
    "final_local_accuracy",  # accuracy on the clients' own held-out examples (personalised model for FedSA-LoRA)
    "epsilon_spent",  # summary "epsilon": max over clients (sample) / the run's epsilon (client); None without DP
    "wall_s",  # wall time of the whole run, seconds
    "bytes_up",  # bytes uploaded by all clients over the run
    "bytes_down",  # bytes downloaded by all clients over the run
)
COMPLETE, FAILED = "complete", "failed"
RUN_FILES = ("summary.json", "config.yaml")
SWEEP_FILE = "sweep.parquet"


def _defaults() -> dict[str, Any]:
    return config_to_dict(Config())


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a nested dict, missing keys filled with the schema defaults.

    Read as plain YAML (not validated), so runs written by older versions still load.
    Raises UserError if config.yaml is missing or is not a YAML mapping.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: no config.yaml; a fedsim run directory holds config.yaml and summary.json")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return merge_nested(_defaults(), data)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json as a dict; None if the run has none (it did not finish). Raises UserError if unreadable."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def partition_label(partition: Mapping[str, Any]) -> str:
    """``iid``, ``dirichlet(0.5)``, ``quantity(0.5)`` or ``label_proportions`` from data.partition."""
    kind = str(partition.get("kind", "iid"))
    if kind in ("dirichlet", "quantity"):
        return f"{kind}({float(partition.get('alpha', 0.5)):g})"
    return kind


def flatten(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Nested config -> ``{"federation.rounds": 10, ...}``; lists become compact JSON strings (hashable)."""
    return {
        k: json.dumps(v, separators=(",", ":")) if isinstance(v, (list, tuple)) else v
        for k, v in flatten_dotted(cfg).items()
    }


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def run_record(run_dir: Path, base: Path | None = None) -> dict[str, Any]:
    """One row (keys: :data:`RECORD_COLUMNS`) for a run directory.

    ``status`` is "complete" when summary.json exists, else "failed" (metric fields None).
    ``run_dir`` is relative to ``base`` (POSIX separators) when given, else the path as passed.
    Raises UserError if config.yaml is missing or unreadable, or summary.json is unreadable.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    summary = read_summary(run_dir)
    pr = cfg["privacy"]
    dp = pr.get("mode", "none") != "none"
    rel = run_dir.relative_to(base).as_posix() if base is not None else str(run_dir)
    s = summary or {}
    up, down = s.get("bytes_up"), s.get("bytes_down")
    return {
        "cell": run_dir.name,
        "run_dir": rel,
        "status": COMPLETE if summary is not None else FAILED,
        "method": str(cfg["method"]["name"]),
        "privacy_mode": str(pr.get("mode", "none")),
        "epsilon_target": _num(pr.get("epsilon")) if dp else None,
        "noise_multiplier": _num(pr.get("noise_multiplier")) if dp and pr.get("epsilon") is None else None,
        "partition": partition_label(cfg["data"]["partition"]),
        "task": str(cfg["data"]["source"]),
        "model": str(cfg["model"]["name"]),
        "seed": int(cfg["seed"]),
        "rounds": int(cfg["federation"]["rounds"]),
        "final_accuracy": _num(s.get("final_eval_accuracy")),
        "best_accuracy": _num(s.get("best_eval_accuracy")),
        "final_loss": _num(s.get("final_eval_loss")),
        "final_local_accuracy": _num(s.get("final_personal_accuracy")),
        "epsilon_spent": _num(s.get("epsilon")) if dp else None,
        "wall_s": _num(s.get("wall_s")),
        "bytes_up": None if up is None else int(up),
        "bytes_down": None if down is None else int(down),
    }


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The run's flattened config without ``seed`` (runs that differ only in seed have equal settings)."""
    flat = flatten(read_run_config(run_dir))
    flat.pop("seed", None)
    return flat


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def is_run_dir(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in RUN_FILES)


def _from_run_dir(path: Path) -> dict[str, Any]:
    if not (path / "summary.json").is_file():
        raise UserError(
            f"{path}: has config.yaml but no summary.json: the run did not finish (or is still running); "
            "report on finished runs only, or resume this one with `fedsim resume`"
        )
    rec = run_record(path)
    return {**rec, "path": str(path), "source": str(path), "settings": run_settings(path)}


def _from_sweep_dir(sweep: Path) -> list[dict[str, Any]]:
    try:
        rows = pq.read_table(sweep / SWEEP_FILE).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{sweep / SWEEP_FILE}: cannot be read as Parquet ({e})") from None
    out = []
    for i, row in enumerate(rows):
        rd = row.get("run_dir") or (f"cells/{row['cell']}" if row.get("cell") else None)
        if rd is None:
            raise UserError(f"{sweep / SWEEP_FILE}: row {i} has neither run_dir nor cell; rerun the sweep")
        path = sweep / str(rd)
        status = str(row.get("status") or FAILED)
        rec: dict[str, Any] = {c: row.get(c) for c in RECORD_COLUMNS}
        rec.update({k: v for k, v in row.items() if k not in rec})
        settings: dict[str, Any] = {}
        if status == COMPLETE:
            if (path / "summary.json").is_file() and (path / "config.yaml").is_file():
                rec.update(run_record(path, base=sweep))  # the files on disk are the truth
                settings = run_settings(path)
            else:
                status = "missing"  # the sweep says complete, but its files are gone
        rec.update(status=status, cell=str(row.get("cell") or path.name), run_dir=str(rd))
        out.append({**rec, "path": str(path), "source": str(sweep), "settings": settings})
    return out  # sweep.parquet's order (the grid order)


def load_records(inputs: Sequence[Path]) -> list[dict[str, Any]]:
    """Rows for every run under ``inputs`` (run directories and sweep directories), in input order.

    Each row has :data:`RECORD_COLUMNS` (a sweep's rows also keep sweep.parquet's other columns) plus
    ``path`` (the run directory), ``source`` (the input it came from) and ``settings`` (flattened
    config without seed; empty for cells that did not complete).
    Raises UserError for no inputs, a missing path, a directory that is neither a run nor a sweep,
    a run directory without summary.json, and unreadable files (each message names the path).
    """
    if not inputs:
        raise UserError("report: give at least one run directory or sweep directory")
    out: list[dict[str, Any]] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path}: not found; give a run directory (with summary.json) or a sweep directory")
        if not path.is_dir():
            raise UserError(f"{path}: not a directory; give a run directory or a sweep directory")
        if is_sweep_dir(path):
            out.extend(_from_sweep_dir(path))
        elif is_run_dir(path):
            out.append(_from_run_dir(path))
        else:
            raise UserError(
                f"{path}: neither a run directory (config.yaml + summary.json) nor a sweep directory "
                f"({SWEEP_FILE} + cells/); for a folder of runs pass each one, e.g. `fedsim report {path}/*`"
            )
    return out


def read_run_table(run_dir: Path | str, name: str) -> dict[str, list[Any]] | None:
    """``<run_dir>/<name>.parquet`` as ``{column: values}``; None if absent. Raises UserError if unreadable."""
    path = Path(run_dir) / f"{name}.parquet"
    if not path.is_file():
        return None
    try:
        return pq.read_table(path).to_pydict()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot be read as Parquet ({e})") from None
