"""ZeRO worker groups: per-rank resident bytes of the frozen base and seconds per local step, stage 0 (the plain
one-process worker) against stage 3 with G = 1 and G = 2 ranks, on CPU (gloo), without Ray.

    python benchmarks/perf/zero.py [--model tiny-llama|smollm2-135m|llama-1b|FOLDER] [--steps 4] [--batch 8]
                                   [--length 64] [--quick]

``--model llama-1b``: a random-weight LLaMA of about 1.2B parameters (22 layers of hidden 2048, intermediate 5632,
32 heads / 8 key-value heads as TinyLlama-1.1B, untied, SmolLM2's tokenizer and vocabulary of 49,152), written
once (bfloat16 file, run in float32) under ``.cache/llama-1b-random``; needs the [llm] extra for the tokenizer.

Each configuration runs in fresh processes (torch.multiprocessing, G of them): the blueprint (the whole base's
weights) is written once by the parent and memory-mapped by the ranks, which copy only their slices. Reported per
rank: the bytes of base parameters it holds (stage 0: the whole base; stage 3: its partitions), its peak RSS (the
process, torch and DeepSpeed included), and the seconds per local step of one client's training (after one
warm-up client). The acceptance line: per-rank base bytes at G = 2 stage 3 are at most 0.6 of G = 1's.
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import set_run_env  # noqa: E402  (also puts the checkout on sys.path)


def _overrides(model: str, steps: int, batch: int, length: int, stage: int, ranks: int) -> list[str]:
    out = [
        f"model.name={model}",
        "method.name=ffa_lora",
        f"federation.local_steps={steps}",
        f"federation.batch_size={batch}",
        f"data.max_length={length}",
        "data.synthetic_examples=200",
        "runtime.cpus_per_worker=1",
    ]
    if stage:
        out += ["runtime.backend=ray", f"runtime.zero.stage={stage}", f"runtime.zero.ranks={ranks}"]
    return out


def _prepare(overrides: list[str], path: Path) -> None:
    from fedsim.data.federated import build_federated_data
    from fedsim.data.sources import load_source
    from fedsim.model.adapters import attach_adapter, get_state
    from fedsim.model.build import blueprint_of, build_base_model, build_tokenizer
    from fedsim.validation import load_config

    cfg, _ = load_config("tiny-lm", overrides)
    ds = load_source(cfg.data, cfg.seed, cfg.task.kind)
    tok = build_tokenizer(cfg.model, ds.texts)
    data = build_federated_data(cfg, ds, tok)
    base = build_base_model(cfg.model, data.num_labels, tok, cfg.seed, cfg.task.kind)
    bp = blueprint_of(base)
    state = get_state(attach_adapter(base, cfg.lora, bp.family, cfg.seed, bp.task))
    torch.save({"bp": bp, "data": data, "state": state}, path)


LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def llama_1b_folder(cache: Path) -> Path:
    """A random-weight LLaMA of about 1.2B parameters (:data:`LLAMA_1B`, seeded) with SmolLM2's tokenizer, saved
    once under ``cache`` (reused when its config.json exists)."""
    folder = cache / "llama-1b-random"
    if (folder / "config.json").is_file():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsim.config.schema import ModelConfig
    from fedsim.model.build import build_tokenizer
    from fedsim.model.registry import SMOLLM2

    tok = build_tokenizer(ModelConfig(name=SMOLLM2), [])
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **LLAMA_1B)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"writing {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B random parameters to {folder}")
    partial = folder.with_name(folder.name + ".partial")  # renamed when whole: a killed write is redone
    tok.save_pretrained(partial)
    model.save_pretrained(partial)
    partial.rename(folder)
    return folder


def _rank(rank: int, world: int, port: int, overrides: list[str], blob: str, out: str) -> None:
    from fedsim.client.worker import ClientWorker
    from fedsim.types import ClientTask
    from fedsim.validation import load_config

    torch.set_num_threads(1)
    cfg, _ = load_config("tiny-lm", overrides)
    saved = torch.load(blob, mmap=True, weights_only=False)
    bp, data, state = saved["bp"], saved["data"], saved["state"]
    if cfg.runtime.zero.stage:
        from fedsim.client.zero import init_group

        init_group(rank, world, "127.0.0.1", port, use_cuda=False)
        worker = ClientWorker(0, cfg, bp, data)  # runtime.zero.stage > 0: the ZeRO engine
        base_bytes = worker.resident_bytes()
    else:
        worker = ClientWorker(0, cfg, bp, data)
        base_bytes = sum(  # named_parameters lists a tied weight once
            p.numel() * p.element_size() for n, p in worker.model.named_parameters() if "lora_" not in n
        )
    del saved, bp
    method = worker.method
    plan = method.first_plan(state)
    biggest = max(range(len(data.client_train)), key=lambda k: len(data.client_train[k]))
    task = ClientTask(1, biggest, plan)
    worker.train(task, state, None, None)  # warm-up
    t0 = time.perf_counter()
    res = worker.train(task, state, None, None)
    seconds = (time.perf_counter() - t0) / max(1, res.result.steps)
    assert res.result.status == "ok", res.result.error
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"base_bytes": int(base_bytes), "rss": int(rss), "s_per_step": seconds}, f"{out}.{rank}")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    set_run_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny-llama, 1 step, batch 4, length 32")
    args = ap.parse_args()
    if args.quick:
        args.model, args.steps, args.batch, args.length = "tiny-llama", 1, 4, 32
    label = args.model
    if args.model == "llama-1b":
        args.model = str(llama_1b_folder(Path(__file__).resolve().parents[2] / ".cache"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "blueprint.pt"
        _prepare(_overrides(args.model, args.steps, args.batch, args.length, 0, 1), blob)
        for stage, ranks in ((0, 1), (3, 1), (3, 2)):
            over = _overrides(args.model, args.steps, args.batch, args.length, stage, ranks)
            out = str(Path(tmp) / f"s{stage}g{ranks}")
            mp.spawn(_rank, args=(ranks, _port(), over, str(blob), out), nprocs=ranks, join=True)
            got = [torch.load(f"{out}.{r}") for r in range(ranks)]
            rows.append((stage, ranks, got))
    g1 = next(max(r["base_bytes"] for r in got) for s, g, got in rows if (s, g) == (3, 1))
    g2 = next(max(r["base_bytes"] for r in got) for s, g, got in rows if (s, g) == (3, 2))
    print(f"model {label}, {args.steps} local steps, batch {args.batch}, length {args.length}, CPU, gloo\n")
    print("| stage | ranks | base MiB per rank (max) | peak RSS MiB per rank (max) | s / step |")
    print("|---:|---:|---:|---:|---:|")
    for stage, ranks, got in rows:
        base = max(r["base_bytes"] for r in got) / 2**20
        rss = max(r["rss"] for r in got) / 2**20
        sec = max(r["s_per_step"] for r in got)
        print(f"| {stage} | {ranks} | {base:.2f} | {rss:.0f} | {sec:.3f} |")
    ratio = g2 / g1
    print(f"\nper-rank base bytes, stage 3: G=2 / G=1 = {ratio:.3f} ({'ok' if ratio <= 0.6 else 'FAIL'}: <= 0.6)")


if __name__ == "__main__":
    main()
