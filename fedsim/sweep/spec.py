"""Sweep files: a base config, a grid of axes, optional per-cell rules -> the list of cells to run.

Format (YAML)::

    name: quality-bbc            # optional; default: the file's stem
    base: quickstart             # preset name or YAML path (relative to the sweep file)
    set: {federation.rounds: 10} # optional: overrides for every cell
    grid:                        # axes, crossed in this order
      method.name: [fedavg_lora, ffa_lora]       # a config key and its values
      privacy:                                   # a NAMED axis: each value sets several keys at once
        - {label: none, privacy.mode: none}
        - {label: eps8, privacy.mode: sample, privacy.epsilon: 8}
      seed: [0, 1, 2]
    rules:                       # optional, applied in order to every cell they match
      - when: {method.name: ffa_lora, privacy.mode: sample}
        set: {federation.lr: 2.0}
    parallel: 1                  # cells at once: an integer or "auto" (as many as the Ray cluster fits)

Instead of ``grid:`` a sweep may have a ``search:`` section (a Ray Tune search over config keys, one trial per
sampled config; see :mod:`fedsim.sweep.search`); ``set:`` and ``rules:`` apply to its trials the same way.

A cell's id joins ``<axis>=<value label>`` with ``__`` (e.g. ``method.name=ffa_lora__privacy=eps8__seed=0``); it
names the cell's run folder. Every problem (file structure, every cell's config) is reported at once, as one
ConfigError, before anything runs.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim.config.load import resolve_source
from fedsim.config.schema import Config
from fedsim.errors import ConfigError
from fedsim.sweep.search import SearchSpec, parse_search, quote_distributions
from fedsim.sweep.settings import parse_rules, run_data
from fedsim.validation import config_from_dict

_TOP_KEYS = ("name", "base", "set", "grid", "search", "rules", "parallel")
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class Cell:
    """One grid point: its id, the values of each axis (labels for named axes) and its validated config."""

    cell_id: str
    values: Mapping[str, Any]
    config: Config


@dataclass(frozen=True)
class SweepSpec:
    """A loaded and validated sweep: every cell's config is already built (a grid), or a search (no cells)."""

    name: str
    path: Path
    cells: tuple[Cell, ...]
    parallel: int | str = 1  # an integer >= 1 or "auto"
    axes: tuple[str, ...] = field(default_factory=tuple)
    search: SearchSpec | None = None


def _label(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _axis_values(axis: str, raw: Any, problems: list[str]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(label, column value, {dotted key: value}) per value of one axis."""
    if not isinstance(raw, list) or not raw:
        problems.append(f"grid.{axis}: expected a non-empty list of values, got {raw!r}")
        return []
    out: list[tuple[str, Any, dict[str, Any]]] = []
    for v in raw:
        if isinstance(v, Mapping):
            sets = {str(k): x for k, x in v.items() if k != "label"}
            if not sets:
                problems.append(f"grid.{axis}: value {dict(v)!r} sets no config key")
                continue
            label = str(v.get("label") or "+".join(_label(x) for x in sets.values()))
            out.append((label, label, sets))
        elif "." in axis or axis == "seed":
            out.append((_label(v), v, {axis: v}))
        else:
            problems.append(
                f"grid.{axis}: a plain value list needs a dotted config key as axis name (e.g. method.name) or seed; "
                f"for a named axis give mappings such as {{label: x, privacy.mode: none}}"
            )
            return []
    labels = [lab for lab, _, _ in out]
    if len(set(labels)) != len(labels):
        problems.append(f"grid.{axis}: value labels must be distinct, got {labels}; add label: to named values")
    return out


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; build every cell's config.

    Raises ConfigError listing every problem (unknown top-level keys, bad axes or rules, and each cell's config
    problems prefixed with the cell id).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"sweep file {path}: not found; give the path to a sweep YAML file"])
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(quote_distributions(text) if "search" in text else text) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"sweep file {path}: not valid YAML ({' '.join(str(e).split())})"]) from None
    if not isinstance(raw, Mapping):
        raise ConfigError([f"sweep file {path}: expected a mapping with base:, grid: ..."])
    problems = [f"{k}: unknown sweep key; the keys are {', '.join(_TOP_KEYS)}" for k in raw if k not in _TOP_KEYS]
    base_name = raw.get("base")
    base: dict[str, Any] = {}
    if not isinstance(base_name, str):
        problems.append("base: missing; a preset name (e.g. quickstart) or a YAML path relative to the sweep file")
    else:
        local = path.parent / base_name
        source = str(local) if local.suffix in (".yaml", ".yml") and local.is_file() else base_name
        try:
            base_path, _ = resolve_source(source)
            from fedsim.config.load import expand_dotted, read_yaml

            base = expand_dotted(read_yaml(base_path))
        except ConfigError as e:
            problems.extend(f"base: {p}" for p in e.problems)
    common = raw.get("set") or {}
    if not isinstance(common, Mapping):
        problems.append("set: expected a mapping of config keys to values")
        common = {}
    grid = raw.get("grid")
    searching = "search" in raw
    if searching and grid is not None:
        problems.append("grid: a sweep has either grid: (every combination) or search: (sampled trials), not both")
    elif not searching and (not isinstance(grid, Mapping) or not grid):
        problems.append("grid: missing or empty; e.g. grid: {method.name: [fedavg_lora, ffa_lora], seed: [0, 1]}")
    if not isinstance(grid, Mapping):
        grid = {}
    axes = {str(a): _axis_values(str(a), v, problems) for a, v in grid.items()}
    rules = parse_rules(raw.get("rules"), problems)
    parallel = raw.get("parallel", 1)
    if not (parallel == "auto" or (isinstance(parallel, int) and not isinstance(parallel, bool) and parallel >= 1)):
        problems.append(f"parallel: expected an integer >= 1 or auto, got {parallel!r}")
    if searching:
        if "parallel" in raw:
            problems.append("parallel: not for a search; set search.max_concurrent (trials at once)")
        search = None
        if not any(p.startswith("base:") for p in problems):  # checked against the base config: it must load
            try:
                search = parse_search(raw["search"], base, common, rules)
            except ConfigError as e:
                problems.extend(e.problems)
        if problems or search is None:
            raise ConfigError(problems)
        return SweepSpec(name=str(raw.get("name") or path.stem), path=path, cells=(), search=search)
    if problems:
        raise ConfigError(problems)

    cells: list[Cell] = []
    cell_problems: dict[str, list[str]] = {}
    for combo in itertools.product(*axes.values()):
        data = run_data(base, common, [(k, v) for _, _, sets in combo for k, v in sets.items()], rules)
        cell_id = _SAFE.sub("-", "__".join(f"{a}={lab}" for a, (lab, _, _) in zip(axes, combo, strict=True)))
        try:
            cfg = config_from_dict(data)
        except ConfigError as e:
            for p in e.problems:
                cell_problems.setdefault(p, []).append(cell_id)
            continue
        cells.append(Cell(cell_id, {a: col for a, (_, col, _) in zip(axes, combo, strict=True)}, cfg))
    if cell_problems:
        raise ConfigError([f"{p} (in {len(ids)} cell(s), e.g. {ids[0]})" for p, ids in cell_problems.items()])
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError(["grid: two cells get the same id; give the named-axis values distinct labels"])
    name = str(raw.get("name") or path.stem)
    return SweepSpec(name=name, path=path, cells=tuple(cells), parallel=parallel, axes=tuple(axes))


def describe(cells: Sequence[Cell]) -> str:
    """One line per cell (for --dry-run)."""
    return "\n".join(c.cell_id for c in cells)
