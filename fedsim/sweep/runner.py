"""Run every cell of a sweep into ``<out>/cells/<cell id>/`` and keep ``<out>/sweep.parquet`` current.

A cell is complete when its folder holds ``summary.json`` (written last by a run) and a ``config.yaml`` equal to
the cell's config; complete cells are skipped, so a stopped sweep resumes where it stopped. A cell folder without
``summary.json`` (a run killed mid-way) is deleted and the cell is run again. A complete cell whose config differs
from the sweep's (the sweep file changed under it) stops the sweep before anything runs: choose another ``--out``;
``runtime.*`` is not compared (a finished sweep may be continued with more parallel cells or other resources).

``sweep.parquet``: one row per cell in grid order, the columns of :func:`fedsim.report.records.run_record` plus
one column per grid axis (its value, or the label of a named axis) and ``error`` (a failed cell's message). It is
rewritten atomically after every cell.

``out`` may be a URI (``fedsim sweep --out s3://...``): each cell is a run to ``<URI>/cells/<cell id>`` (staged and
mirrored as :mod:`fedsim.storage` describes), sweep.parquet is uploaded whole after every cell, and the complete
check reads each cell's config.yaml and summary.json from the URI.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from fedsim.config.schema import Config
from fedsim.errors import UserError
from fedsim.report.records import run_record
from fedsim.storage import Location, RunMirror, local_folder, local_location, parse_location, pull
from fedsim.sweep.spec import Cell, SweepSpec
from fedsim.validation import config_from_dict

SWEEP_FILE = "sweep.parquet"
CELLS_DIR = "cells"
HPARAMS_DIR = "tb"  # <out>/tb/<cell>: each cell's HParams record


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


#: sweep.parquet columns written as the HParams plugin's metrics (``tb/<cell id>``)
HPARAM_METRICS = ("final_accuracy", "best_accuracy", "final_loss", "final_local_accuracy", "epsilon_spent", "wall_s")


def write_hparams(out: Path, row: dict[str, Any]) -> list[str]:
    """TensorBoard HParams of one finished cell: its grid values (a search trial: its sampled ``space:`` values)
    and its :data:`HPARAM_METRICS` (those present) into ``out/tb/<cell id>/`` (``tensorboard --logdir <sweep>``
    then shows one run per cell beside the cells' per-round curves in ``cells/<id>/tb``). Returns the written files
    relative to ``out``."""
    from torch.utils.tensorboard import SummaryWriter

    hparams = {
        k.split(":", 1)[1]: ("null" if v is None else v) for k, v in row.items() if k.startswith(("grid:", "space:"))
    }
    metrics = {f"hparam/{k}": float(row[k]) for k in HPARAM_METRICS if isinstance(row.get(k), (int, float))}
    folder = Path(out) / HPARAMS_DIR / str(row["cell"])
    shutil.rmtree(folder, ignore_errors=True)  # a rerun cell replaces its record
    with SummaryWriter(str(folder)) as writer:
        writer.add_hparams(hparams, metrics, run_name=".")
    return [p.relative_to(out).as_posix() for p in folder.rglob("*") if p.is_file()]


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


def run_cell(cfg: Config, where: str, label: str, progress: bool) -> None:
    """Run one cell into ``where`` (a local folder, or a URI through a node-local staging folder)."""
    from fedsim.simulation import run_simulation

    loc = parse_location(where, "--out", check=False)
    if loc.local is not None:
        run_simulation(cfg, loc.local, label=label, progress=progress)
        return
    with RunMirror.staged(loc) as mirror:
        run_simulation(cfg, mirror.folder, label=label, progress=progress, mirror=mirror)


@contextmanager
def sweep_folder(out: Location) -> Iterator[Path]:
    """The local folder the sweep's bookkeeping reads: ``out`` itself, or for a URI a temporary folder holding each
    cell's config.yaml and summary.json (pulled from the URI; removed after)."""
    with local_folder(out, prefix="fedsim-sweep-") as folder:
        if out.remote:
            pull(out, folder, lambda rel: rel.startswith(f"{CELLS_DIR}/") and rel.count("/") == 2
                 and rel.endswith(("/summary.json", "/config.yaml")))  # fmt: skip
        yield folder


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
    out: Path | Location,
    *,
    parallel: int | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the missing cells of ``spec`` into ``out`` (a folder, or a remote :class:`~fedsim.storage.Location`:
    cells and sweep.parquet are written there through staging folders); return the rows of ``sweep.parquet``.

    ``parallel`` (default: the sweep file's): 1 runs the cells one after another in this process; N > 1 or "auto"
    runs up to N cells at once as tasks on the Ray cluster ("auto": as many as its CPUs fit). A failing cell gets
    status "failed" and its error, and the sweep goes on. Raises UserError for stale cells, or a Ray cluster address
    where no cluster answers (nothing runs).
    """
    loc = out if isinstance(out, Location) else local_location(out)
    with sweep_folder(loc) as folder:
        return _run_sweep(spec, loc, folder, parallel, progress, log)


def _run_sweep(
    spec: SweepSpec, loc: Location, out: Path, parallel: int | str | None, progress: bool, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """:func:`run_sweep` with ``out`` the local folder standing for ``loc`` (itself when local)."""
    stale = stale_cells(out, spec.cells)
    if stale:
        raise UserError(
            f"{loc}: {len(stale)} finished cell(s) were run with a different config than the sweep file now gives "
            f"(e.g. {stale[0]}); use another --out for the changed sweep, or delete those cell folders"
        )
    done = {c.cell_id for c in spec.cells if is_complete(out, c)}
    todo = [c for c in spec.cells if c.cell_id not in done]
    parallel = spec.parallel if parallel is None else parallel
    _check_clusters(todo, parallel)
    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    log(f"sweep {spec.name}: {len(spec.cells)} cells, {len(done)} complete, {len(todo)} to run -> {loc}")
    errors: dict[str, str | None] = {}

    def rows() -> list[dict[str, Any]]:
        return [_row(out, c, errors.get(c.cell_id)) for c in spec.cells if c.cell_id in done or c.cell_id in errors]

    def publish(table: list[dict[str, Any]]) -> None:
        write_table(out, table)
        if loc.remote:
            loc.upload(out / SWEEP_FILE, SWEEP_FILE)

    def target(cell: Cell) -> str:
        return str(loc.child(CELLS_DIR, cell.cell_id)) if loc.remote else str(cell_dir(out, cell))

    for c in todo:  # partial folders of killed runs
        if cell_dir(out, c).exists():
            shutil.rmtree(cell_dir(out, c))
        if loc.remote:
            loc.delete(f"{CELLS_DIR}/{c.cell_id}")
    if done:
        publish(rows())

    def finished(cell: Cell, error: str | None) -> None:
        if loc.remote:  # the cell's record files, for its row
            remote = loc.child(CELLS_DIR, cell.cell_id)
            for name in ("config.yaml", "summary.json"):
                if remote.is_file(name):
                    remote.download(name, cell_dir(out, cell) / name)
        errors[cell.cell_id] = error
        if error is None:
            done.add(cell.cell_id)
            for rel in write_hparams(out, _row(out, cell, None)):  # TensorBoard HParams of the cell
                if loc.remote:
                    loc.upload(out / rel, rel)
        else:
            log(f"cell {cell.cell_id} FAILED: {error.strip().splitlines()[-1] if error.strip() else error}")
        publish(rows())

    if parallel != 1 and todo:
        from fedsim.runtime.sweep_pool import run_cells_on_ray

        run_cells_on_ray(todo, partial(run_cell, progress=False), target, parallel, finished, log)
    else:
        for i, cell in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {cell.cell_id}")
            try:
                run_cell(cell.config, target(cell), cell.cell_id, progress)
            except Exception as exc:  # one bad cell must not stop the others
                finished(cell, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
                continue
            finished(cell, None)
    final = rows()
    publish(final)
    failed = sum(r["status"] != "complete" for r in final)
    log(f"sweep {spec.name}: {len(final) - failed} complete, {failed} failed -> {loc.child(SWEEP_FILE)}")
    sys.stdout.flush()
    return final
