"""``fedsim report``: run and sweep directories -> ``<out>/report.md`` + PNG figures beside it.

The Markdown is deterministic (same inputs and machine string -> byte-identical file: no dates,
stable ordering, stable file names) and links its figures by relative path, so the folder can be
moved or committed as it is.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.errors import UserError
from fedsim.report.groups import group_records, per_setting_keys, slug
from fedsim.report.plots import Plot, accuracy_plots, bytes_plots, epsilon_plots
from fedsim.report.plots_adapters import choice_plots, similarity_plots
from fedsim.report.records import COMPLETE, load_records, read_run_table
from fedsim.report.tables import results_table, runs_table

STOPPED = "stopped"  # a search trial its scheduler stopped early (fedsim.sweep.search_run)

SECTIONS = (
    ("accuracy", "Accuracy vs round"),
    ("epsilon", "Privacy spent vs round"),
    ("bytes", "Communication"),
    ("similarity", "A-vs-B cross-client similarity"),
    ("choices", "AS-LoRA factor choices"),
)
NOTES = (
    "*Accuracy*: global held-out test accuracy (%); *final* = last evaluated round, *best* = best evaluated "
    "round; *local* = final accuracy on the clients' own held-out examples, pooled (the personalised model — "
    "global A, own B, own head — for FedSA-LoRA; the global model for the others); mean ± sample standard "
    "deviation (n − 1) over seeds (no ± with one seed). "
    "*ε spent*: the largest per-client ε (sample-level DP) or the run's ε (client-level DP) at the end of the "
    "run, mean over seeds. *Wall s / run*: wall time of one run (sweep cell), mean over seeds. "
    "*MB up+down / run*: bytes uploaded + downloaded by all clients over a run (10^6 bytes), mean over seeds."
)


def default_machine() -> str:
    """``Linux x86_64, 2 CPUs, Python 3.12.3`` for the machine this runs on."""
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


class _Names:
    """Unique PNG file names from slug parts (a numeric suffix on a clash)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, *parts: str) -> str:
        base = slug(*parts)
        name, i = f"{base}.png", 2
        while name in self.used:
            name, i = f"{base}-{i}.png", i + 1
        self.used.add(name)
        return name


class _Tables:
    """Cached per-run Parquet tables (each read once per report)."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], dict[str, list[Any]] | None] = {}

    def __call__(self, path: str, name: str) -> dict[str, list[Any]] | None:
        key = (path, name)
        if key not in self.cache:
            self.cache[key] = read_run_table(path, name)
        return self.cache[key]


def _inputs_lines(inputs: Sequence[Path], records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for raw in inputs:
        rows = [r for r in records if r["source"] == str(Path(raw))]
        done = sum(r["status"] == COMPLETE for r in rows)
        stopped = sum(r["status"] == STOPPED for r in rows)
        if any(r.get("search_metric") for r in rows):  # a search's trials
            what = f"search: {len(rows)} trials, {done} complete, {stopped} stopped early, "
            what += f"{len(rows) - done - stopped} not complete"
        elif (Path(raw) / "sweep.parquet").is_file():
            what = f"sweep: {len(rows)} cells, {done} complete, {len(rows) - done} not complete"
        else:
            what = "run"
        lines.append(f"  - `{raw}` ({what})")
    return lines


def render(
    inputs: Sequence[Path], records: Sequence[dict[str, Any]], table: str, extra_keys: Sequence[str],
    plots: Sequence[Plot], machine: str, machine_given: bool,
) -> str:  # fmt: skip
    """The report's Markdown text."""
    done = [r for r in records if r["status"] == COMPLETE]
    wall = sum(r["wall_s"] or 0.0 for r in done)
    where = "" if machine_given else " (where this report was built; the runs' wall times were measured where they ran)"
    lines = ["# fedsim report", "", "- Inputs:", *_inputs_lines(inputs, records)]
    lines += [f"- Machine: {machine}{where}"]
    lines += [f"- Runs: {len(done)} complete, {len(records) - len(done)} not complete; "]
    lines[-1] += f"total wall time of the complete runs {wall:.1f} s"
    lines += ["", "## Results", "", table, "", NOTES]
    if extra_keys:
        lines += ["", "Settings that differ between runs besides the seed (extra columns): "]
        lines[-1] += ", ".join(f"`{k}`" for k in extra_keys) + "."
        tuned = per_setting_keys(done, extra_keys)
        if tuned:
            lines[-1] += " Of these, " + ", ".join(f"`{k}`" for k in tuned) + " take one value per (task, partition, "
            lines[-1] += "privacy, method), e.g. learning rates tuned per method: they do not split the figures."
    for section, heading in SECTIONS:
        entries = [p for p in plots if p.section == section]
        if not entries:
            continue
        lines += ["", f"## {heading}"]
        for p in entries:
            alt = p.title.replace("[", "(").replace("]", ")")
            lines += ["", f"### {p.title}", "", f"![{alt}]({p.file})", "", p.caption]
    lines += ["", "## Runs", "", runs_table(records), ""]
    failed = [r for r in records if r["status"] != COMPLETE]
    if failed:
        lines += ["## Not complete", ""]
        for r in failed:
            error = " ".join(str(r.get("error") or "no summary.json (no error recorded)").split())
            if r["status"] == STOPPED:
                error = f"stopped early by the search's scheduler after round {r.get('stopped_at_round')}"
            lines.append(f"- `{r['cell']}` ({r['status']}, `{r['path']}`): {error[:300]}")
        lines.append("")
    return "\n".join(lines)


def _replace(text: str, shown: Mapping[str, str]) -> str:
    for local, name in shown.items():
        text = text.replace(local, name)
    return text


def make_report(
    inputs: Sequence[Path], out: Path, machine: str | None = None, shown: Mapping[str, str] | None = None
) -> Path:
    """Write ``out/report.md`` and its PNGs for the runs in ``inputs`` (run or sweep directories).

    Results table: final and best accuracy (mean ± std over seeds) per (task, partition, other
    varying settings, privacy, method), seeds, mean epsilon spent, mean wall time per run, mean MB.
    Figures: accuracy vs round (personalised for methods whose clients keep state, global otherwise) and
    epsilon vs round, bytes per method, and where recorded the A-vs-B
    similarity and AS-LoRA choices. ``machine`` names the machine in the report (default: this one).
    ``shown`` maps local folders to the names to print instead (the URIs of inputs downloaded to temporary
    folders), in the report and in error messages. Returns the path of report.md.

    Raises UserError (naming the path) for a missing input, a directory that is neither a run nor a
    sweep, unreadable run files, or when no input holds a complete run.
    """
    inputs = [Path(p) for p in inputs]
    shown = dict(shown or {})
    try:
        records = load_records(inputs)
    except UserError as err:
        raise UserError(_replace(str(err), shown)) from None
    groups, extra_keys = group_records(records)
    if not groups:
        names = _replace(", ".join(str(p) for p in inputs), shown)
        raise UserError(f"{names}: no complete run to report on (no run with summary.json); finish or rerun them")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names, read = _Names(), _Tables()
    plots = [
        *accuracy_plots(groups, out, names, read),
        *epsilon_plots(groups, out, names, read),
        *bytes_plots(groups, out, names),
        *similarity_plots(groups, out, names, read),
        *choice_plots(groups, out, names, read),
    ]
    text = render(inputs, records, results_table(groups, extra_keys), extra_keys, plots,
                  machine or default_machine(), machine is not None)  # fmt: skip
    text = _replace(text, shown)
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
