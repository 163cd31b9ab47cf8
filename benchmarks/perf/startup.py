"""Where the seconds before round 1 go: a phase timeline of one small fedsim job, from interpreter start to the first
trained client and to process exit.

The job (``_common.small_job``): a 2-layer BERT of hidden size 64 (random weights, MiniLM's tokenizer) + LoRA r=8 on
query/value + trained head, FedAvg-LoRA, 100 clients of 64 synthetic examples, 10 per round, 5 rounds of 10 SGD
steps of batch 16, 32 tokens, Ray backend with two 1-CPU workers, no DP, no checkpoints
(``runtime.checkpoint_every: 0``). ``--fedsim-set KEY=VALUE`` changes any key.

Each run is a fresh subprocess (``python`` -> ``import fedsim`` -> ``config_from_dict`` -> ``run_simulation``, as
a script using fedsim's API does). Times are seconds since the subprocess was launched. The driver's phases come
from wrappers this script puts around fedsim's functions in the subprocess (data: ``load_source`` ..
``build_federated_data``; model blueprint: ``build_base_model`` .. ``blueprint_of``; ``ray.init``; round 1: the
first ``sample_cohort`` call); the actors' from Ray's own task events (``ray.timeline()``, read after the last round):
each actor's ``__init__`` (its process is up and its class imported), the workers' first ``ready`` (model built)
and the first ``train`` call that finished (the first trained client, as the driver's Ray sees it).

``--compare PATH [PATH ...]`` also runs the fedsim checkouts at PATH (e.g. the main branch) with the same job, in
rotation, ``--repeats`` times each, so the columns share the machine's conditions; the tables show medians (and the
first-client time's minimum, the least disturbed run on a shared machine).

    python benchmarks/perf/startup.py                          # this checkout, 3 runs
    python benchmarks/perf/startup.py --compare ../main        # side by side with another checkout
    python benchmarks/perf/startup.py --quick                  # one run, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
T0_ENV = "FEDSIM_STARTUP_T0"  # the launch time (time.time()) the parent hands to the subprocess

#: (label, key) rows of the timeline table: times in seconds since launch
TIMELINE = (
    ("driver imports done", "imports"),
    ("config validated", "validated"),
    ("ray.init starts", "ray_init.start"),
    ("ray.init done", "ray_init.end"),
    ("data read + tokenised", "data.end"),
    ("model blueprint ready", "model.end"),
    ("server / store actors up", "actors_up"),
    ("first worker process up", "worker_up"),
    ("all workers' models built", "workers_ready"),
    ("round 1 starts", "round1"),
    ("first client trained", "first_client"),
    ("run_simulation returns", "run_end"),
    ("process exit", "exit"),
)
#: (label, start key, end key) rows of the durations table
DURATIONS = (
    ("driver imports", "python", "imports"),
    ("config validation", "imports", "validated"),
    ("data (read, split, tokenise)", "data.start", "data.end"),
    ("model blueprint", "model.start", "model.end"),
    ("ray.init", "ray_init.start", "ray_init.end"),
    ("workers: process up -> model built", "worker_up", "workers_ready"),
    ("round 1 start -> first client trained", "round1", "first_client"),
)


# ----------------------------------------------------------------------------------------------- the subprocess


def _wrap(module: Any, name: str, key: str, marks: dict[str, float], t0: float, which: str = "both") -> None:
    """Record ``key.start`` (first call's start) and ``key.end`` (last call's end) of ``module.name``."""
    real = getattr(module, name, None)
    if real is None:
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault(f"{key}.start", time.time() - t0)
        try:
            return real(*args, **kwargs)
        finally:
            marks[f"{key}.end"] = time.time() - t0

    setattr(module, name, timed)


def actor_events(t0: float) -> dict[str, float]:
    """From Ray's task events: when each kind of actor call first started / finished (seconds since launch)."""
    import ray

    out: dict[str, float] = {}
    first_start: dict[str, float] = {}
    first_end: dict[str, float] = {}
    last_end: dict[str, float] = {}
    for ev in ray.timeline():
        cat = str(ev.get("cat", ""))
        if ev.get("ph") != "X" or not cat.startswith("task::"):
            continue
        name = cat[len("task::") :]
        start, end = ev["ts"] / 1e6 - t0, (ev["ts"] + ev["dur"]) / 1e6 - t0
        first_start[name] = min(first_start.get(name, start), start)
        first_end[name] = min(first_end.get(name, end), end)
        last_end[name] = max(last_end.get(name, end), end)
    inits = [v for k, v in first_end.items() if k.endswith("__init__") and "Worker" not in k]
    if inits:
        out["actors_up"] = max(inits)
    worker_init = [v for k, v in first_start.items() if "Worker" in k and k.endswith("__init__")]
    if worker_init:
        out["worker_up"] = min(worker_init)
    ready = [v for k, v in last_end.items() if "Worker" in k and k.endswith(".ready")]
    if ready:
        out["workers_ready"] = max(ready)
    trains = [v for k, v in first_end.items() if "Worker" in k and k.split(".")[-1] in ("train", "train_many")]
    if trains:
        out["first_client"] = min(trains)
    return out


def child(root: str, job: dict[str, Any], out_dir: Path, result: Path) -> int:
    """One run: imports, validation, run_simulation with phase wrappers; writes the marks to ``result``."""
    t0 = float(os.environ[T0_ENV])
    marks: dict[str, float] = {"python": time.time() - t0}
    sys.path.insert(0, root)  # the fedsim checkout under test comes first
    from fedsim.simulation import run_simulation
    from fedsim.validation import config_from_dict

    marks["imports"] = time.time() - t0
    cfg = config_from_dict(job)
    marks["validated"] = time.time() - t0

    import ray

    import fedsim.simulation as sim

    _wrap(ray, "init", "ray_init", marks, t0)
    for name, key in (
        ("load_source", "data"),
        ("build_federated_data", "data"),
        ("build_base_model", "model"),
        ("blueprint_of", "model"),
        ("sample_cohort", "cohort"),
    ):
        _wrap(sim, name, key, marks, t0)
    box: dict[str, float] = {}
    run_simulation(cfg, out_dir, label="startup", progress=False, inspect=lambda _b: box.update(actor_events(t0)))
    marks["run_end"] = time.time() - t0
    marks.update(box)
    if "cohort.start" in marks:
        marks["round1"] = marks["cohort.start"]
    assert str(Path(sim.__file__).resolve()).startswith(str(Path(root).resolve())), sim.__file__
    result.write_text(json.dumps(marks, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------- the parent


def run_once(root: Path, job: dict[str, Any], work: Path, tag: str, env: dict[str, str]) -> dict[str, float]:
    """One fresh subprocess for the checkout at ``root``; its marks plus ``exit``."""
    result = work / f"{tag}.json"
    run_dir = work / f"{tag}-run"
    (work / f"{tag}-job.json").write_text(json.dumps(job))
    code = (
        "import sys, startup; sys.exit(startup.child("
        f"{str(root)!r}, __import__('json').load(open({str(work / f'{tag}-job.json')!r})), "
        f"startup.Path({str(run_dir)!r}), startup.Path({str(result)!r})))"
    )
    path = os.pathsep.join([str(root), str(HERE)])  # the actors import fedsim from root too
    t0 = time.time()
    env = {**env, T0_ENV: repr(t0), "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(HERE))
    end = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the run of {root} failed (exit {proc.returncode}); see its output above")
    marks = json.loads(result.read_text())
    marks["exit"] = end
    return marks


def _median(runs: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per checkout (alternating); medians are shown")
    ap.add_argument(
        "--compare", type=Path, nargs="+", default=[], metavar="PATH", help="other fedsim checkouts, run alternately"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fedsim-set", action="append", default=[], metavar="KEY=VALUE", help="override a job key")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a folder under .cache/)")
    ap.add_argument("--quick", action="store_true", help="one run, 2 rounds")
    if ap.parse_args(argv).quick:
        ap.set_defaults(repeats=1, rounds=2)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _common import ROOT, markdown_table, parse_sets, set_run_env, small_job

    env = set_run_env()
    job = {**small_job(rounds=args.rounds), **parse_sets(args.fedsim_set)}
    (ROOT / ".cache").mkdir(exist_ok=True)
    work = args.out or Path(tempfile.mkdtemp(prefix="fedsim-startup-", dir=ROOT / ".cache"))
    work.mkdir(parents=True, exist_ok=True)
    roots = [("this checkout", ROOT)] + [(str(path), path.resolve()) for path in args.compare]
    print(
        f"BERT 2x64 + LoRA r=8, FedAvg-LoRA, {job['federation.clients']} clients x 64 synthetic examples, cohort "
        f"{job['federation.clients_per_round']}, {job['federation.rounds']} rounds x {job['federation.local_steps']} "
        f"steps of {job['federation.batch_size']}, {job['runtime.workers']} Ray workers x "
        f"{job['runtime.cpus_per_worker']:g} CPU; {args.repeats} run(s) per checkout; overrides: "
        f"{parse_sets(args.fedsim_set) or 'none'}.\n",
        flush=True,
    )
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in roots}
    for i in range(args.repeats):
        order = roots[i % len(roots) :] + roots[: i % len(roots)]  # rotate: each checkout goes first in turn
        for name, root in order:
            runs[name].append(run_once(root, job, work, f"run{i}-{roots.index((name, root))}", env))
            print(f"done: {name}, run {i + 1} ({runs[name][-1]['exit']:.1f} s)", flush=True)
    names = [name for name, _ in roots]
    rows = [[label, *(_fmt(_median(runs[n], key)) for n in names)] for label, key in TIMELINE]
    print("\nTimeline (seconds since the process was launched; medians):\n")
    print(markdown_table(["event", *names], rows, tuple(range(1, len(names) + 1))))
    drows = []
    for label, a, b in DURATIONS:
        cells = []
        for n in names:
            ends, starts = _median(runs[n], b), _median(runs[n], a)
            cells.append(_fmt(None if ends is None or starts is None else ends - starts))
        drows.append([label, *cells])
    print("\nPhases (seconds; they overlap where the work runs concurrently):\n")
    print(markdown_table(["phase", *names], drows, tuple(range(1, len(names) + 1))))
    best = [_fmt(min((r["first_client"] for r in runs[n] if "first_client" in r), default=None)) for n in names]
    print(f"\nfirst client trained, fastest run: {', '.join(f'{n} {b} s' for n, b in zip(names, best, strict=True))}")
    print(f"\nraw marks: {work}/run*.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
