"""Shared helpers of the perf benchmarks (overhead.py, vs_flower.py, scale.py, startup.py): run environment, the
MiniLM job, the small-BERT many-client job, the hand-written local training loop, a float64 FedAvg, Markdown tables,
the run-directory tables, ``--fedsim-set`` overrides, the conditions a report states (command, date, cores, load) and
the median and range of repeated runs.

Importable from fedsim's venv and from the Flower venv that vs_flower.py makes (torch, numpy and fedsim's
torch-level modules only; pyarrow and the data layer are imported inside the functions that need them).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the fedsim checkout
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from anywhere without installing

RUN_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",  # Flower would otherwise try to send telemetry events
}


def set_run_env() -> dict[str, str]:
    """Set the offline / no-telemetry variables (keeping values the caller already set); returns os.environ copy."""
    for k, v in RUN_ENV.items():
        os.environ.setdefault(k, v)
    return dict(os.environ)


def minilm_job(
    *,
    clients: int,
    cohort: int,
    rounds: int,
    local_steps: int,
    batch_size: int,
    max_length: int,
    workers: int,
    threads: int,
    backend: str = "ray",
    dp: bool = False,
    noise_multiplier: float = 1.0,
    clip: float = 1.0,
    seed: int = 0,
    checkpoint_every: int = 0,
    source: str = "bbc-news",
) -> dict[str, Any]:
    """The fedsim config (dotted keys) of the MiniLM job the bare loop, Flower and fedsim all run.

    MiniLM + LoRA r=8 alpha=16 on query/value + trained head (as fedsim builds it), FedAvg-LoRA (every adapter
    tensor trained and averaged, weighted by examples: what Flower's FedAvg does), iid shards (every client the same
    size up to one example), plain SGD; no personal holdout and evaluation only after the last round, so that
    training dominates. DP: per-example clipping ``clip`` and a FIXED noise multiplier (no calibration).
    """
    job = {
        "model.name": "minilm",
        "data.source": source,
        "data.max_length": max_length,
        "data.test_fraction": 0.2,
        "privacy.mode": "sample" if dp else "none",
        **_fedavg_sgd(clients, cohort, rounds, local_steps, batch_size, workers, threads, seed, checkpoint_every),
        "runtime.backend": backend,
    }
    if dp:
        job.update({"privacy.noise_multiplier": noise_multiplier, "privacy.clip": clip, "privacy.epsilon": None})
    return job


def minilm_job_of(args: Any, **kw: Any) -> dict[str, Any]:
    """:func:`minilm_job` from a script's arguments ``clients``, ``cohort``, ``rounds``, ``local_steps``,
    ``batch_size`` and ``max_length``; ``kw`` are the other keywords of :func:`minilm_job`."""
    shape = ("clients", "cohort", "rounds", "local_steps", "batch_size", "max_length")
    return minilm_job(**{k: getattr(args, k) for k in shape}, **kw)


def small_bert_folder(hidden: int = 64, layers: int = 2) -> Path:
    """A BERT classifier of ``hidden`` units and ``layers`` layers (2 heads, intermediate 4 x hidden, 2 labels) with
    seeded random weights and the bundled MiniLM's tokenizer, written once to ``.cache/bert-h<hidden>-l<layers>/``
    (fedsim's ``model.name`` takes the folder). Needs fedsim's venv (transformers and the [demo] extra)."""
    folder = ROOT / ".cache" / f"bert-h{hidden}-l{layers}"
    if (folder / "config.json").is_file():
        return folder
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedsim.model.registry import _minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(_minilm_folder())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        num_labels=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # complete or absent
    return folder


def small_job(
    *,
    clients: int = 100,
    examples_per_client: int = 64,
    test_examples: int = 640,
    cohort: int = 10,
    rounds: int = 5,
    local_steps: int = 10,
    batch_size: int = 16,
    max_length: int = 32,
    workers: int = 2,
    threads: int = 1,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """The fedsim config (dotted keys) of the small many-client job: a ``layers``-layer BERT of ``hidden`` units
    (:func:`small_bert_folder`) + LoRA r=8, alpha=16 on query/value + trained head, FedAvg-LoRA, synthetic texts in
    iid shards of exactly ``examples_per_client`` per client, a fixed global test set evaluated after the last round
    only, plain SGD, no DP, Ray backend with ``workers`` workers of ``threads`` CPU(s)."""
    total = clients * examples_per_client + test_examples
    return {
        "model.name": str(small_bert_folder(hidden, layers)),
        "data.source": "synthetic",
        "data.synthetic_examples": total,
        "data.synthetic_classes": 2,
        "data.max_length": max_length,
        "data.test_fraction": test_examples / total,
        "privacy.mode": "none",
        **_fedavg_sgd(clients, cohort, rounds, local_steps, batch_size, workers, threads, seed, checkpoint_every),
        "runtime.backend": "ray",
    }


def _fedavg_sgd(
    clients: int,
    cohort: int,
    rounds: int,
    local_steps: int,
    batch_size: int,
    workers: int,
    threads: int,
    seed: int,
    checkpoint_every: int,
) -> dict[str, Any]:
    """The keys both jobs share: LoRA r=8, alpha=16, no dropout, trained head; iid shards, no personal holdout;
    FedAvg-LoRA with plain SGD at lr 0.5; evaluation after the last round only; ``workers`` x ``threads`` CPUs."""
    return {
        "seed": seed,
        "lora.r": 8,
        "lora.alpha": 16.0,
        "lora.dropout": 0.0,
        "lora.train_head": True,
        "data.personal_fraction": 0.0,
        "data.partition.kind": "iid",
        "federation.clients": clients,
        "federation.clients_per_round": cohort,
        "federation.rounds": rounds,
        "federation.local_steps": local_steps,
        "federation.batch_size": batch_size,
        "federation.lr": 0.5,
        "federation.optimizer": "sgd",
        "federation.eval_every": rounds,  # the last round is always evaluated; no other
        "method.name": "fedavg_lora",
        "runtime.workers": workers,
        "runtime.cpus_per_worker": float(threads),
        "runtime.checkpoint_every": checkpoint_every,
    }


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--fedsim-set KEY=VALUE`` items -> {dotted key: value}; values are read as YAML scalars (``2`` -> 2,
    ``null`` -> None, ``true`` -> True). Raises SystemExit naming the item without ``=``."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--fedsim-set: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def local_train(
    forward: Any,
    params: Sequence[Any],
    optimizer: Any,
    ids: Any,
    mask: Any,
    labels: Any,
    batches: Sequence[Any],
    dropout_seed: int,
) -> tuple[int, int, list[float]]:
    """The bare local loop: one optimiser step per batch (SGD; a DPOptimizer under DP). Returns (steps, examples
    seen, losses). ``ids``/``mask``/``labels`` are the client's tensors, ``batches`` index tensors (fedsim's
    ``batch_schedule``); an empty (Poisson) batch is a noise-only step, marked as fedsim marks it. Dropout draws come
    from ``torch.manual_seed(dropout_seed)`` inside ``fork_rng``, as in fedsim's trainer. Each batch is padded to
    its longest row (the columns no row uses dropped), as fedsim's trainer and Flower's Hugging Face tutorial
    (``DataCollatorWithPadding``) do.
    """
    import torch
    import torch.nn.functional as F

    from fedsim.client.padding import trim_padding

    losses: list[float] = []
    seen = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(dropout_seed)
        for idx in batches:
            optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            else:
                b_ids, b_mask, b_labels = trim_padding(ids[idx], mask[idx], labels[idx])
                logits = forward(input_ids=b_ids, attention_mask=b_mask).logits
                loss = F.cross_entropy(logits.float(), b_labels)
                loss.backward()
                losses.append(float(loss.detach()))
                seen += len(idx)
            optimizer.step()
    return len(batches), seen, losses


def fedavg(states: Sequence[tuple[float, Mapping[str, Any]]]) -> dict[str, Any]:
    """Weighted mean of adapter states (float64 accumulation, cast back to each tensor's dtype)."""
    total = sum(w for w, _ in states)
    first = states[0][1]
    out = {}
    for k, v in first.items():
        acc = sum(w / total * s[k].double() for w, s in states)
        out[k] = acc.to(v.dtype)
    return out


def max_abs_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Largest |a[k] - b[k]| over the common keys (inf if the key sets differ)."""
    if set(a) != set(b):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """fedsim's report table (:func:`fedsim.report.tables.markdown_table`); columns whose index is in ``right``
    are right-aligned. Imported here, not at module level: the Flower side imports this module in its own venv."""
    from fedsim.report.tables import markdown_table as table

    return table(headers, rows, [i in right for i in range(len(headers))])


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet table (rounds.parquet / clients.parquet) as dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def run_conditions(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What a benchmark's report states about its run: the exact command line (``python <script> <argv>``; ``argv``
    defaults to ``sys.argv[1:]``), the UTC date, ``nproc`` (the CPUs this process may use) and ``os.cpu_count()``,
    the 1/5/15-minute load averages and fedsim's git commit (``-dirty`` when tracked files differ from it; None
    outside a git checkout)."""
    import datetime
    import shlex
    import subprocess

    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    args = list(sys.argv[1:] if argv is None else argv)

    def git(*cmd: str) -> str | None:
        done = subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is not None and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {
        "command": shlex.join(["python", str(shown), *args]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "commit": commit,
    }


def spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Median, minimum and maximum of ``values`` (None entries left out) and how many there were
    (``n``; median/min/max None when there are none)."""
    import statistics

    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt_spread(s: Mapping[str, Any], fmt: str = ".1f", unit: str = "") -> str:
    """``median (min-max)`` of a :func:`spread`, each number as ``fmt`` followed by ``unit``; only the median for a
    single value; ``n/a`` for none."""
    if not s["n"]:
        return "n/a"
    med = f"{s['median']:{fmt}}{unit}"
    return med if s["n"] == 1 else f"{med} ({s['min']:{fmt}}-{s['max']:{fmt}}{unit})"
