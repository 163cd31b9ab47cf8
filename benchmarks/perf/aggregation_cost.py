"""Server aggregation cost per round of every registered method, at RoBERTa-large shapes.

24 layers x (query, value) LoRA adapters, d_in = d_out = 1024, r = 8 (no trained head): the setting of the
AS-LoRA paper's cost claim ("matches SVD-based aggregation at 33-180x lower aggregation cost"). For each method
and cohort size, random uploads of the plan's shared tensors of round 1 (plus the scalars the method's
``client_signal`` derives from random gradients, e.g. AS-LoRA's scores) are aggregated ``--repeats`` times
(``--svd-repeats`` for the non-linear SVD family, one dense SVD per layer each) from the same global and server
state; the median wall time is reported. Prints two Markdown tables: seconds per round, and the ratio of each
SVD-family method to as_lora (to ffa_lora when as_lora is not registered; the output says so).

    python benchmarks/perf/aggregation_cost.py --clients 6 100 --repeats 3 --svd-repeats 1 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pkgutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

import fedsim.methods  # noqa: E402
from fedsim.config.schema import Config, FederationConfig, LoraConfig, MethodConfig  # noqa: E402
from fedsim.methods.base import available_methods, make_method  # noqa: E402
from fedsim.model.keys import lora_key  # noqa: E402
from fedsim.types import AdapterState, ClientUpdate, SignalContext  # noqa: E402

SVD_FAMILY = ("flexlora", "fedsvd")


def roberta_large_state(gen: torch.Generator, layers: int, dim: int, rank: int) -> AdapterState:
    """Random A [rank, dim] and B [dim, rank] for query and value of ``layers`` encoder layers (float32)."""
    state: AdapterState = {}
    for i in range(layers):
        for proj in ("query", "value"):
            layer = f"roberta.encoder.layer.{i}.attention.self.{proj}"
            state[lora_key(layer, "A")] = torch.randn(rank, dim, generator=gen) / dim**0.5
            state[lora_key(layer, "B")] = 0.01 * torch.randn(dim, rank, generator=gen)
    return state


def cohort(method, global_state: AdapterState, plan, clients: int, gen: torch.Generator) -> list[ClientUpdate]:
    """``clients`` uploads of random tensors for the plan's shared keys, with the method's signals."""
    updates = []
    for cid in range(clients):
        start = method.client_start(global_state, None, plan)
        tensors = {k: start[k] + 0.01 * torch.randn(start[k].shape, generator=gen) for k in plan.uploaded}
        grads = {k: torch.randn(start[k].shape, generator=gen) for k in plan.trained}
        ctx = SignalContext(round=plan.round, client_id=cid, lr=0.1, batch_size=128.0, noise_std=1e-3)
        signals = method.client_signal(plan, grads, ctx)
        updates.append(ClientUpdate(cid, float(100 + cid), tensors, signals))
    return updates


def time_method(name: str, clients: int, repeats: int, args: argparse.Namespace) -> float:
    """Median seconds of one ``aggregate`` call over ``repeats`` runs from the same states."""
    cfg = Config(
        seed=0,
        lora=LoraConfig(r=args.rank, alpha=float(args.rank)),
        federation=FederationConfig(clients=clients, clients_per_round=clients, rounds=100),
        method=MethodConfig(name=name),
    )
    method = make_method(cfg)
    gen = torch.Generator().manual_seed(1234 + clients)
    global_state = roberta_large_state(gen, args.layers, args.dim, args.rank)
    server_state = method.init_server_state(global_state)
    plan = method.plan(1, sorted(global_state), server_state)
    updates = cohort(method, global_state, plan, clients, gen)
    times = []
    for _ in range(repeats):
        state_copy = copy.deepcopy(server_state)
        t0 = time.perf_counter()
        method.aggregate(global_state, updates, plan, state_copy)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[6, 100], help="cohort sizes to time")
    ap.add_argument("--repeats", type=int, default=3, help="timed aggregations per (method, cohort); median kept")
    ap.add_argument("--svd-repeats", type=int, default=1, help="repeats for the SVD family (seconds per call)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of the registered methods (default: all)")
    ap.add_argument("--layers", type=int, default=24, help="encoder layers (each adapts query and value)")
    ap.add_argument("--dim", type=int, default=1024, help="d_in = d_out")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for info in pkgutil.iter_modules(fedsim.methods.__path__):  # register every method module
        importlib.import_module(f"fedsim.methods.{info.name}")
    registered = available_methods()
    names = args.methods or registered
    unknown = sorted(set(names) - set(registered))
    if unknown:
        ap.error(f"unknown methods {unknown}; registered: {registered}")

    print(
        f"Aggregation cost per round: {args.layers} layers x (query, value), d_in = d_out = {args.dim}, "
        f"r = {args.rank}, float32 uploads; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"median of {args.repeats} (SVD family: {args.svd_repeats}) run(s).\n"
    )
    seconds: dict[tuple[str, int], float] = {}
    print("| method | clients | seconds / round |\n|---|---:|---:|")
    for name in names:
        for k in args.clients:
            reps = args.svd_repeats if name in SVD_FAMILY else args.repeats
            seconds[(name, k)] = time_method(name, k, reps, args)
            print(f"| {name} | {k} | {seconds[(name, k)]:.4f} |", flush=True)

    ref = "as_lora" if "as_lora" in names else "ffa_lora" if "ffa_lora" in names else None
    svd = [n for n in SVD_FAMILY if n in names]
    if ref is None or not svd:
        print("\n(no ratio: needs a reference method, as_lora or ffa_lora, and an SVD-family method)")
        return 0
    if ref != "as_lora":
        print("\nas_lora is not registered (or not selected): ratios are against ffa_lora instead.")
    print(f"\n| method | clients | x {ref} |\n|---|---:|---:|")
    for name in svd:
        for k in args.clients:
            print(f"| {name} | {k} | {seconds[(name, k)] / seconds[(ref, k)]:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
