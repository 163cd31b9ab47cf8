"""Population scaling: seconds per round and peak memory of the whole Ray job at 1,000 / 10,000 / 100,000 clients.

tiny-bert + synthetic data, cohort 100, 3 rounds, Ray backend (2 workers x 1 CPU), FedSA-LoRA (every client keeps
its B in the ClientStore, so the store sees every participant). Per-client data is FIXED (``--examples-per-client``,
default 8, iid shards of exactly that size) and the global test set is fixed too (``--test-examples``, evaluated
only after the last round; no personal holdouts), so only the population grows: the synthetic dataset holds
``population x examples_per_client + test_examples`` examples (800,256 at 100,000 clients), all tokenised up front
by fedsim's data layer. The issue's claim is that a round's cost depends on the cohort, not the population.

Each population runs in a fresh subprocess (``run_simulation`` into ``--out/pop-<N>``). A background thread of
this (parent) process samples, every ``--interval`` seconds, the resident set size (RSS) of the subprocess and
every descendant (the driver, Ray's gcs_server / raylet / agents, the worker, parameter-server and client-store
actors) with psutil, and their proportional set size (PSS, which splits shared pages such as the object store's
between the processes that map them, so it does not double count) every 5th sample. Reported: the peak of the sum,
and the split of that sum by process kind at the RSS peak. Seconds per round come from rounds.parquet ``wall_s``
(from the previous round's completed row to this round's, the previous round's recording included):
round 1 includes the worker actors' start (model build), so the headline is the median over rounds 2.. (the
last of which also holds the one evaluation); every round's time is printed too. Targets: at 100,000 both peak RSS
and seconds per round within 1.5x of 1,000 (issue 6), peak RSS within 1.2x (issue 15).

    python benchmarks/perf/scale.py                                 # 1,000 / 10,000 / 100,000 (idle machine)
    python benchmarks/perf/scale.py --quick                         # smoke test: 1,000 clients, cohort 20, 2 rounds
    python benchmarks/perf/scale.py --populations 1000 10000 --store-mb 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, markdown_table, read_table, set_run_env  # noqa: E402

MiB = 1024 * 1024
KINDS = ("driver", "workers", "server + store", "ray system")


def scale_job(population: int, args: argparse.Namespace) -> dict[str, Any]:
    """The fedsim config (dotted keys) for one population."""
    total = population * args.examples_per_client + args.test_examples
    job: dict[str, Any] = {
        "seed": 0,
        "model.name": "tiny-bert",
        "data.source": "synthetic",
        "data.synthetic_examples": total,
        "data.synthetic_classes": 4,
        "data.max_length": args.max_length,
        "data.test_fraction": args.test_examples / total,
        "data.personal_fraction": 0.0,
        "data.partition.kind": "iid",
        "federation.clients": population,
        "federation.clients_per_round": args.cohort,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.batch_size": args.batch_size,
        "federation.eval_every": args.rounds,  # only the last round evaluates
        "method.name": args.method,
        "privacy.mode": "none",
        "runtime.backend": "ray",
        "runtime.workers": args.workers,
        "runtime.cpus_per_worker": 1.0,
        "runtime.checkpoint_every": args.checkpoint_every,
    }
    if args.store_mb is not None:
        job["runtime.client_store.memory_mb"] = args.store_mb
    return job


def has_store_budget() -> bool:
    """Whether this fedsim has ``runtime.client_store.memory_mb`` (issue 6's memory-bounded ClientStore)."""
    from fedsim.config.schema import RuntimeConfig

    return any(f.name == "client_store" for f in dataclasses.fields(RuntimeConfig))


def child(population: int, out_dir: Path, args: argparse.Namespace) -> int:
    """Run one population (in the subprocess) and write ``child.json`` (summary + phase times)."""
    set_run_env()
    from fedsim.simulation import run_simulation
    from fedsim.validation import config_from_dict

    t0 = time.perf_counter()
    cfg = config_from_dict(scale_job(population, args))
    summary = run_simulation(cfg, out_dir, label=f"scale-{population}", progress=False)
    summary["child_wall_s"] = time.perf_counter() - t0
    (out_dir / "child.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def kind_of(proc: Any, root_pid: int) -> str:
    """Which part of the Ray job a process is (Ray names actor processes ``ray::<Class>.<method>``)."""
    if proc.pid == root_pid:
        return "driver"
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except Exception:
        return "ray system"
    if "WorkerActor" in title or "WorkerBase" in title:  # the actor class is WorkerBase (ray.remote(WorkerBase))
        return "workers"
    if any(name in title for name in ("ServerHome", "ParameterServer", "ClientStore")):  # one actor since issue 15
        return "server + store"
    return "ray system"


class TreeSampler(threading.Thread):
    """Samples the summed RSS (and every 5th time PSS) of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop_event = threading.Event()
        self.peak_rss, self.peak_pss, self.peak_split, self.peak_procs, self.samples = 0, 0, {}, 0, 0

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        tick = 0
        while not self.stop_event.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss, pss, split = 0, 0, dict.fromkeys(KINDS, 0)
            for p in procs:
                try:
                    r = p.memory_info().rss
                    if tick % 5 == 0:
                        pss += getattr(p.memory_full_info(), "pss", 0)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss += r
                split[kind_of(p, self.pid)] += r
            self.samples += 1
            if rss > self.peak_rss:
                self.peak_rss, self.peak_split, self.peak_procs = rss, split, len(procs)
            self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            self.stop_event.wait(self.interval)


def steady(round_s: list[float]) -> float:
    """Median seconds per round without round 1 (the worker actors start then); all rounds if there is one."""
    return statistics.median(round_s[1:] or round_s)


def run_population(population: int, out_root: Path, args: argparse.Namespace, passthrough: list[str]) -> dict:
    """One population in a fresh subprocess, sampled; returns the row data."""
    out_dir = out_root / f"pop-{population}"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *passthrough,
        "--child",
        str(population),
        "--out",
        str(out_dir),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=set_run_env())
    sampler = TreeSampler(proc.pid, args.interval)
    sampler.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop_event.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"population {population}: the run failed (exit {rc}); see the output above")
    rounds = read_table(out_dir / "rounds.parquet")
    summary = json.loads((out_dir / "child.json").read_text())
    return {
        "population": population,
        "examples": population * args.examples_per_client + args.test_examples,
        "round_s": [r["wall_s"] for r in rounds],
        "rounds_total_s": sum(r["wall_s"] for r in rounds),
        "run_s": summary["wall_s"],
        "process_s": wall,
        "peak_rss": sampler.peak_rss,
        "peak_pss": sampler.peak_pss,
        "split": sampler.peak_split,
        "procs": sampler.peak_procs,
        "samples": sampler.samples,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--populations", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--cohort", type=int, default=100, help="federation.clients_per_round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--examples-per-client", type=int, default=8, help="training examples of every client (fixed)")
    ap.add_argument("--test-examples", type=int, default=256, help="global test set (fixed; last round only)")
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32, help="tokens per example (synthetic texts have <= 22)")
    ap.add_argument("--method", default="fedsa_lora", help="fedsa_lora keeps every participant's B in the store")
    ap.add_argument("--workers", type=int, default=2, help="runtime.workers (1 CPU each)")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="runtime.checkpoint_every (0: the last round only)")
    ap.add_argument("--store-mb", type=float, default=None, help="runtime.client_store.memory_mb (default: fedsim's)")
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling period in seconds")
    ap.add_argument("--out", type=Path, default=None, help="run directories (default: a folder under .cache/)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1,000 clients, cohort 20, 2 rounds, 1 step")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one population
    if ap.parse_args(argv).quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(populations=[1000], cohort=20, rounds=2, local_steps=1)
    args = ap.parse_args(argv)
    if args.store_mb is not None and not has_store_budget():
        ap.error("--store-mb: this fedsim has no runtime.client_store.memory_mb yet")
    if args.child is not None:
        return child(args.child, args.out, args)

    passthrough = [
        f"--{k}={v}"
        for k, v in (
            ("cohort", args.cohort),
            ("rounds", args.rounds),
            ("examples-per-client", args.examples_per_client),
            ("test-examples", args.test_examples),
            ("local-steps", args.local_steps),
            ("batch-size", args.batch_size),
            ("max-length", args.max_length),
            ("method", args.method),
            ("workers", args.workers),
            ("checkpoint-every", args.checkpoint_every),
        )
    ] + ([f"--store-mb={args.store_mb}"] if args.store_mb is not None else [])
    (ROOT / ".cache").mkdir(exist_ok=True)
    out_root = args.out or Path(tempfile.mkdtemp(prefix="fedsim-scale-", dir=ROOT / ".cache"))
    store = f"{args.store_mb} MiB" if args.store_mb is not None else "fedsim's default"
    if not has_store_budget():
        store = "n/a (no runtime.client_store.memory_mb in this fedsim)"  # TODO(lead): rerun once it exists
    print(
        f"tiny-bert + synthetic, {args.method}, cohort {args.cohort}, {args.rounds} rounds x {args.local_steps} local "
        f"steps of batch {args.batch_size}, {args.examples_per_client} examples per client, {args.test_examples} test "
        f"examples, {args.max_length} tokens; Ray backend, {args.workers} workers x 1 CPU; client-store budget: "
        f"{store}.\n",
        flush=True,
    )
    results = []
    for n in args.populations:
        results.append(run_population(n, out_root, args, passthrough))
        print(f"done: population {n:,}", flush=True)

    rows = []
    for r in results:
        rows.append(
            [
                f"{r['population']:,}",
                f"{r['examples']:,}",
                " / ".join(f"{s:.2f}" for s in r["round_s"]),
                f"{steady(r['round_s']):.2f}",
                f"{r['run_s']:.1f}",
                f"{r['peak_rss'] / MiB:,.0f}",
                f"{r['peak_pss'] / MiB:,.0f}",
                r["procs"],
            ]
        )
    print("\nSeconds per round and peak memory of the whole Ray job (driver + Ray + actors):\n")
    headers = ["population", "examples", "round s (1 / 2 / ...)", "median s/round (2..)", "run s", "peak RSS MiB"]
    print(markdown_table([*headers, "peak PSS MiB", "processes"], rows, (1, 3, 4, 5, 6, 7)))
    split_rows = [[f"{r['population']:,}", *(f"{r['split'].get(k, 0) / MiB:,.0f}" for k in KINDS)] for r in results]
    print("\nRSS by process kind at the RSS peak (MiB):\n")
    print(markdown_table(["population", *KINDS], split_rows, tuple(range(1, len(KINDS) + 1))))
    if len(results) > 1:
        a, b = results[0], results[-1]
        rss_x = b["peak_rss"] / a["peak_rss"]
        s_x = steady(b["round_s"]) / steady(a["round_s"])
        print(
            f"\n{b['population']:,} vs {a['population']:,}: peak RSS x{rss_x:.2f}, median s/round x{s_x:.2f} "
            f"(issue 6: both <= 1.5: {'PASS' if rss_x <= 1.5 and s_x <= 1.5 else 'FAIL'}; issue 15: peak RSS <= 1.2: "
            f"{'PASS' if rss_x <= 1.2 else 'FAIL'})"
        )
    print(f"\nrun directories: {out_root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
