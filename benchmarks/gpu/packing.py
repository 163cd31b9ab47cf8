"""GPU packing: throughput and memory with 1, 2, 4 and 8 workers sharing ONE GPU (``runtime.gpus_per_worker``).

The MiniLM job of benchmarks/perf (FedAvg-LoRA, LoRA r 8 on query/value + head, BBC News, iid; ``--dp`` for
DP-SGD with a fixed noise multiplier) on the Ray backend, once per packing k: ``runtime.workers = k`` and
``runtime.gpus_per_worker = 1/k`` (fedsim.runtime.gpu_share.gpu_share). Each k runs in a fresh subprocess
(``run_simulation`` into ``--out/k<k>``). Reported per k: clients trained per second over the steady rounds
(rounds 2 to the one before last, from rounds.parquet: round 1 holds the actors' start, the last the
evaluation), the speed-up over k = 1, and the peak GPU memory
in use (``nvidia-smi`` polled every 0.2 s by this process; all processes on the device). Before the table it runs
the ``gpus_per_worker: auto`` probe in-process (one client, largest first) and prints how many workers auto would
put on this GPU and why.

    python benchmarks/gpu/packing.py                       # k = 1 2 4 8 on GPU 0 (needs a CUDA GPU + nvidia-smi)
    python benchmarks/gpu/packing.py --packings 1 2 --rounds 3 --clients-per-round 16
    python benchmarks/gpu/packing.py --cpu --packings 1 2 --rounds 2 --model tiny-bert   # smoke test without a GPU

Run it on an otherwise idle GPU machine; commit the table it prints to benchmarks/gpu/README.md with the command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
from _common import ROOT, markdown_table, minilm_job, read_table, set_run_env  # noqa: E402

CHILD = """
import json, sys
from fedsim.validation import load_config
from fedsim.simulation import run_simulation
job, out = json.loads(sys.argv[1]), sys.argv[2]
cfg, _ = load_config("quickstart", [f"{k}={json.dumps(v)}" for k, v in job.items()])
print(json.dumps(run_simulation(cfg, out, label="packing", progress=False)))
"""


class GpuMemoryPoll:
    """Peak of ``nvidia-smi``'s memory.used (MiB) on one GPU, polled in a thread; 0 without nvidia-smi."""

    def __init__(self, gpu: int, interval: float = 0.2) -> None:
        self.gpu, self.interval, self.peak_mib = gpu, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        cmd = ["nvidia-smi", f"--id={self.gpu}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                used = int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[0])
                self.peak_mib = max(self.peak_mib, used)
            except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuMemoryPoll:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def job_for(k: int, args: argparse.Namespace) -> dict[str, Any]:
    """The config (dotted keys) of packing ``k``."""
    from fedsim.runtime.gpu_share import gpu_share

    job = minilm_job(
        clients=args.clients,
        cohort=args.clients_per_round,
        rounds=args.rounds,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        workers=k,
        threads=1,
        dp=args.dp,
    )
    job["model.name"] = args.model
    job["runtime.gpus_per_worker"] = 0.0 if args.cpu else gpu_share(k)
    return job


def run_packing(k: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One packing in a subprocess; returns the table row."""
    with GpuMemoryPoll(args.gpu) as poll:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(job_for(k, args)), str(out / f"k{k}")],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        raise SystemExit(f"k={k} failed:\n{proc.stderr[-4000:]}")
    rounds = read_table(out / f"k{k}" / "rounds.parquet")
    steady = [r for r in rounds if 2 <= r["round"] < len(rounds)] or rounds  # no start-up, no evaluation
    per_s = [(r["clients"] - r["failed_clients"] - r["budget_exhausted"]) / r["wall_s"] for r in steady]
    return {"k": k, "clients_per_s": statistics.median(per_s), "peak_gpu_mib": poll.peak_mib}


def auto_decision(args: argparse.Namespace) -> str:
    """What ``gpus_per_worker: auto`` decides on this GPU for packing 1's job (probe in this process)."""
    from fedsim.client.memory_probe import probe_client_memory
    from fedsim.data.federated import build_federated_data
    from fedsim.data.sources import load_source
    from fedsim.model.adapters import attach_adapter, get_state
    from fedsim.model.build import blueprint_of, build_base_model, build_tokenizer
    from fedsim.privacy.mechanism import make_mechanism
    from fedsim.runtime.gpu_share import CONTEXT_BYTES, gpu_share, workers_per_gpu
    from fedsim.validation import load_config

    cfg, _ = load_config("quickstart", [f"{k}={json.dumps(v)}" for k, v in job_for(1, args).items()])
    dataset = load_source(cfg.data, cfg.seed)
    tokenizer = build_tokenizer(cfg.model, dataset.texts)
    data = build_federated_data(cfg, dataset, tokenizer)
    base = build_base_model(cfg.model, data.num_labels, tokenizer, cfg.seed)
    initial = get_state(attach_adapter(base, cfg.lora, blueprint_of(base).family, cfg.seed))
    probe = probe_client_memory(cfg, blueprint_of(base), data, initial, make_mechanism(cfg))
    if probe is None:
        return "auto: no CUDA GPU visible; workers would run on CPU (gpus_per_worker 0)"
    k = workers_per_gpu(probe.total_bytes, probe.peak_bytes)
    return (
        f"auto: probe client {probe.client_id} peaked at {probe.peak_bytes / 2**20:.0f} MiB (+ "
        f"{CONTEXT_BYTES / 2**20:.0f} MiB context) on a {probe.total_bytes / 2**30:.1f} GiB GPU -> {k} workers "
        f"per GPU, gpus_per_worker {gpu_share(k)}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packings", type=int, nargs="+", default=[1, 2, 4, 8], help="workers per GPU to measure")
    p.add_argument("--model", default="minilm", help="model.name [minilm]")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--clients-per-round", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dp", action="store_true", help="DP-SGD (fixed noise multiplier 1.0, clip 1.0)")
    p.add_argument("--gpu", type=int, default=0, help="GPU index nvidia-smi polls")
    p.add_argument("--cpu", action="store_true", help="smoke test: workers on CPU (gpus_per_worker 0)")
    p.add_argument("--out", type=Path, default=None, help="run folders [a temp dir, removed]")
    args = p.parse_args()
    set_run_env()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsim-packing-"))
    print(auto_decision(args), flush=True)
    rows = []
    for k in args.packings:
        t0 = time.perf_counter()
        rows.append(run_packing(k, args, out))
        print(f"k={k}: {rows[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = rows[0]["clients_per_s"]
    table = [
        [r["k"], f"{r['clients_per_s']:.2f}", f"{r['clients_per_s'] / base:.2f}x", r["peak_gpu_mib"] or "n/a"]
        for r in rows
    ]
    print(
        markdown_table(["workers per GPU", "clients / s", "vs first", "peak GPU MiB (all)"], table, right=(0, 1, 2, 3))
    )
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
