"""The ``fedsim`` command line: ``run``, ``resume``, ``sweep``, ``report``, ``presets``, ``validate``.

``main`` returns the exit status: 0 on success, 2 for any :class:`~fedsim.errors.UserError`
(printed to stderr as ``error: ...``; a ConfigError as a bulleted list of every problem) and
for bad command-line arguments. Other exceptions are not caught: they are bugs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedsim import __version__
from fedsim.config.load import config_to_dict, list_presets
from fedsim.errors import UserError
from fedsim.storage import (
    Location,
    parse_location,
)
from fedsim.validation import load_config

_SKIP = ("label", "out_dir")  # summary keys already printed elsewhere; None values are skipped too
# summary keys printed first (in this order) when present; the other scalar entries follow
_FIRST = ("final_eval_accuracy", "final_eval_loss", "final_personal_accuracy", "epsilon", "rounds", "wall_s")


def _add_config_args(p: argparse.ArgumentParser, *, optional: bool) -> None:
    p.add_argument(
        "config",
        nargs="?" if optional else None,
        default=None,
        metavar="PRESET|FILE.yaml",
        help="a preset name (see `fedsim presets`) or a YAML file" + (" [default: quickstart]" if optional else ""),
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set federation.rounds=20 (repeatable; values are YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="fedsim",
        description="Simulate federated LoRA fine-tuning (FedAvg-LoRA, FFA-LoRA, FedSA-LoRA, ...) with DP.",
    )
    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run a simulation", description="Run a simulation from a preset or YAML file.")
    _add_config_args(run, optional=True)
    run.add_argument(
        "--out",
        metavar="DIR|URI",
        help="output folder or s3:// / gs:// / file:// URI [default: runs/<label>-<YYYYmmdd-HHMMSS>]",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder given with --out")
    run.add_argument(
        "--tensorboard",
        action="store_true",
        help="print the `tensorboard --logdir` command for the run's tb/ event files at the end",
    )
    res = sub.add_parser(
        "resume",
        help="continue a stopped run from its newest checkpoint",
        description="Continue a killed or stopped run in RUN_DIR from its newest checkpoint (same results).",
    )
    res.add_argument("run_dir", metavar="RUN_DIR", help="the run folder or URI (holds config.yaml and checkpoints/)")
    sw = sub.add_parser(
        "sweep",
        help="run every cell of a sweep file (resumable)",
        description="Run a grid of configs, or a Ray Tune search (search: in the file); finished cells and trials "
        "are kept, so rerunning the command resumes.",
    )
    sw.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep file (base config, grid or search, rules)")
    sw.add_argument("--out", metavar="DIR|URI", help="sweep folder or URI [default: runs/sweeps/<sweep name>]")
    sw.add_argument(
        "--parallel",
        metavar="N|auto",
        help="cells at once (default: the sweep file's parallel, or 1); for a search: trials at once",
    )
    sw.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    rep = sub.add_parser(
        "report",
        help="Markdown + PNG report over runs and sweeps",
        description="Write report.md and plots for run folders and/or sweep folders.",
    )
    rep.add_argument("inputs", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run or sweep folders (or their URIs)")
    rep.add_argument("--out", metavar="DIR|URI", help="report folder [default: the single input, or runs/report]")
    rep.add_argument("--machine", metavar="TEXT", help="how to name the machine in the report [default: this one]")
    sub.add_parser("presets", help="list the shipped presets", description="List the shipped presets.")
    sub.add_parser(
        "methods",
        help="list the methods and what each supports",
        description="List the registered methods with their declared capabilities (what `validate` checks).",
    )
    val = sub.add_parser(
        "validate", help="check a config and print it resolved", description="Check a config; print it resolved."
    )
    _add_config_args(val, optional=False)
    return parser


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_summary(summary: Mapping[str, Any], out_dir: Path | Location) -> None:
    print(f"outputs: {out_dir}")
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k not in _SKIP}
    order = [k for k in _FIRST if k in scalars] + [k for k in scalars if k not in _FIRST]
    width = max((len(k) for k in order), default=0)
    for key in order:
        print(f"  {key.ljust(width)}  {_fmt(scalars[key])}")


def _cmd_run(args: argparse.Namespace) -> int:
    from fedsim.api import describe_run, execute_run, out_location

    cfg, label = load_config(args.config, args.overrides)
    out = out_location(args.out, label, args.overwrite)
    print(describe_run(cfg, label, out))
    result = execute_run(cfg, label, out)
    _print_summary(result.summary, out.local or out)
    if args.tensorboard:
        print(f"tensorboard: tensorboard --logdir {result.tb}")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from fedsim.api import resume

    result = resume(args.run_dir)
    loc = parse_location(args.run_dir, "RUN_DIR")
    _print_summary(result.summary, loc.local or loc)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.api import sweep, sweep_location
    from fedsim.sweep.runner import is_complete, sweep_folder
    from fedsim.sweep.spec import load_sweep

    if args.dry_run:
        spec = load_sweep(args.sweep_file)  # every config problem, before anything runs
        if spec.search is not None:
            _dry_run_search(spec, sweep_location(args.out, spec.name))
            return 0
        with sweep_folder(sweep_location(args.out, spec.name)) as folder:
            for cell in spec.cells:
                print(f"{'done' if is_complete(folder, cell) else 'todo'}  {cell.cell_id}")
        return 0
    parallel: int | str | None = None
    if args.parallel is not None:
        if args.parallel != "auto" and not (args.parallel.isdigit() and int(args.parallel) >= 1):
            raise UserError(f"--parallel: expected an integer >= 1 or auto, got {args.parallel!r}")
        parallel = args.parallel if args.parallel == "auto" else int(args.parallel)
    table = sweep(args.sweep_file, out=args.out, parallel=parallel)
    statuses = table.column("status").to_pylist() if "status" in table.column_names else []
    return 0 if all(s in ("complete", "stopped") for s in statuses) else 1  # stopped: a search stopped it early


def _dry_run_search(spec: Any, out: Location) -> None:
    """``fedsim sweep --dry-run`` of a search: what it samples, and the trials recorded so far in ``out``."""
    import pyarrow.parquet as pq

    s = spec.search
    print(f"search: {s.algorithm}, {s.samples} trials, {s.metric} ({s.mode}), scheduler {s.scheduler}")
    for key, dist in s.space.items():
        print(f"  {key}: {dist}")
    table = out.local / "sweep.parquet" if out.local is not None else None
    for row in pq.read_table(table).to_pylist() if table is not None and table.is_file() else []:
        print(f"{row['status']}  {row['cell']}")


def _cmd_report(args: argparse.Namespace) -> int:
    from fedsim.api import report

    print(f"report: {report(args.inputs, out=args.out, machine=args.machine)}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    presets = list_presets()
    width = max((len(name) for name, _ in presets), default=0)
    for name, desc in presets:
        print(f"{name.ljust(width)}  {desc}".rstrip())
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from fedsim.methods.base import all_capabilities

    caps = all_capabilities()
    width = max(len(name) for name in caps)
    print(f"{'method'.ljust(width)}  privacy modes        variants           aggregation  other")
    for name, c in caps.items():
        other = [w for w, on in (("signals", c.signals), ("per-layer choices", c.per_layer_choices),
                                 ("keeps client state", c.keeps_client_state),
                                 ("folds into base", c.folds_into_base),
                                 ("one client per pass", not c.batches)) if on]  # fmt: skip
        print(
            f"{name.ljust(width)}  {','.join(sorted(c.privacy_modes)).ljust(19)}  "
            f"{','.join(sorted(c.variants)).ljust(17)}  {('linear' if c.linear else 'buffered').ljust(11)}  "
            f"{', '.join(other)}".rstrip()
        )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg, label = load_config(args.config, args.overrides)
    print(f"ok: {label}")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _report(err: UserError) -> None:
    text = str(err).strip() or type(err).__name__
    print(f"error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsim`` console script; returns the exit status (see module doc)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    commands = {
        "run": _cmd_run,
        "resume": _cmd_resume,
        "sweep": _cmd_sweep,
        "report": _cmd_report,
        "presets": _cmd_presets,
        "methods": _cmd_methods,
        "validate": _cmd_validate,
    }
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return commands[args.command](args)
    except UserError as err:
        _report(err)
        return 2
