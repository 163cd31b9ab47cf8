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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from fedsim import __version__
from fedsim.config.load import config_to_dict, list_presets, load_config
from fedsim.errors import UserError
from fedsim.storage import (
    CONFIG,
    SPILL_DIR,
    SUMMARY,
    Location,
    RunMirror,
    is_uri,
    local_folder,
    local_location,
    parse_location,
    pull,
    push,
)

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
    res = sub.add_parser(
        "resume",
        help="continue a stopped run from its newest checkpoint",
        description="Continue a killed or stopped run in RUN_DIR from its newest checkpoint (same results).",
    )
    res.add_argument("run_dir", metavar="RUN_DIR", help="the run folder or URI (holds config.yaml and checkpoints/)")
    sw = sub.add_parser(
        "sweep",
        help="run every cell of a sweep file (resumable)",
        description="Run a grid of configs; finished cells are skipped, so rerunning the command resumes.",
    )
    sw.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep file (base config, grid, rules)")
    sw.add_argument("--out", metavar="DIR|URI", help="sweep folder or URI [default: runs/sweeps/<sweep name>]")
    sw.add_argument("--parallel", metavar="N|auto", help="cells at once (default: the sweep file's parallel, or 1)")
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


def _out_dir(out: str | None, label: str, overwrite: bool = False) -> Location:
    """The run's output location (``--out``: a local folder or a URI; default ``runs/<label>-<time>``).

    Raise UserError if it exists and is not empty (nothing is written), unless ``overwrite`` and it holds a run
    (config.yaml), which is then emptied; for a URI also when pyarrow cannot open it or its bucket is missing."""
    if out and is_uri(out):
        loc = parse_location(out, "--out")
        if loc.remote:
            _check_remote_out(loc, overwrite)
            return loc
        path = loc.local
    else:
        path = Path(out) if out else Path("runs") / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if overwrite and path.is_dir() and (path / "config.yaml").is_file():
            shutil.rmtree(path)
            return local_location(path)
        what = "is a file" if not path.is_dir() else "exists and is not empty"
        if path.is_dir() and (path / "config.yaml").is_file():
            state = "a finished run" if (path / "summary.json").is_file() else "a stopped run"
            hint = "" if (path / "summary.json").is_file() else f", `fedsim resume {path}` to continue it"
            raise UserError(
                f"output folder {path} holds {state}; refusing to overwrite; choose another --out, pass "
                f"--overwrite to replace it{hint}"
            )
        raise UserError(f"output folder {path} {what}; refusing to overwrite; choose another --out or delete it")
    return local_location(path)


def _check_remote_out(loc: Location, overwrite: bool) -> None:
    """The rule of :func:`_out_dir` for a remote ``--out``: empty, or a run (config.yaml) replaced on ``overwrite``."""
    if loc.is_file(CONFIG):
        if overwrite:
            loc.delete()
            return
        finished = loc.is_file(SUMMARY)
        state = "a finished run" if finished else "a stopped run"
        hint = "" if finished else f", `fedsim resume {loc}` to continue it"
        raise UserError(
            f"output {loc} holds {state}; refusing to overwrite; choose another --out, pass --overwrite to replace "
            f"it{hint}"
        )
    if loc.files():
        raise UserError(
            f"output {loc} exists and is not empty; refusing to overwrite; choose another --out or delete it"
        )


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
    cfg, label = load_config(args.config, args.overrides)
    out = _out_dir(args.out, label, args.overwrite)
    from fedsim.simulation import run_simulation  # heavy imports only when a run starts

    fe = cfg.federation
    print(
        f"fedsim run {label}: method {cfg.method.name}, model {cfg.model.name}, data {cfg.data.source}, "
        f"{fe.clients} clients ({fe.clients_per_round}/round), {fe.rounds} rounds, privacy {cfg.privacy.mode} "
        f"-> {out}"
    )
    if out.local is not None:
        summary = run_simulation(cfg, out.local, label=label)
    else:  # written into a node-local staging folder, mirrored to the URI as it goes
        with RunMirror.staged(out) as mirror:
            summary = run_simulation(cfg, mirror.folder, label=label, mirror=mirror)
    _print_summary(summary or {}, out.local or out)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    loc = parse_location(args.run_dir, "RUN_DIR")
    if loc.local is None:
        return _resume_remote(loc)
    run_dir = loc.local
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


def _resume_remote(loc: Location) -> int:
    """``fedsim resume URI``: download config.yaml, the tables and the checkpoint LATEST names into a staging
    folder, continue there and mirror to the URI."""
    if not loc.is_file(CONFIG):
        raise UserError(f"{loc}: not a run folder (no config.yaml); give the --out URI of a `fedsim run`")
    if loc.is_file(SUMMARY):
        raise UserError(f"{loc}: the run is already complete (summary.json exists); nothing to resume")
    from fedsim.simulation import run_simulation

    with RunMirror.staged(loc, resume=True) as mirror:
        cfg, _ = load_config(str(mirror.folder / CONFIG))
        found = mirror.folder / "checkpoints" / "LATEST"
        name = found.read_text(encoding="utf-8").strip() if found.is_file() else "the start (no checkpoint)"
        print(f"fedsim resume {loc}: from {name}")
        summary = run_simulation(cfg, mirror.folder, label=loc.name, resume=True, mirror=mirror)
    _print_summary(summary or {}, loc)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.sweep.runner import is_complete, run_sweep, sweep_folder
    from fedsim.sweep.spec import load_sweep

    spec = load_sweep(args.sweep_file)  # every config problem, before anything runs
    out = parse_location(args.out, "--out") if args.out else local_location(Path("runs") / "sweeps" / spec.name)
    if args.dry_run:
        with sweep_folder(out) as folder:
            for cell in spec.cells:
                print(f"{'done' if is_complete(folder, cell) else 'todo'}  {cell.cell_id}")
        return 0
    parallel: int | str | None = None
    if args.parallel is not None:
        if args.parallel != "auto" and not (args.parallel.isdigit() and int(args.parallel) >= 1):
            raise UserError(f"--parallel: expected an integer >= 1 or auto, got {args.parallel!r}")
        parallel = args.parallel if args.parallel == "auto" else int(args.parallel)
    rows = run_sweep(spec, out.local if out.local is not None else out, parallel=parallel)
    return 0 if all(r["status"] == "complete" for r in rows) else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from fedsim.report.build import make_report

    inputs = [parse_location(p, "RUN_OR_SWEEP_DIR") for p in args.inputs]
    if args.out:
        out = parse_location(args.out, "--out")
    else:
        out = inputs[0] if len(inputs) == 1 else local_location(Path("runs") / "report")
    if all(loc.local is not None for loc in [*inputs, out]):
        path = make_report([loc.local for loc in inputs], out.local, machine=args.machine)
        print(f"report: {path}")
        return 0
    with ExitStack() as stack:  # remote inputs: their tables, summaries and configs (no checkpoints) into temp dirs
        folders = [stack.enter_context(_report_input(loc)) for loc in inputs]
        out_folder = stack.enter_context(local_folder(out, prefix="fedsim-report-"))
        shown = {str(f): str(loc) for f, loc in zip(folders, inputs, strict=True) if loc.remote}
        path = make_report(folders, out_folder, machine=args.machine, shown=shown)
        if out.remote:
            push(out_folder, out)
            print(f"report: {out.child(path.name)}")
        else:
            print(f"report: {path}")
    return 0


@contextmanager
def _report_input(loc: Location) -> Iterator[Path]:
    """A local folder holding what the report reads of ``loc``: itself, or for a URI a temporary copy of its
    config.yaml, summary.json and Parquet tables (a sweep's cells too; no checkpoints, adapters or spill files)."""
    if loc.local is not None:
        yield loc.local
        return
    with local_folder(loc, prefix="fedsim-report-in-") as tmp:
        folder = tmp / loc.name  # the folder's name is the run's name in the report
        skip = {"checkpoints", "adapter", SPILL_DIR}

        def wanted(rel: str) -> bool:
            return not skip & set(rel.split("/")[:-1]) and rel.rsplit(".", 1)[-1] in ("parquet", "json", "yaml")

        if not pull(loc, folder, wanted):
            raise UserError(f"{loc}: not found (no run or sweep files there); give the --out URI of a run or sweep")
        yield folder


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
