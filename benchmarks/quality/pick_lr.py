"""Pick the learning rate per (method, privacy) from the tuning sweeps and print them as sweep rules.

run: python benchmarks/quality/pick_lr.py benchmarks/quality/results/tune-lr benchmarks/quality/results/tune-lr-dp-low

Criterion: the final accuracy of the tuning cell (seed 100, not a reported seed) — the global test accuracy,
except for methods that keep client state (FedSA-LoRA: B and the head stay with the client, so the global model
has no trained B and no trained head), where it is the final accuracy on the clients' own held-out examples
(their personalised models), the metric that method is evaluated by. Ties go to the smaller lr. The printed
``rules:`` block is what the comparison sweep files (compare-*.yaml) carry; epsilon 3 uses the epsilon-8 choice
(both match ``privacy.mode: sample``).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from fedsim.methods.base import get_method
from fedsim.report.records import load_records


def pick(dirs: list[Path]) -> dict[tuple[str, str], tuple[float, float, list[tuple[float, float]]]]:
    """(method, privacy mode) -> (chosen lr, its score, every (lr, score) tried)."""
    tried: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in load_records(dirs):
        if r["status"] != "complete":
            continue
        personal = get_method(r["method"]).capabilities.keeps_client_state
        score = r["final_local_accuracy"] if personal else r["final_accuracy"]
        tried[(r["method"], r["privacy_mode"])].append((float(r["settings"]["federation.lr"]), float(score)))
    out = {}
    for key, pairs in tried.items():
        lr, score = max(sorted(pairs), key=lambda p: p[1])  # sorted by lr: max keeps the first (smaller) of ties
        out[key] = (lr, score, sorted(pairs))
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    chosen = pick([Path(a) for a in argv])
    for (method, mode), (lr, score, pairs) in sorted(chosen.items()):
        grid = ", ".join(f"{p:g}: {100 * s:.1f}" for p, s in pairs)
        print(f"# {method:12s} {mode:6s} -> lr {lr:g} ({100 * score:.1f} %; tried {grid})")
    print("rules:")
    for (method, mode), (lr, _, _) in sorted(chosen.items()):
        print(f"  - {{when: {{method.name: {method}, privacy.mode: {mode}}}, set: {{federation.lr: {lr:g}}}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
