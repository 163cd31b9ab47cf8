"""The report's Markdown tables: results per setting (mean ± std over seeds) and one row per run/cell.

Accuracies are shown in percent with two decimals; std is the sample standard deviation (n - 1)
over the seeds, shown only when a setting has two or more seeds with a value.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedsim.report.groups import Group, privacy_label

MB = 1e6


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample std) of the non-None values; (None, None) if none; std None for a single value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


@dataclass(frozen=True)
class GroupStats:
    n: int
    final: tuple[float | None, float | None]
    best: tuple[float | None, float | None]
    local: tuple[float | None, float | None]  # final accuracy on the clients' own held-out examples
    epsilon_spent: float | None
    wall_s: float | None
    megabytes: float | None  # bytes up + down per run, mean over seeds, in MB (10^6 bytes)


def _total_bytes(r: dict[str, Any]) -> float | None:
    if r.get("bytes_up") is None or r.get("bytes_down") is None:
        return None
    return (r["bytes_up"] + r["bytes_down"]) / MB


def group_stats(g: Group) -> GroupStats:
    """Mean ± std over the group's seeds (None values left out of each statistic)."""
    return GroupStats(
        n=len(g.runs),
        final=mean_std([r["final_accuracy"] for r in g.runs]),
        best=mean_std([r["best_accuracy"] for r in g.runs]),
        local=mean_std([r.get("final_local_accuracy") for r in g.runs]),
        epsilon_spent=mean_std([r["epsilon_spent"] for r in g.runs])[0],
        wall_s=mean_std([r["wall_s"] for r in g.runs])[0],
        megabytes=mean_std([_total_bytes(r) for r in g.runs])[0],
    )


def cell(text: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_pct(ms: tuple[float | None, float | None]) -> str:
    mean, std = ms
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def fmt_num(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> str:
    """A GitHub-flavoured Markdown table (``right[i]``: right-align column i)."""
    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(groups: Sequence[Group], extra_keys: Sequence[str]) -> str:
    """One row per setting: task, partition, extra keys, privacy, method, n seeds, final and best global
    accuracy and final local accuracy (clients' own held-out examples; the personalised model for methods that
    keep client state) (mean ± std, %), mean epsilon spent, mean wall time per run, mean MB up + down per run."""
    header = [
        "Task",
        "Partition",
        *extra_keys,
        "Privacy",
        "Method",
        "Seeds",
        "Final acc. (%)",
        "Best acc. (%)",
        "Local acc. (%)",
        "ε spent",
        "Wall s / run",
        "MB up+down / run",
    ]
    right = [False, False, *[False] * len(extra_keys), False, False, True, True, True, True, True, True, True]
    rows = []
    for g in groups:
        s = group_stats(g)
        rows.append(
            [
                g.task,
                g.partition,
                *(dict(g.extras + g.tuned)[k] for k in extra_keys),
                g.privacy,
                g.method,
                s.n,
                fmt_pct(s.final),
                fmt_pct(s.best),
                fmt_pct(s.local),
                fmt_num(s.epsilon_spent, ".3g"),
                fmt_num(s.wall_s, ".1f"),
                fmt_num(s.megabytes, ".3g"),
            ]
        )
    return markdown_table(header, rows, right)


def runs_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per run / sweep cell (complete or not): wall time, accuracy, epsilon and where it lies."""
    header = ["Cell", "Task", "Partition", "Privacy", "Method", "Seed", "Status", "Final acc. (%)", "ε spent"]
    header += ["Wall s", "Run directory"]
    right = [False] * 5 + [True, False, True, True, True, False]
    rows = []
    for r in records:
        mode = r.get("privacy_mode") or "none"
        rows.append(
            [
                r.get("cell") or "–",
                r.get("task") or "–",
                r.get("partition") or "–",
                privacy_label(mode, r.get("epsilon_target"), r.get("noise_multiplier")),
                r.get("method") or "–",
                "–" if r.get("seed") is None else r["seed"],
                r.get("status") or "–",
                fmt_pct((r.get("final_accuracy"), None)),
                fmt_num(r.get("epsilon_spent"), ".3g"),
                fmt_num(r.get("wall_s"), ".1f"),
                f"`{r['path']}`",
            ]
        )
    return markdown_table(header, rows, right)
