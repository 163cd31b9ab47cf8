"""Training throughput of a worker that trains K clients together (``runtime.clients_per_pass``), K = 1 .. 16, on CPU.

One ClientWorker per (model, mode) trains the same cohort of clients (round 1, FedAvg-LoRA: A, B and the head
trained, LoRA r=8, alpha=16 on query/value, plain SGD, ``model.base_dropout: false`` for every K) once per K, in
calls of K clients (K = 1: ``ClientWorker.train``, one client per call; K > 1: ``ClientWorker.train_many``), the
K values interleaved and rotated over ``--reps`` repetitions; the fastest repetition of each K is reported.
Throughput = examples in the clients' batches (the same for every K: the same seeds) / seconds of the worker's
calls (local training plus the per-client work around it: start state, upload, ledger), both per second of this
process's CPU time (``time.process_time``, 1 torch thread: the work done, robust on a shared machine) and per
wall-clock second (what an idle machine shows). Models: tiny-bert (random, synthetic data, 32 tokens, 10 local
steps) and MiniLM (bundled all-MiniLM-L6-v2, BBC News, 64 tokens, 3 local steps); 16 clients in iid shards, batch
16; without DP and with DP-SGD (Poisson batches, clip 1.0, noise multiplier 1.0). The last column checks that every
K gives the same uploads as K = 1 (max abs difference over all clients' tensors).

    python benchmarks/perf/batched.py                 # the measured setting (~25 minutes on 2 shared cores)
    python benchmarks/perf/batched.py --quick         # smoke test, seconds of compute (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, set_run_env  # noqa: E402

from fedsim.client.protocol import ClientOutput
from fedsim.client.step_loop import batch_schedule  # noqa: E402
from fedsim.client.worker import ClientWorker  # noqa: E402
from fedsim.config.schema import Config  # noqa: E402
from fedsim.data.federated import build_federated_data  # noqa: E402
from fedsim.data.sources import load_source  # noqa: E402
from fedsim.methods.base import make_method  # noqa: E402
from fedsim.model.adapters import attach_adapter, get_state  # noqa: E402
from fedsim.model.build import blueprint_of, build_base_model, build_tokenizer  # noqa: E402
from fedsim.privacy.dpsgd import poisson_rate  # noqa: E402
from fedsim.privacy.mechanism import make_mechanism  # noqa: E402
from fedsim.seeding import torch_generator  # noqa: E402
from fedsim.types import ClientTask  # noqa: E402
from fedsim.validation import config_from_dict  # noqa: E402

#: model -> (data source, tokens per example, local steps per client)
MODELS = {"tiny-bert": ("synthetic", 32, 10), "minilm": ("bbc-news", 64, 3)}


def job(model: str, dp: bool, args: argparse.Namespace) -> Config:
    """The config of one (model, mode) worker."""
    source, length, steps = MODELS[model]
    keys: dict[str, Any] = {
        "model.name": model,
        "model.base_dropout": False,
        "lora.r": 8,
        "lora.alpha": 16.0,
        "lora.train_head": True,
        "data.source": source,
        "data.max_length": args.max_length or length,
        "data.synthetic_examples": 40 * args.clients,
        "data.personal_fraction": 0.0,
        "data.partition.kind": "iid",
        "federation.clients": args.clients,
        "federation.clients_per_round": args.clients,
        "federation.local_steps": args.local_steps or steps,
        "federation.batch_size": args.batch_size,
        "federation.lr": 0.5,
        "method.name": "fedavg_lora",
        "privacy.mode": "sample" if dp else "none",
        "runtime.backend": "local",
        "runtime.cpus_per_worker": float(args.threads),
    }
    if dp:
        keys.update({"privacy.noise_multiplier": 1.0, "privacy.clip": 1.0})
    return config_from_dict(keys)


def build(cfg: Config) -> tuple[ClientWorker, list[ClientTask], dict, int]:
    """The worker, the round's tasks (largest client first), the global state and the examples of one pass."""
    dataset = load_source(cfg.data, cfg.seed)
    tokenizer = build_tokenizer(cfg.model, dataset.texts)
    data = build_federated_data(cfg, dataset, tokenizer)
    base = build_base_model(cfg.model, data.num_labels, tokenizer, cfg.seed)
    blueprint = blueprint_of(base)
    state = get_state(attach_adapter(base, cfg.lora, blueprint.family, cfg.seed))
    worker = ClientWorker(0, cfg, blueprint, data, make_mechanism(cfg))
    method = make_method(cfg)
    plan = method.first_plan(state)
    fed, dp = cfg.federation, cfg.privacy.mode == "sample"
    sizes = [len(ix) for ix in data.client_train]
    order = sorted(range(fed.clients), key=lambda c: (-sizes[c], c))
    tasks, examples = [], 0
    for c in order:
        extra = {"noise_multiplier": 1.0, "sample_rate": poisson_rate(fed.batch_size, sizes[c])} if dp else {}
        tasks.append(ClientTask(1, c, plan, **extra))
        gen = torch_generator(cfg.seed, "batches", 1, c)
        examples += sum(len(b) for b in batch_schedule(sizes[c], fed.batch_size, fed.local_steps, dp, gen))
    return worker, tasks, state, examples


def train_all(
    worker: ClientWorker, tasks: list[ClientTask], state: dict, k: int
) -> tuple[float, float, list[ClientOutput]]:
    """(wall seconds, CPU seconds of this process) to train every task in calls of ``k`` clients, and the outputs."""
    t0, c0 = time.perf_counter(), time.process_time()
    outs: list[ClientOutput] = []
    for i in range(0, len(tasks), k):
        chunk = tasks[i : i + k]
        if k == 1:
            outs.append(worker.train(chunk[0], state, None, None))
        else:
            outs.extend(worker.train_many(chunk, state, [None] * len(chunk), [None] * len(chunk)))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    failed = [o.result.error for o in outs if o.result.status != "ok"]
    if failed:
        raise RuntimeError(f"a client failed: {failed[0]}")
    return seconds, cpu, outs


def max_diff(a: list[ClientOutput], b: list[ClientOutput]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for key, v in y.upload.tensors.items():
            worst = max(worst, float((x.upload.tensors[key].double() - v.double()).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--modes", nargs="+", default=["nodp", "dp"], choices=["nodp", "dp"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="clients per pass (K) compared")
    ap.add_argument("--clients", type=int, default=16, help="clients trained per K (the cohort)")
    ap.add_argument("--local-steps", type=int, default=0, help="per client (0: 10 tiny-bert, 3 MiniLM)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=0, help="tokens per example (0: 32 tiny-bert, 64 MiniLM)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (runtime.cpus_per_worker)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; the fastest of each K counts")
    ap.add_argument("--quick", action="store_true", help="smallest setting: 4 clients, K 1 2 4, 1 step of batch 4")
    if ap.parse_args(argv).quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(ks=[1, 2, 4], clients=4, local_steps=1, batch_size=4, max_length=16, reps=1)
    args = ap.parse_args(argv)
    if 1 not in args.ks:
        ap.error("--ks must include 1 (the reference)")
    set_run_env()
    torch.set_num_threads(args.threads)
    print(
        f"FedAvg-LoRA r=8 (query, value) + head, {args.clients} clients x "
        f"{args.local_steps or 'tiny-bert 10 / MiniLM 3'} SGD steps of batch {args.batch_size}, model.base_dropout "
        f"false, {args.threads} thread(s), fastest of {args.reps} interleaved runs; torch {torch.__version__}.\n",
        flush=True,
    )
    rows = []
    for model in args.models:
        for mode in args.modes:
            worker, tasks, state, examples = build(job(model, mode == "dp", args))
            worker.train(tasks[0], state, None, None)  # warm-up: first calls, allocations
            worker.train_many(tasks[:2], state, [None] * 2, [None] * 2)
            wall: dict[int, float] = {}
            cpu: dict[int, float] = {}
            outputs: dict[int, list[ClientOutput]] = {}
            for rep in range(args.reps):
                ks = args.ks[rep % len(args.ks) :] + args.ks[: rep % len(args.ks)]  # rotate the order per repetition
                for k in ks:
                    seconds, cpu_s, outputs[k] = train_all(worker, tasks, state, k)
                    wall[k], cpu[k] = min(wall.get(k, math.inf), seconds), min(cpu.get(k, math.inf), cpu_s)
            label = "no DP" if mode == "nodp" else "DP (sigma 1.0, C 1.0)"
            for k in args.ks:
                rows.append(
                    [
                        model,
                        label,
                        k,
                        f"{examples / cpu[k]:.1f}",
                        f"{cpu[1] / cpu[k]:.2f}",
                        f"{examples / wall[k]:.1f}",
                        f"{wall[1] / wall[k]:.2f}",
                        f"{max_diff(outputs[k], outputs[1]):.1e}",
                    ]
                )
            print(f"done: {model}, {label} ({examples} examples per K)", flush=True)
    print(
        "\nThroughput by clients per pass (examples per second of this process's CPU time, and per wall-clock second; "
        "x K=1 = speed-up over one client per call):\n"
    )
    headers = ["model", "mode", "K", "ex/s (CPU)", "x K=1 (CPU)", "ex/s (wall)", "x K=1 (wall)", "max upload diff"]
    print(markdown_table(headers, rows, (2, 3, 4, 5, 6, 7)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
