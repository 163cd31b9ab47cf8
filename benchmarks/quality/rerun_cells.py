"""Re-run one committed comparison cell per method with its own config.yaml and compare its rounds.parquet.

    python benchmarks/quality/rerun_cells.py none    # the seed-0 no-DP cells of compare-bbc (about 9 minutes here)
    python benchmarks/quality/rerun_cells.py eps8    # the seed-0 epsilon-8 cells (about 11 minutes here)

Writes the new runs under /tmp/fedsim-rerun/ and prints, per method, the final accuracies (committed / new) and
the largest absolute difference over the metric columns of every round. Checks that a code change kept behaviour.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from fedsim.simulation import run_simulation
from fedsim.validation import config_from_dict

CELLS = Path(__file__).parent / "results" / "compare-bbc" / "cells"
METHODS = ("fedavg_lora", "ffa_lora", "fedsa_lora", "as_lora", "rolora", "flexlora")
COLUMNS = (
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "personal_accuracy",
    "personal_accuracy_unweighted",
    "epsilon_max",
    "epsilon_median",
    "bytes_up",
    "bytes_down",
    "clients",
)


def largest_difference(old: list[dict], new: list[dict]) -> float:
    """Largest |old - new| over COLUMNS and rounds; inf when the rounds or the missing values disagree."""
    if len(old) != len(new):
        return math.inf
    worst = 0.0
    for a, b in zip(old, new, strict=True):
        for c in COLUMNS:
            x, y = a.get(c), b.get(c)
            if x is None or y is None or math.isnan(x) or math.isnan(y):
                if (x is None) != (y is None) or (x is not None and math.isnan(x) != math.isnan(y)):
                    return math.inf
                continue
            worst = max(worst, abs(x - y))
    return worst


def main(setting: str) -> None:
    for method in METHODS:
        cell = CELLS / f"privacy={setting}__seed=0__method.name={method}"
        cfg = config_from_dict(yaml.safe_load((cell / "config.yaml").read_text()))
        out = Path("/tmp/fedsim-rerun") / f"{setting}-{method}"
        t0 = time.perf_counter()
        run_simulation(cfg, out, progress=False)
        old = pq.read_table(cell / "rounds.parquet").to_pylist()
        new = pq.read_table(out / "rounds.parquet").to_pylist()
        print(
            f"{method:12s} {setting}: final eval_accuracy {old[-1]['eval_accuracy']:.4f} / "
            f"{new[-1]['eval_accuracy']:.4f}, personal_accuracy {old[-1]['personal_accuracy']:.4f} / "
            f"{new[-1]['personal_accuracy']:.4f}, largest |difference| {largest_difference(old, new):.3g} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "none")
