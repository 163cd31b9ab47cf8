"""Run every cell of a sweep into ``<out>/cells/<cell id>/`` and keep ``<out>/sweep.parquet`` current.

A cell is complete when its folder holds ``summary.json`` (written last by a run) and a ``config.yaml`` equal to
the cell's config; complete cells are skipped, so a stopped sweep resumes where it stopped. A cell folder without
``summary.json`` (a run killed mid-way) is deleted and the cell is run again. A complete cell whose config differs
from the sweep's (the sweep file changed under it) stops the sweep before anything runs: choose another ``--out``;
``runtime.*`` is not compared (a finished sweep may be continued with more parallel cells or other resources).

``sweep.parquet``: one row per cell in grid order, the columns of :func:`fedsim.report.records.run_record` plus
one column per grid axis (its value, or the label of a named axis) and ``error`` (a failed cell's message). It is
rewritten atomically after every cell.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from fedsim.config.load import config_from_dict
from fedsim.config.schema import Config
from fedsim.errors import UserError
from fedsim.report.records import run_record
from fedsim.sweep.spec import Cell, SweepSpec

SWEEP_FILE = "sweep.parquet"
CELLS_DIR = "cells"


def cell_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / CELLS_DIR / cell.cell_id


def is_complete(out: Path, cell: Cell) -> bool:
    """``summary.json`` exists and ``config.yaml`` is this cell's config."""
    d = cell_dir(out, cell)
    return (d / "summary.json").is_file() and (d / "config.yaml").is_file()


def _same_config(path: Path, cfg: Config) -> bool:
    """Whether the run's config.yaml means ``cfg`` (compared as configs: keys added to fedsim later, with their
    defaults, do not make a finished cell stale; nor does ``runtime.*`` — where and on how many workers / CPUs a
    cell ran — since a run's results do not depend on it beyond floating-point summation order)."""
    try:
        done = config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (UserError, yaml.YAMLError, OSError):
        return False
    return dataclasses.replace(done, runtime=cfg.runtime) == cfg


def stale_cells(out: Path, cells: Sequence[Cell]) -> list[str]:
    """Complete cells whose config.yaml differs from the sweep's config for them."""
    return [
        c.cell_id for c in cells if is_complete(out, c) and not _same_config(cell_dir(out, c) / "config.yaml", c.config)
    ]


def _row(out: Path, cell: Cell, error: str | None) -> dict[str, Any]:
    d = cell_dir(out, cell)
    if (d / "config.yaml").is_file():
        row = run_record(d, base=Path(out))
    else:
        row = {"cell": cell.cell_id, "run_dir": f"{CELLS_DIR}/{cell.cell_id}", "status": "failed"}
    row["cell"] = cell.cell_id
    if error is not None:
        row["status"] = "failed"
    row["error"] = error
    for axis, value in cell.values.items():
        row[f"grid:{axis}"] = value if value is None or isinstance(value, (bool, int, float)) else str(value)
    return row


def write_table(out: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``sweep.parquet`` atomically (temporary file + rename)."""
    path = Path(out) / SWEEP_FILE
    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    table = pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows])
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def _run_in_process(cell: Cell, out: Path, progress: bool) -> None:
    from fedsim.simulation import run_simulation

    run_simulation(cell.config, cell_dir(out, cell), label=cell.cell_id, progress=progress)


def _check_clusters(todo: Sequence[Cell], parallel: int | str) -> None:
    """Raise UserError, before anything runs, when a Ray cluster address the sweep would join does not answer (the
    cells on the Ray backend; with ``parallel`` != 1 also the first cell's, which the pool joins)."""
    addresses = {c.config.runtime.address for c in todo if c.config.runtime.backend == "ray"}
    if parallel != 1 and todo:
        addresses.add(todo[0].config.runtime.address)
    if addresses:
        from fedsim.runtime.cluster import check

        for address in sorted(addresses):
            check(address)


def run_sweep(
    spec: SweepSpec,
    out: Path,
    *,
    parallel: int | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the missing cells of ``spec`` into ``out``; return the rows written to ``sweep.parquet``.

    ``parallel`` (default: the sweep file's): 1 runs the cells one after another in this process; N > 1 or "auto"
    runs up to N cells at once as tasks on the Ray cluster ("auto": as many as its CPUs fit). A failing cell gets
    status "failed" and its error, and the sweep goes on. Raises UserError for stale cells, or a Ray cluster address
    where no cluster answers (nothing runs).
    """
    out = Path(out)
    stale = stale_cells(out, spec.cells)
    if stale:
        raise UserError(
            f"{out}: {len(stale)} finished cell(s) were run with a different config than the sweep file now gives "
            f"(e.g. {stale[0]}); use another --out for the changed sweep, or delete those cell folders"
        )
    done = {c.cell_id for c in spec.cells if is_complete(out, c)}
    todo = [c for c in spec.cells if c.cell_id not in done]
    parallel = spec.parallel if parallel is None else parallel
    _check_clusters(todo, parallel)
    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    log(f"sweep {spec.name}: {len(spec.cells)} cells, {len(done)} complete, {len(todo)} to run -> {out}")
    errors: dict[str, str | None] = {}

    def rows() -> list[dict[str, Any]]:
        return [_row(out, c, errors.get(c.cell_id)) for c in spec.cells if c.cell_id in done or c.cell_id in errors]

    for c in todo:  # partial folders of killed runs
        if cell_dir(out, c).exists():
            shutil.rmtree(cell_dir(out, c))
    if done:
        write_table(out, rows())

    def finished(cell: Cell, error: str | None) -> None:
        errors[cell.cell_id] = error
        if error is None:
            done.add(cell.cell_id)
        else:
            log(f"cell {cell.cell_id} FAILED: {error.strip().splitlines()[-1] if error.strip() else error}")
        write_table(out, rows())

    if parallel != 1 and todo:
        from fedsim.runtime.sweep_pool import run_cells_on_ray

        run_cells_on_ray(todo, out, parallel, finished, log)
    else:
        for i, cell in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {cell.cell_id}")
            try:
                _run_in_process(cell, out, progress)
            except Exception as exc:  # one bad cell must not stop the others
                finished(cell, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
                continue
            finished(cell, None)
    final = rows()
    write_table(out, final)
    failed = sum(r["status"] != "complete" for r in final)
    log(f"sweep {spec.name}: {len(final) - failed} complete, {failed} failed -> {out / SWEEP_FILE}")
    sys.stdout.flush()
    return final
