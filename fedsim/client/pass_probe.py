"""``runtime.clients_per_pass: auto``: pick K (clients per fused pass) from a short timing probe on a worker.

The probe trains passes of K = 1, 2, 4, 8, 16 of the largest clients (the ones a worker gets first) for
:data:`PROBE_STEPS` local steps each, from the worker's initial adapter, after one warm-up pass, and measures examples
per second. Nothing it computes leaves it: the worker's adapter tensors, the client store, ledgers and uploads are
not touched (it spends no privacy budget) and the seeds it uses (round 0) are no real round's. The smallest K
within :data:`GAIN` of the best rate wins; it stops at the first K that is slower than the best so far. Timing is
noisy, but results do not depend on K, only throughput does.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

from fedsim.client.step_loop import ClientInput
from fedsim.client.worker import ClientWorker
from fedsim.config.schema import Config
from fedsim.methods.batching import batching_blockers
from fedsim.model.adapters import get_state

#: the K values tried (powers of two: the gain per doubling is what decides)
CANDIDATES = (1, 2, 4, 8, 16)
#: local steps timed per candidate
PROBE_STEPS = 2
#: a larger K is taken only when it is at least this much faster than the best smaller one
GAIN = 1.05


def probe_clients_per_pass(worker: ClientWorker, limit: int) -> tuple[int, dict[int, float]]:
    """Time passes of K <= ``limit`` clients on ``worker`` (module docstring); returns (chosen K, examples per
    second by K). Raises what training raises (a probe client that fails is not timed: its K is skipped)."""
    sizes = [len(ix) for ix in worker.data.client_train]
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))
    state = get_state(worker.model)
    method = worker.method
    keys = method.first_plan(state).trained
    trainer = worker.fused_trainer()
    if trainer is None:
        raise ValueError("this worker trains one client at a time (a ZeRO group): there is no K to probe")
    candidates = [k for k in CANDIDATES if k <= max(1, min(limit, len(order)))]
    inputs = {}
    for cid in order[: candidates[-1]]:
        ids, mask, labels = worker.data.client_arrays(worker.data.client_train[cid])
        inputs[cid] = ClientInput(cid, state, ids, mask, labels, 1.0)
    trainer.train(keys, [inputs[order[0]]], round=0, steps=1)  # warm-up (allocations, first-call costs)
    rates: dict[int, float] = {}
    best = 1
    for k in candidates:
        chunk = [inputs[c] for c in order[:k]]
        t0 = time.perf_counter()
        out = trainer.train(keys, chunk, round=0, steps=PROBE_STEPS)
        seconds = time.perf_counter() - t0
        if any(isinstance(o, Exception) for o in out):
            continue
        examples = sum(min(worker.cfg.federation.batch_size, o.outcome.examples) for o in out) * PROBE_STEPS
        rates[k] = examples / max(seconds, 1e-9)
        if rates[k] > rates.get(best, 0.0) * GAIN:
            best = k
        elif rates[k] < rates[best]:
            break
    return best, rates


def resolve_clients_per_pass(cfg: Config, workers: int, probe: Callable[[int], tuple[int, dict[int, float]]]) -> int:
    """K for the run: ``runtime.clients_per_pass`` when a number; for ``auto``, 1 when :func:`batching_blockers`
    names a reason (said on stderr), else ``probe(limit)``'s choice (said on stderr with the measured rates), where
    ``limit`` = the clients one of ``workers`` workers gets per round (at most 16)."""
    k = cfg.runtime.clients_per_pass
    if k != "auto":
        return int(k)
    why = batching_blockers(cfg)
    if why:
        print(f"fedsim: runtime.clients_per_pass auto uses 1 client per pass: {'; '.join(why)}", file=sys.stderr)
        return 1
    limit = max(1, math.ceil(cfg.federation.clients_per_round / max(1, workers)))
    chosen, rates = probe(limit)
    shown = ", ".join(f"K={n}: {r:.0f}" for n, r in rates.items())
    print(f"fedsim: runtime.clients_per_pass auto -> {chosen} (probe, examples/s: {shown})", file=sys.stderr)
    return chosen
