"""Report figures over runs: accuracy vs round, epsilon spent vs round, bytes communicated per method.

The accuracy figure shows each method's meaningful accuracy (:func:`accuracy_column`): the personalised one for
methods whose clients keep state between rounds (their global model is not what they train), the global one
otherwise; the legend says which.

matplotlib's object API only (``Figure`` on an Agg canvas; no pyplot, no global backend switch); PNGs
at :data:`DPI` with no timestamp or version metadata, so the same inputs give the same files. Each function returns the
:class:`Plot` entries it wrote (file names are relative to the report folder).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedsim.errors import ConfigError
from fedsim.report.groups import Group, show_value

DPI = 120
TableReader = Callable[[str, str], "dict[str, list[Any]] | None"]  # (run path, table name) -> columns
GLOBAL_ACCURACY, PERSONAL_ACCURACY = "eval_accuracy", "personal_accuracy"  # rounds.parquet columns
PERSONAL_SUFFIX = " (personalised)"  # legend mark of a curve that shows the personalised accuracy
Namer = Callable[..., str]  # slug parts -> a unique file name (".png" added)


@dataclass(frozen=True)
class Plot:
    section: str  # report section the figure belongs to
    title: str
    file: str  # file name inside the report folder
    caption: str


def new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot, no global backend switch)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> None:
    """PNG at DPI, without the Software / date metadata (reproducible bytes)."""
    fig.savefig(path, dpi=DPI, metadata={"Software": None})


def legend_below(entries: int) -> dict[str, Any]:
    """Keyword arguments for a figure legend under the axes (never over titles or data)."""
    return {"loc": "outside lower center", "ncols": max(1, min(entries, 5)), "fontsize": 9, "title_fontsize": 9}


def method_colors(groups: Iterable[Group]) -> dict[str, Any]:
    """A fixed colour per method name (same colour in every figure of a report)."""
    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted({g.method for g in groups}))}


def panel_title(panel_key: tuple[Any, ...]) -> str:
    """``task · partition`` plus the extra settings ``key=value``."""
    task, partition, extras = panel_key
    return " · ".join([task, partition, *(f"{k}={v}" for k, v in extras)])


def by_panel(groups: Sequence[Group]) -> list[tuple[tuple[Any, ...], list[Group]]]:
    """Groups bucketed by (task, partition, extras), keeping the report order."""
    out: dict[tuple[Any, ...], list[Group]] = {}
    for g in groups:
        out.setdefault(g.panel_key, []).append(g)
    return list(out.items())


def by_privacy(groups: Sequence[Group]) -> list[tuple[str, list[Group]]]:
    out: dict[str, list[Group]] = {}
    for g in groups:  # groups come sorted by privacy setting within a panel
        out.setdefault(g.privacy, []).append(g)
    return list(out.items())


def series(table: dict[str, list[Any]] | None, column: str, scale: float = 1.0) -> dict[int, float]:
    """``{round: value}`` of one rounds.parquet column, rounds without a value left out."""
    if not table or column not in table:
        return {}
    out = {}
    for t, v in zip(table["round"], table[column], strict=True):
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[int(t)] = float(v) * scale
    return out


def keeps_client_state(method: str) -> bool:
    """The method's declared ``capabilities.keeps_client_state``; False for a name the registry does not know
    (e.g. an old run of a removed method)."""
    from fedsim.methods.base import get_method  # the registry imports torch: only when a report asks

    try:
        return bool(get_method(method).capabilities.keeps_client_state)
    except ConfigError:
        return False


def accuracy_column(method: str) -> str:
    """The rounds.parquet column with ``method``'s meaningful accuracy: ``personal_accuracy`` (each client's
    personalised model on its own held-out examples, pooled) for methods whose clients keep state between rounds,
    whose global model lacks the kept tensors; ``eval_accuracy`` (the global model on the global test split)
    otherwise."""
    return PERSONAL_ACCURACY if keeps_client_state(method) else GLOBAL_ACCURACY


def mean_band(runs: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Per round over the runs that have it: rounds, mean, sample std (0 where one run)."""
    rounds = sorted({t for s in runs for t in s})
    means, stds = [], []
    for t in rounds:
        vals = [s[t] for s in runs if t in s]
        means.append(statistics.fmean(vals))
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return rounds, means, stds


def _round_panels(
    groups: Sequence[Group],
    out: Path,
    names: Namer,
    read: TableReader,
    *,
    column: str | Callable[[Group], str],
    scale: float,
    ylabel: str,
    what: str,
    section: str,
    target_line: bool,
    colors: dict[str, Any],
) -> list[Plot]:
    """One figure per (task, partition, extras); one panel per privacy setting; one line per method
    (mean over seeds) with a ±std band. ``column``: the rounds.parquet column, or a function of the group giving
    it; a line from ``personal_accuracy`` is labelled ``<method> (personalised)`` in the legend."""
    column_of = column if callable(column) else (lambda _group: column)
    plots = []
    for key, panel_groups in by_panel(groups):
        panels = [
            (p, [(g, [series(read(r["path"], "rounds"), column_of(g), scale) for r in g.runs]) for g in gs])
            for p, gs in by_privacy(panel_groups)
        ]
        panels = [(p, [(g, s) for g, s in lines if any(s)]) for p, lines in panels]
        panels = [(p, lines) for p, lines in panels if lines]
        if not panels:
            continue
        fig = new_figure(1.0 + 4.4 * len(panels), 4.2)
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        handles: dict[str, Any] = {}
        for ax, (privacy, lines) in zip(axes, panels, strict=True):
            for g, runs in lines:
                x, m, sd = mean_band([s for s in runs if s])
                (h,) = ax.plot(x, m, color=colors[g.method], marker="o" if len(x) < 15 else None, ms=3, lw=1.6)
                if any(sd):
                    lo = [a - b for a, b in zip(m, sd, strict=True)]
                    hi = [a + b for a, b in zip(m, sd, strict=True)]
                    ax.fill_between(x, lo, hi, color=colors[g.method], alpha=0.2, lw=0)
                label = g.method + (PERSONAL_SUFFIX if column_of(g) == PERSONAL_ACCURACY else "")
                handles.setdefault(label, h)
                if target_line and g.epsilon_target is not None:
                    ax.axhline(g.epsilon_target, color="0.4", ls="--", lw=1)
                    ax.set_ylim(bottom=0)
            ax.set_title(f"privacy: {privacy}", fontsize=10)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0].set_ylabel(ylabel)
        fig.suptitle(f"{what} — {panel_title(key)}", fontsize=11)
        fig.legend(list(handles.values()), list(handles), **legend_below(len(handles)), title="method")
        file = names(section, *(show_value(k) for k in key[:2]), *(f"{k}={v}" for k, v in key[2]))
        save(fig, out / file)
        plots.append(Plot(section, panel_title(key), file, f"{what}: mean over seeds, band = ±1 std."))
    return plots


ACCURACY_CAPTION = (
    "Accuracy vs round: each method's meaningful accuracy, mean over seeds, band = ±1 std. For methods whose "
    "clients keep state between rounds (marked *(personalised)* in the legend; their global model lacks the "
    "tensors the clients keep) it is each client's personalised model on its own held-out examples, pooled "
    "(`personal_accuracy`); for the others it is the global model on the global test split (`eval_accuracy`). "
    "The two are measured on different examples."
)


def accuracy_plots(groups: Sequence[Group], out: Path, names: Namer, read: TableReader) -> list[Plot]:
    """Accuracy (%) vs round per method, the method's meaningful accuracy (:func:`accuracy_column`: personalised
    for methods whose clients keep state, global otherwise); one panel per privacy setting."""

    def column(g: Group) -> str:  # a keeps-state method's runs without personalised evaluation: the global curve
        col = accuracy_column(g.method)
        if col == PERSONAL_ACCURACY and not any(series(read(r["path"], "rounds"), col) for r in g.runs):
            return GLOBAL_ACCURACY
        return col

    plots = _round_panels(
        groups, out, names, read, column=column, scale=100.0, ylabel="accuracy (%)",
        what="Accuracy vs round", section="accuracy", target_line=False, colors=method_colors(groups),
    )  # fmt: skip
    return [Plot(p.section, p.title, p.file, ACCURACY_CAPTION) for p in plots]


def epsilon_plots(groups: Sequence[Group], out: Path, names: Namer, read: TableReader) -> list[Plot]:
    """epsilon_max (largest client epsilon so far) vs round for the DP groups; dashed line = target."""
    dp = [g for g in groups if g.privacy_mode != "none"]
    return _round_panels(
        dp, out, names, read, column="epsilon_max", scale=1.0, ylabel="ε spent (max over clients)",
        what="Privacy spent vs round", section="epsilon", target_line=True, colors=method_colors(groups),
    )  # fmt: skip


def bytes_plots(groups: Sequence[Group], out: Path, names: Namer) -> list[Plot]:
    """Bar chart per (task, partition, extras): MB up + down per run (mean over seeds) per method,
    one bar per privacy setting."""
    from fedsim.report.tables import group_stats

    plots = []
    for key, panel_groups in by_panel(groups):
        methods = sorted({g.method for g in panel_groups})
        settings = by_privacy(panel_groups)
        values = {(g.privacy, g.method): group_stats(g).megabytes for g in panel_groups}
        if all(v is None for v in values.values()):
            continue
        width = 0.8 / len(settings)
        cmap = matplotlib.colormaps["Set2"]
        fig = new_figure(max(5.0, 1.8 + 1.1 * len(methods) * max(1.0, len(settings) * 0.6)), 4.4)
        ax = fig.subplots()
        for i, (privacy, _) in enumerate(settings):
            xs = [j + (i - (len(settings) - 1) / 2) * width for j in range(len(methods))]
            ys = [values.get((privacy, m)) or 0.0 for m in methods]
            bars = ax.bar(xs, ys, width * 0.95, color=cmap(i % 8), label=privacy, edgecolor="0.3", lw=0.5)
            ax.bar_label(bars, labels=[f"{y:.3g}" if y else "" for y in ys], fontsize=7, padding=2)
        ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
        ax.set_ylabel("MB up + down per run")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"Communication — {panel_title(key)}", fontsize=11)
        fig.legend(**legend_below(len(settings)), title="privacy")
        file = names("bytes", *(show_value(k) for k in key[:2]), *(f"{k}={v}" for k, v in key[2]))
        save(fig, out / file)
        caption = "Total bytes uploaded + downloaded by all clients over a run (10^6 bytes), mean over seeds."
        plots.append(Plot("bytes", panel_title(key), file, caption))
    return plots
