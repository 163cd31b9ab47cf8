"""Adapter analyses, where the runs recorded them: A-vs-B cross-client similarity per layer
(similarity.parquet) and the per-layer choice of the shared factor of methods that choose per layer (roles.parquet;
as_lora_choices.parquet in runs written before it)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from fedsim.errors import ConfigError
from fedsim.methods.base import get_method
from fedsim.metrics.tables import LEGACY_CHOICES_FILE, ROLES_FILE
from fedsim.report.groups import Group
from fedsim.report.plots import Namer, Plot, TableReader, legend_below, new_figure, panel_title, save
from fedsim.types import Role

FACTOR_COLORS = {"A": "#1f77b4", "B": "#ff7f0e"}


def short_layers(layers: Sequence[str]) -> dict[str, str]:
    """Layer paths without their common dotted prefix (a leading block index keeps its parent name):
    ``bert.encoder.layer.0.attention.self.query`` -> ``layer.0.attention.self.query``."""
    parts = [name.split(".") for name in layers]
    if len(parts) < 2:
        return {name: ".".join(name.split(".")[-3:]) for name in layers}
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    if common and any(p[common].isdigit() for p in parts):
        common -= 1
    return {name: ".".join(p[common:]) for name, p in zip(layers, parts, strict=True)}


def group_title(g: Group) -> str:
    return f"{g.method} · privacy {g.privacy} · {panel_title(g.panel_key)}"


def latest_similarity(table: dict[str, list]) -> dict[tuple[str, str], float]:
    """``{(layer, factor): similarity}`` at the latest round in which that factor of that layer was recorded."""
    latest: dict[tuple[str, str], tuple[int, float]] = {}
    for t, layer, factor, sim in zip(table["round"], table["layer"], table["factor"], table["similarity"], strict=True):
        if sim is None or (isinstance(sim, float) and math.isnan(sim)):
            continue
        key = (layer, factor)
        if key not in latest or t >= latest[key][0]:
            latest[key] = (int(t), float(sim))
    return {k: v for k, (_, v) in latest.items()}


def similarity_plots(groups: Sequence[Group], out: Path, names: Namer, read: TableReader) -> list[Plot]:
    """Per setting with similarity.parquet: mean pairwise cosine similarity across clients, per layer,
    A next to B (latest round each factor was trained; mean over the seeds that recorded it)."""
    plots = []
    for g in groups:
        per_run = [latest_similarity(t) for r in g.runs if (t := read(r["path"], "similarity"))]
        if not any(per_run):
            continue
        keys = sorted({k for s in per_run for k in s})
        layers = sorted({layer for layer, _ in keys})
        short = short_layers(layers)
        fig = new_figure(7.5, 1.9 + 0.42 * len(layers))
        ax = fig.subplots()
        for i, factor in enumerate(("A", "B")):
            ys, xs = [], []
            for j, layer in enumerate(layers):
                vals = [s[(layer, factor)] for s in per_run if (layer, factor) in s]
                if vals:
                    ys.append(j + (i - 0.5) * 0.4)
                    xs.append(statistics.fmean(vals))
            if xs:
                ax.barh(ys, xs, 0.38, color=FACTOR_COLORS[factor], label=f"{factor}", edgecolor="0.3", lw=0.5)
        ax.set_yticks(range(len(layers)), [short[x] for x in layers], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_xlabel("mean pairwise cosine similarity across clients")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"A vs B cross-client similarity\n{group_title(g)}", fontsize=10)
        fig.legend(**legend_below(2), title="factor")
        file = names("similarity", g.method, g.privacy, g.task, g.partition, *(f"{k}={v}" for k, v in g.extras))
        save(fig, out / file)
        caption = (
            f"Latest round in which each factor was trained; mean over {len(per_run)} seed(s). "
            "Higher = clients' factors more alike."
        )
        plots.append(Plot("similarity", group_title(g), file, caption))
    return plots


def shared_factors(path: str, read: TableReader) -> dict[str, list[Any]] | None:
    """``{"round", "layer", "factor"}`` columns of the factor each layer SHARED in each round of a run, from its
    roles table (or the as_lora_choices table of runs written before it); None if it has neither."""
    roles = read(path, ROLES_FILE.removesuffix(".parquet"))
    if roles is None or "role" not in roles:
        return read(path, LEGACY_CHOICES_FILE.removesuffix(".parquet"))
    keep = [i for i, role in enumerate(roles["role"]) if role == Role.SHARED.value]
    return {c: [roles[c][i] for i in keep] for c in ("round", "layer", "factor")}


def _chooses_per_layer(method: str) -> bool:
    try:
        return get_method(method).capabilities.per_layer_choices
    except ConfigError:  # a method this version does not know
        return False


def choice_plots(groups: Sequence[Group], out: Path, names: Namer, read: TableReader) -> list[Plot]:
    """Per setting of a method that chooses its shared factor per layer (``capabilities.per_layer_choices``):
    heatmap layers x rounds of the factor shared (A or B), for the setting's lowest seed that has the table."""
    plots = []
    for g in groups:
        if not _chooses_per_layer(g.method):
            continue
        found = next(((r, t) for r in g.runs if (t := shared_factors(r["path"], read)) and t["round"]), None)
        if found is None:
            continue
        run, table = found
        rounds = sorted(set(table["round"]))
        layers = sorted(set(table["layer"]))
        grid = np.full((len(layers), len(rounds)), np.nan)
        li, ri = {x: i for i, x in enumerate(layers)}, {x: i for i, x in enumerate(rounds)}
        for t, layer, factor in zip(table["round"], table["layer"], table["factor"], strict=True):
            grid[li[layer], ri[t]] = 0.0 if factor == "A" else 1.0
        short = short_layers(layers)
        fig = new_figure(7.5 + min(0.15 * len(rounds), 7.5), 2.1 + 0.36 * len(layers))
        ax = fig.subplots()
        cmap = ListedColormap([FACTOR_COLORS["A"], FACTOR_COLORS["B"]])
        ext = (rounds[0] - 0.5, rounds[-1] + 0.5, len(layers) - 0.5, -0.5)
        ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest", extent=ext)
        ax.set_yticks(range(len(layers)), [short[x] for x in layers], fontsize=8)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"Shared factor per layer and round (seed {run['seed']})\n{group_title(g)}", fontsize=10)
        legend = [Patch(color=FACTOR_COLORS[f], label=f"{f} shared") for f in ("A", "B")]
        fig.legend(handles=legend, **legend_below(2))
        file = names("choices", g.privacy, g.task, g.partition, *(f"{k}={v}" for k, v in g.extras))
        save(fig, out / file)
        caption = f"Which factor each layer shared (uploaded) in each round; seed {run['seed']} (`{run['path']}`)."
        plots.append(Plot("choices", group_title(g), file, caption))
    return plots
