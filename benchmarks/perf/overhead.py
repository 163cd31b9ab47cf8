"""fedsim's training throughput over a bare single-process PEFT loop doing the same local steps, without and with DP.

Both sides run the MiniLM job of ``_common.minilm_job`` (bundled all-MiniLM-L6-v2 + LoRA r=8, alpha=16 on
query/value + trained head, FedAvg-LoRA, BBC News, iid shards, plain SGD). The bare loop builds the identical
data, tokenisation, base model and adapter with fedsim's own builders (``fedsim.data.*``, ``fedsim.model.*``), the
same cohorts (``sample_cohort``) and the same batches (``batch_schedule`` with fedsim's per-(round, client)
generators), and trains by hand: ``torch.optim.SGD`` steps, under DP wrapped in Opacus' ``GradSampleModule``
(``hooks`` mode) + ``DPOptimizer`` with the same clip, noise multiplier, expected batch size, Poisson batches and
noise generators as fedsim's trainer; then a float64 FedAvg. fedsim runs ``run_simulation`` in this process
(``runtime.backend`` ray by default, 1 worker with ``--threads`` CPUs; the bare loop uses the same thread count).

What is timed: rounds ``warmup+1 .. rounds-1``. Round 1 (``--warmup-rounds``) is left out on both sides (fedsim's
worker actor builds its model while round 1 waits for it; torch warms up in the bare loop) and so is the last
round, the only one that evaluates (``federation.eval_every = rounds``). fedsim's time is the sum of those rounds'
``wall_s`` in rounds.parquet; a round's ``wall_s`` runs from the previous round's completed row to its own (plan,
cohort, dispatch, local training, uploads, aggregation, and the previous round's recording: tables and TensorBoard;
checkpoints are off: ``runtime.checkpoint_every = 0``), so the timed rounds hold as many recordings as rounds. The
bare loop records nothing: its round is training + FedAvg. Throughput = examples in the timed rounds' batches
(identical on both sides) / seconds. The breakdown splits fedsim's round time into the per-client seconds the
worker reports in clients.parquet (its local training plus per-client swapping of adapter state) and the rest
(driver, Ray, server, store, recording); with one worker they add up. The last line compares the final global
adapters (they should agree to float rounding: the two sides do the same computation).

    python benchmarks/perf/overhead.py                      # the measured setting (idle machine)
    python benchmarks/perf/overhead.py --quick              # smoke test, seconds of compute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT,
    fedavg,
    local_train,
    markdown_table,
    max_abs_diff,
    minilm_job_of,
    read_table,
    set_run_env,
)

from fedsim.client.step_loop import batch_schedule  # noqa: E402
from fedsim.config.schema import Config  # noqa: E402
from fedsim.data.federated import build_federated_data  # noqa: E402
from fedsim.data.sources import load_source  # noqa: E402
from fedsim.methods.base import make_method  # noqa: E402
from fedsim.model.adapters import attach_adapter, get_state, parameters_for, set_state, set_trainable  # noqa: E402
from fedsim.model.build import blueprint_of, build_base_model, build_tokenizer  # noqa: E402
from fedsim.privacy.dpsgd import expected_batch_size  # noqa: E402
from fedsim.seeding import derive_seed, torch_generator  # noqa: E402
from fedsim.server.cohort import sample_cohort  # noqa: E402
from fedsim.validation import config_from_dict  # noqa: E402


def bare_run(cfg: Config) -> dict[str, Any]:
    """The hand-written loop over all rounds; per round: seconds (training + FedAvg) and examples seen."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    fed, pr, seed = cfg.federation, cfg.privacy, cfg.seed
    dp = pr.mode == "sample"
    dataset = load_source(cfg.data, seed)
    tokenizer = build_tokenizer(cfg.model, dataset.texts)
    data = build_federated_data(cfg, dataset, tokenizer)
    base = build_base_model(cfg.model, data.num_labels, tokenizer, seed)
    model = attach_adapter(base, cfg.lora, blueprint_of(base).family, seed)
    global_state = get_state(model)
    method = make_method(cfg)
    keys = method.first_plan(global_state).trained  # fedsim's order
    set_trainable(model, keys)
    params = parameters_for(model, keys)
    forward = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True) if dp else model
    # int64 copies of the whole table (fedsim keeps int32/int8 read-only views and widens the rows it gathers)
    tensors = [torch.from_numpy(a.astype("int64")) for a in (data.input_ids, data.attention_mask, data.labels)]
    rounds = []
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for t in range(1, fed.rounds + 1):
            t0 = time.perf_counter()
            seen, uploads = 0, []
            for cid in sample_cohort(seed, t, fed.clients, fed.clients_per_round):
                set_state(model, global_state)
                idx = torch.tensor(data.client_train[cid], dtype=torch.long)  # a copy: the shard is a read-only view
                ids, mask, labels = (x[idx] for x in tensors)
                n = len(idx)
                opt: Any = torch.optim.SGD(params, lr=fed.lr)
                if dp:
                    gen = torch.Generator().manual_seed(derive_seed(seed, "dp_noise", t, cid))
                    opt = DPOptimizer(
                        opt,
                        noise_multiplier=float(pr.noise_multiplier or 0.0),
                        max_grad_norm=pr.clip,
                        expected_batch_size=expected_batch_size(fed.batch_size, n),
                        loss_reduction="mean",
                        generator=gen,
                    )
                batches = batch_schedule(
                    n, fed.batch_size, fed.local_steps, dp, torch_generator(seed, "batches", t, cid)
                )
                _, k_seen, _ = local_train(
                    forward, params, opt, ids, mask, labels, batches, derive_seed(seed, "dropout", t, cid)
                )
                seen += k_seen
                for p in model.parameters():  # nothing of one client's batch reaches the next one
                    p.grad = None
                    if hasattr(p, "grad_sample"):
                        p.grad_sample = None
                uploads.append((float(n), get_state(model, keys)))
            global_state = {**global_state, **fedavg(uploads)}
            rounds.append({"round": t, "seconds": time.perf_counter() - t0, "examples": seen})
    return {"rounds": rounds, "final": global_state}


def fedsim_run(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """run_simulation into ``out_dir``; its rounds/clients tables and final global state."""
    from fedsim.simulation import run_simulation

    box: dict[str, Any] = {}
    summary = run_simulation(
        cfg, out_dir, label="overhead", progress=False, inspect=lambda b: box.update(g=b.global_state())
    )
    return {
        "rounds": read_table(out_dir / "rounds.parquet"),
        "clients": read_table(out_dir / "clients.parquet"),
        "final": box["g"],
        "wall_s": summary["wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=["nodp", "dp"], choices=["nodp", "dp"])
    ap.add_argument("--backends", nargs="+", default=["ray"], choices=["ray", "local"], help="fedsim backends")
    ap.add_argument("--rounds", type=int, default=6, help="rounds run (timed: warmup+1 .. rounds-1)")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="first rounds left out of the timing")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--cohort", type=int, default=10, help="federation.clients_per_round")
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per example")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the bare loop = runtime.cpus_per_worker")
    ap.add_argument("--noise-multiplier", type=float, default=1.0, help="DP: fixed sigma (no calibration)")
    ap.add_argument("--clip", type=float, default=1.0, help="DP: per-example clipping norm")
    ap.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="smallest setting: 3 rounds, 2 clients, 2 steps of batch 4")
    if ap.parse_args(argv).quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(rounds=3, clients=2, cohort=2, local_steps=2, batch_size=4, max_length=32)
    args = ap.parse_args(argv)
    if args.rounds < args.warmup_rounds + 2:
        ap.error("--rounds must be at least --warmup-rounds + 2 (the last round evaluates and is not timed)")
    set_run_env()
    torch.set_num_threads(args.threads)
    timed = range(args.warmup_rounds + 1, args.rounds)
    (ROOT / ".cache").mkdir(exist_ok=True)
    out_root = args.out or Path(tempfile.mkdtemp(prefix="fedsim-overhead-", dir=ROOT / ".cache"))

    print(
        f"MiniLM + LoRA r=8 (query, value) + head, FedAvg-LoRA, {args.clients} clients, cohort {args.cohort}, "
        f"{args.local_steps} local steps of batch {args.batch_size}, {args.max_length} tokens, {args.threads} "
        f"thread(s); timed rounds {timed.start}..{timed.stop - 1} of {args.rounds}; torch {torch.__version__}.\n",
        flush=True,
    )
    main_rows, split_rows, check_rows = [], [], []
    for mode in args.modes:
        for backend in args.backends:
            job = minilm_job_of(
                args,
                workers=1,
                threads=args.threads,
                backend=backend,
                dp=mode == "dp",
                noise_multiplier=args.noise_multiplier,
                clip=args.clip,
            )
            cfg = config_from_dict(job)
            bare = bare_run(cfg)
            fs = fedsim_run(cfg, out_root / f"{mode}-{backend}")
            examples = sum(r["examples"] for r in bare["rounds"] if r["round"] in timed)
            bare_s = sum(r["seconds"] for r in bare["rounds"] if r["round"] in timed)
            fed_s = sum(r["wall_s"] for r in fs["rounds"] if r["round"] in timed)
            client_s = sum(c["seconds"] for c in fs["clients"] if c["round"] in timed)
            label = "no DP" if mode == "nodp" else f"DP (sigma {args.noise_multiplier}, C {args.clip})"
            main_rows.append(
                [
                    label,
                    backend,
                    examples,
                    f"{examples / bare_s:.2f}",
                    f"{examples / fed_s:.2f}",
                    f"{bare_s / fed_s:.3f}",
                ]
            )
            n_t = len(timed)
            split_rows.append(
                [
                    label,
                    backend,
                    f"{statistics.mean([r['wall_s'] for r in fs['rounds'] if r['round'] in timed]):.3f}",
                    f"{bare_s / n_t:.3f}",
                    f"{client_s / n_t:.3f}",
                    f"{(client_s - bare_s) / n_t:+.3f}",
                    f"{(fed_s - client_s) / n_t:+.3f}",
                ]
            )
            check_rows.append(
                [label, backend, f"{max_abs_diff(bare['final'], fs['final']):.2e}", f"{fs['wall_s']:.1f}"]
            )
            print(f"done: {label}, {backend}", flush=True)

    print("\nTraining throughput (examples / second; ratio = fedsim / bare; targets >= 0.98 without DP, 0.95 with):\n")
    print(
        markdown_table(
            ["mode", "fedsim backend", "examples", "bare ex/s", "fedsim ex/s", "ratio"], main_rows, (2, 3, 4, 5)
        )
    )
    print("\nWhere fedsim's extra time goes (seconds per timed round; 1 worker):\n")
    print(
        markdown_table(
            [
                "mode",
                "backend",
                "fedsim round",
                "bare round",
                "sum of client seconds",
                "worker extra",
                "driver/Ray/server",
            ],
            split_rows,
            (2, 3, 4, 5, 6),
        )
    )
    print("\nSame computation check (final global adapter) and fedsim's whole-run wall time:\n")
    print(markdown_table(["mode", "backend", "max abs diff bare vs fedsim", "fedsim run wall s"], check_rows, (2, 3)))
    print(f"\nrun directories: {out_root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
