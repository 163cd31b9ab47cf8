"""The ``fedsim`` command line: ``run``, ``resume``, ``sweep``, ``report``, ``presets``, ``validate``.

``main`` returns the exit status: 0 on success, 2 for any :class:`~fedsim.errors.UserError`
(printed to stderr as ``error: ...``; a ConfigError as a bulleted list of every problem) and
for bad command-line arguments. Other exceptions are not caught: they are bugs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedsim import __version__
from fedsim.config.load import config_to_dict, list_presets, load_config
from fedsim.errors import UserError

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
    run.add_argument("--out", metavar="DIR", help="output folder [default: runs/<label>-<YYYYmmdd-HHMMSS>]")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder given with --out")
    res = sub.add_parser(
        "resume",
        help="continue a stopped run from its newest checkpoint",
        description="Continue a killed or stopped run in RUN_DIR from its newest checkpoint (same results).",
    )
    res.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (holds config.yaml and checkpoints/)")
    sw = sub.add_parser(
        "sweep",
        help="run every cell of a sweep file (resumable)",
        description="Run a grid of configs; finished cells are skipped, so rerunning the command resumes.",
    )
    sw.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep file (base config, grid, rules)")
    sw.add_argument("--out", metavar="DIR", help="sweep folder [default: runs/sweeps/<sweep name>]")
    sw.add_argument("--parallel", metavar="N|auto", help="cells at once (default: the sweep file's parallel, or 1)")
    sw.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    rep = sub.add_parser(
        "report",
        help="Markdown + PNG report over runs and sweeps",
        description="Write report.md and plots for run folders and/or sweep folders.",
    )
    rep.add_argument("inputs", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run folders or sweep folders")
    rep.add_argument("--out", metavar="DIR", help="report folder [default: the single input, or runs/report]")
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


def _out_dir(out: str | None, label: str, overwrite: bool = False) -> Path:
    """The run folder; raise UserError if it exists and is not an empty folder (nothing is written), unless
    ``overwrite`` and it is a run folder (holds config.yaml), which is then emptied."""
    path = Path(out) if out else Path("runs") / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if overwrite and path.is_dir() and (path / "config.yaml").is_file():
            shutil.rmtree(path)
            return path
        what = "is a file" if not path.is_dir() else "exists and is not empty"
        if path.is_dir() and (path / "config.yaml").is_file():
            state = "a finished run" if (path / "summary.json").is_file() else "a stopped run"
            hint = "" if (path / "summary.json").is_file() else f", `fedsim resume {path}` to continue it"
            raise UserError(
                f"output folder {path} holds {state}; refusing to overwrite; choose another --out, pass "
                f"--overwrite to replace it{hint}"
            )
        raise UserError(f"output folder {path} {what}; refusing to overwrite; choose another --out or delete it")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_summary(summary: Mapping[str, Any], out_dir: Path) -> None:
    print(f"outputs: {out_dir}")
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k not in _SKIP}
    order = [k for k in _FIRST if k in scalars] + [k for k in scalars if k not in _FIRST]
    width = max((len(k) for k in order), default=0)
    for key in order:
        print(f"  {key.ljust(width)}  {_fmt(scalars[key])}")


def _cmd_run(args: argparse.Namespace) -> int:
    cfg, label = load_config(args.config, args.overrides)
    out_dir = _out_dir(args.out, label, args.overwrite)
    from fedsim.simulation import run_simulation  # heavy imports only when a run starts

    fe = cfg.federation
    print(
        f"fedsim run {label}: method {cfg.method.name}, model {cfg.model.name}, data {cfg.data.source}, "
        f"{fe.clients} clients ({fe.clients_per_round}/round), {fe.rounds} rounds, privacy {cfg.privacy.mode} "
        f"-> {out_dir}"
    )
    summary = run_simulation(cfg, out_dir, label=label)
    _print_summary(summary or {}, out_dir)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml); give the --out folder of a `fedsim run`")
    if (run_dir / "summary.json").is_file():
        raise UserError(f"{run_dir}: the run is already complete (summary.json exists); nothing to resume")
    cfg, _ = load_config(str(run_dir / "config.yaml"))
    from fedsim.server.checkpoint import latest_checkpoint_dir
    from fedsim.simulation import run_simulation

    found = latest_checkpoint_dir(run_dir)
    print(f"fedsim resume {run_dir}: from {found.name if found else 'the start (no checkpoint)'}")
    summary = run_simulation(cfg, run_dir, label=run_dir.name, resume=True)
    _print_summary(summary or {}, run_dir)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.sweep.runner import is_complete, run_sweep
    from fedsim.sweep.spec import load_sweep

    spec = load_sweep(args.sweep_file)  # every config problem, before anything runs
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / spec.name
    if args.dry_run:
        for cell in spec.cells:
            print(f"{'done' if is_complete(out, cell) else 'todo'}  {cell.cell_id}")
        return 0
    parallel: int | str | None = None
    if args.parallel is not None:
        if args.parallel != "auto" and not (args.parallel.isdigit() and int(args.parallel) >= 1):
            raise UserError(f"--parallel: expected an integer >= 1 or auto, got {args.parallel!r}")
        parallel = args.parallel if args.parallel == "auto" else int(args.parallel)
    rows = run_sweep(spec, out, parallel=parallel)
    return 0 if all(r["status"] == "complete" for r in rows) else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from fedsim.report.build import make_report

    inputs = [Path(p) for p in args.inputs]
    out = Path(args.out) if args.out else (inputs[0] if len(inputs) == 1 else Path("runs") / "report")
    path = make_report(inputs, out, machine=args.machine)
    print(f"report: {path}")
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
                                 ("keeps client state", c.keeps_client_state)) if on]  # fmt: skip
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
