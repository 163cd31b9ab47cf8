"""The same federated jobs in Flower's simulation engine and in fedsim, interleaved and repeated: wall times, medians,
ranges and ratios.

Two jobs (``--jobs``, default both), each run by every side in a fresh subprocess:

* ``minilm`` (``_common.minilm_job``): bundled MiniLM + LoRA r=8, alpha=16 on query/value + trained head, FedAvg over
  all adapter tensors weighted by examples, BBC News in iid shards, ``--clients`` clients, ``--cohort`` per round,
  ``--local-steps`` plain-SGD steps of ``--batch-size`` per client, ``--rounds`` rounds.
* ``small`` (``_common.small_job``): a 2-layer BERT of hidden size 64 (random weights, MiniLM's tokenizer), the same
  LoRA / FedAvg / SGD, 100 clients of 64 synthetic examples, 10 per round, 20 rounds of 10 steps of 16, 32 tokens:
  little compute per client, many clients, where start-up and per-round framework costs show.

Both: ``--workers`` parallel client executors of ``--threads`` CPU(s) each (fedsim: ClientWorker actors; Flower:
ClientApp actors via ``client_resources``), one evaluation on the global test set after the last round, no DP.

The model mode is the same on both sides (``--base-dropout``, default ``on``; a ``--fedsim-set model.base_dropout=``
sets it too): ``on`` trains the whole model in training mode (the frozen base's dropout active, fedsim's default);
``off`` is fedsim's ``model.base_dropout: false`` (which ``runtime.clients_per_pass`` > 1 needs), and Flower's
client then calls the very function fedsim's trainer calls (``fedsim.model.train_mode.set_train_mode``): only the
adapter parts and the trained head (without its dropout) in training mode, every other module of the base in
evaluation mode. The table prints each side's mode, and for Flower the number of modules its handler found in
training mode, checked against the count fedsim's function gives on the same model.

This script (in fedsim's venv) first exports each job: the tokenised data and client shards (``.npz``) and the
frozen base model (safetensors + JSON) that fedsim's own builders make, so every side trains on identical inputs.
Then, ``--repeats`` times (default 3), every side once, each in a fresh subprocess, in an order that rotates each
repeat (repeat 1: the Flower variants then fedsim; repeat 2 starts with the second side; ...), so no side always
runs first or last:

* fedsim: ``run_simulation`` (Ray backend, ``runtime.checkpoint_every = 0`` unless ``--fedsim-checkpoint-every``;
  ``--fedsim-set KEY=VALUE`` overrides any key of fedsim's side, e.g. ``runtime.clients_per_pass=5``).
* Flower (``--flower-variants``, default both): ``flwr.simulation.run_simulation`` with a ``ServerApp`` running the
  message-API ``FedAvg`` strategy and a ``ClientApp`` whose train handler loads the global arrays into a
  MiniLM/BERT+LoRA model (fedsim's ``model_from_blueprint`` + ``attach_adapter``), runs the same batches (fedsim's
  ``batch_schedule`` and seeds) with the same hand-written loop as the bare loop of overhead.py, and replies with the
  arrays and ``num-examples``. ``tutorial``: the handler builds the model and loads the client's data in every
  message, as Flower's tutorials write a ClientApp (``Net()`` / ``from_pretrained`` and ``load_data(partition_id)``
  inside ``train``); ``cached``: model and data are built once per Ray actor process and reused (kinder to Flower
  than its tutorials). Flower samples its cohort itself (random), fedsim by its seeded sampler: with equal-size iid
  shards every client costs the same.

Flower runs from its own virtual environment ``.cache/flower-venv`` (git-ignored), which this script creates on
first use with ``pip install "torch==<fedsim's>" "flwr[simulation]==<--flwr-version>"`` and fedsim's versions of
transformers, peft, opacus, safetensors and numpy. flwr 1.42.0 (the newest) needs certifi>=2026.10.19, which the
package index here does not have, hence the default 1.41.0 (it pins ray 2.55.1; fedsim's venv has its own Ray).

Every side pads each batch to its longest row (fedsim's trainer does; Flower's Hugging Face tutorial does it with
``DataCollatorWithPadding``; the shared loop here drops the columns no row of the batch uses).

Reported per side, as the median and range (min-max) over the repeats: the subprocess's wall time (interpreter start
to exit: imports, Ray start, model build, rounds, shutdown: the like-for-like number; fedsim's without the ~1 s its
measuring hook spends reading Ray's timeline and the final state after the run, reported as ``measure_s``); the
time to the first trained client (from the subprocess's launch to the end of the first client's local training:
Flower, its first train handler returning; fedsim, its first ``train`` call finishing in a worker, from Ray's task
events); the federated loop (fedsim: the sum of rounds.parquet ``wall_s``, from the end of set-up to the last
round's row; Flower: ``strategy.start``; start-up falls differently: fedsim's workers build their model when they
start, before round 1, Flower's actors on their first message, inside the loop); the steady round: each run's median
of rounds 2..R-1 (needs ``--rounds`` >= 3). Both sides evaluate the initial model and the last round's on the global
test set (fedsim always evaluates the initial model; Flower's ``evaluate_fn`` does it at round 0, as its tutorials'
central evaluation does) and time a round from one end-of-round mark to the next: fedsim's ``wall_s`` of round t runs
from round t-1's completed row to round t's (so it holds round t-1's recording: tables, TensorBoard, checkpoint),
Flower's from the return of one ``evaluate_fn`` call to the next's (they come before round 1 and after every
round's aggregation, so it holds Flower's bookkeeping after round t-1). Round 1 differs (fedsim's holds the initial
evaluation, run after round 1's training; Flower's does not, and holds its actors' start-up) and round R holds the
final evaluation: hence rounds 2..R-1. The script checks that both sides give one time per round. Ratios are Flower
/ fedsim (> 1: fedsim is faster): the ratio of the medians, and in brackets the range of the ratios within each
repeat. With a cohort of every client the sides do the same computation and the final adapters are compared.

At the start it prints the command line, the UTC date, ``nproc`` and the load averages; it writes everything
(conditions, every run's figures and per-round times, the medians, ranges and ratios) to ``<--out>/vs_flower.json``
and the tables to ``<--out>/vs_flower.md``.

    python benchmarks/perf/vs_flower.py --out .cache/vs-flower      # both jobs, dropout on both sides, 3 repeats
    python benchmarks/perf/vs_flower.py --jobs small --base-dropout off --fedsim-set runtime.clients_per_pass=5
    python benchmarks/perf/vs_flower.py --quick --repeats 2         # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    ROOT,
    fmt_spread,
    local_train,
    markdown_table,
    max_abs_diff,
    minilm_job_of,
    parse_sets,
    read_table,
    run_conditions,
    set_run_env,
    small_job,
    spread,
)

FLOWER_VENV = ROOT / ".cache" / "flower-venv"
PROBE = "import flwr, ray, torch, transformers, peft, opacus, safetensors, numpy; print(flwr.__version__)"
_CACHE: dict[str, Any] = {}  # per process (each Flower ClientApp actor keeps its model and data here)
T0_ENV = "VS_FLOWER_T0"  # the side's launch time (time.time()), set by the parent
MARKS_ENV = "VS_FLOWER_MARKS"  # Flower: file the train handler appends "<finish time> <training> <modules>" to
SETS_FILE = "fedsim-set.json"  # --fedsim-set overrides (fedsim's side only)
BASE_DROPOUT = "model.base_dropout"  # in job.json: the model mode of every side
FIGURES = ("wall_s", "first_client_s", "loop_s", "steady_s", "eval_accuracy")  # what a run reports, summarised


# ----------------------------------------------------------------------------------------------- the Flower venv


def ensure_flower_venv(venv: Path, flwr_version: str) -> Path:
    """The Flower venv's python; creates the venv and installs into it if ``PROBE`` fails there."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", PROBE], capture_output=True).returncode == 0:
        return py
    print(f"creating the Flower venv {venv} (flwr[simulation]=={flwr_version}); this takes a few minutes", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [
        f"torch=={version('torch').split('+')[0]}",  # torch pinned in every pip call
        f"flwr[simulation]=={flwr_version}",
        *(f"{p}=={version(p)}" for p in ("transformers", "peft", "opacus", "safetensors", "numpy")),
    ]
    subprocess.run([str(py), "-m", "pip", "install", *pins], check=True)
    subprocess.run([str(py), "-c", PROBE], check=True)
    return py


# ----------------------------------------------------------------------------------------------- the job export


def export_job(job: dict[str, Any], job_dir: Path) -> None:
    """Build data and base model with fedsim's builders; write job.json, data.npz (token ids, labels, shards),
    texts.json and tokenizer/ (for the tutorial-style Flower client, which tokenises in its handler),
    base.safetensors and base.json."""
    import numpy as np
    from safetensors.torch import save_file

    from fedsim.data.federated import build_federated_data
    from fedsim.data.sources import load_source
    from fedsim.model.build import blueprint_of, build_base_model, build_tokenizer
    from fedsim.validation import config_from_dict

    cfg = config_from_dict(job)
    dataset = load_source(cfg.data, cfg.seed)
    tokenizer = build_tokenizer(cfg.model, dataset.texts)
    data = build_federated_data(cfg, dataset, tokenizer)
    bp = blueprint_of(build_base_model(cfg.model, data.num_labels, tokenizer, cfg.seed))
    job_dir.mkdir(parents=True, exist_ok=True)
    np.savez(
        job_dir / "data.npz",
        input_ids=data.input_ids,
        attention_mask=data.attention_mask,
        labels=data.labels,
        test_indices=data.test_indices,
        client_offsets=np.asarray(data.client_train.offsets),
        client_flat=np.asarray(data.client_train.flat),
    )
    (job_dir / "texts.json").write_text(json.dumps(list(dataset.texts)))  # raw texts, row-aligned
    tokenizer.save_pretrained(str(job_dir / "tokenizer"))
    save_file({k: v.contiguous() for k, v in bp.weights.items()}, str(job_dir / "base.safetensors"))
    (job_dir / "base.json").write_text(json.dumps({"config": bp.config, "family": bp.family}, default=str))
    (job_dir / "job.json").write_text(json.dumps(job, indent=2))


# ----------------------------------------------------------------------------------------------- the Flower side


def _model(root: Path, job: dict[str, Any]) -> Any:
    """A fresh MiniLM/BERT + LoRA model from the exported blueprint files, every adapter tensor trainable."""
    import torch
    from safetensors.torch import load_file

    from fedsim.config.schema import LoraConfig
    from fedsim.model.adapters import adapter_keys, attach_adapter, set_trainable
    from fedsim.model.build import BaseBlueprint, model_from_blueprint

    torch.set_num_threads(int(job["runtime.cpus_per_worker"]))
    meta = json.loads((root / "base.json").read_text())
    bp = BaseBlueprint(config=meta["config"], weights=load_file(str(root / "base.safetensors")), family=meta["family"])
    lora = LoraConfig(r=job["lora.r"], alpha=job["lora.alpha"], dropout=job["lora.dropout"])
    model = attach_adapter(model_from_blueprint(bp), lora, bp.family, job["seed"])
    set_trainable(model, adapter_keys(model))
    return model


def _model_and_data(job_dir: str) -> dict[str, Any]:
    """This process's model, data tensors and job, built once per process (the cached variant, the ServerApp)."""
    if job_dir in _CACHE:
        return _CACHE[job_dir]
    import numpy as np
    import torch

    from fedsim.model.adapters import adapter_keys, parameters_for

    root = Path(job_dir)
    job = json.loads((root / "job.json").read_text())
    model = _model(root, job)
    keys = adapter_keys(model)
    with np.load(root / "data.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    entry = {
        "job": job,
        "model": model,
        "keys": keys,
        "params": parameters_for(model, keys),
        "tensors": [torch.as_tensor(arrays[k], dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")],
        "arrays": arrays,
    }
    _CACHE[job_dir] = entry
    return entry


def _tutorial_client(job_dir: str, cid: int) -> dict[str, Any]:
    """What a Flower tutorial's train handler builds in every message: the model (``Net()`` / ``from_pretrained``)
    and the client's data (``load_data(partition_id)``: its rows of the dataset, which the tutorials keep in a
    module-level FederatedDataset, tokenised with a tokenizer loaded there). Gives the same token ids as fedsim's
    export (same tokenizer and padding), so the computation is the same."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from fedsim.model.adapters import adapter_keys, parameters_for

    root = Path(job_dir)
    if "raw" not in _CACHE:  # the raw dataset and the partitioning, loaded once per process (FederatedDataset)
        with np.load(root / "data.npz", allow_pickle=False) as z:
            parts = {k: z[k] for k in ("labels", "client_offsets", "client_flat")}
        _CACHE["raw"] = (json.loads((root / "texts.json").read_text()), parts)
    texts, parts = _CACHE["raw"]
    job = json.loads((root / "job.json").read_text())
    model = _model(root, job)
    keys = adapter_keys(model)
    off = parts["client_offsets"]
    rows = parts["client_flat"][off[cid] : off[cid + 1]]
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    enc = tokenizer(
        [texts[i] for i in rows],
        padding="max_length",
        truncation=True,
        max_length=job["data.max_length"],
        return_tensors="pt",
    )
    labels = torch.as_tensor(parts["labels"][rows], dtype=torch.long)
    return {
        "job": job,
        "model": model,
        "keys": keys,
        "params": parameters_for(model, keys),
        "data": (enc["input_ids"].long(), enc["attention_mask"].long(), labels),
    }


def training_modules(model: Any) -> tuple[int, int]:
    """(modules in training mode, all modules) of ``model``."""
    modes = [m.training for m in model.modules()]
    return sum(modes), len(modes)


def expected_training_modules(job_dir: Path, base_dropout: bool) -> tuple[int, int]:
    """:func:`training_modules` of the job's model after fedsim's ``set_train_mode(model, base_dropout)``: what
    fedsim's trainer trains in, and what Flower's handler must find."""
    import torch

    from fedsim.model.train_mode import set_train_mode

    threads = torch.get_num_threads()
    model = _model(job_dir, json.loads((job_dir / "job.json").read_text()))
    torch.set_num_threads(threads)
    set_train_mode(model, base_dropout)
    return training_modules(model)


def flower_train(msg: Any, context: Any) -> Any:
    """ClientApp train handler: global arrays in, the same local SGD steps as fedsim's trainer in the same model
    mode (fedsim's ``set_train_mode`` with the job's ``model.base_dropout``), arrays out; appends its finish time
    and the number of modules it trained in training mode to the marks file."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from fedsim.client.step_loop import batch_schedule
    from fedsim.model.adapters import get_state, set_state
    from fedsim.model.train_mode import set_train_mode
    from fedsim.seeding import derive_seed, torch_generator

    cid = int(context.node_config["partition-id"])
    if os.environ.get("VS_FLOWER_REBUILD") == "1":  # as the tutorials: model and data built in the handler
        w = _tutorial_client(os.environ["VS_FLOWER_JOB"], cid)
        ids, mask, labels = w["data"]
    else:
        w = _model_and_data(os.environ["VS_FLOWER_JOB"])
        off = w["arrays"]["client_offsets"]
        idx = torch.as_tensor(w["arrays"]["client_flat"][off[cid] : off[cid + 1]], dtype=torch.long)
        ids, mask, labels = (x[idx] for x in w["tensors"])
    job, model, keys, params = w["job"], w["model"], w["keys"], w["params"]
    rnd = int(msg.content["config"]["server-round"])
    set_state(model, dict(msg.content["arrays"].to_torch_state_dict()))
    seed, n = job["seed"], len(labels)
    batches = batch_schedule(
        n,
        job["federation.batch_size"],
        job["federation.local_steps"],
        False,
        torch_generator(seed, "batches", rnd, cid),
    )
    opt = torch.optim.SGD(params, lr=job["federation.lr"])
    set_train_mode(model, bool(job.get(BASE_DROPOUT, True)))  # as fedsim's trainer (model.train() when true)
    training, modules = training_modules(model)
    _, _, losses = local_train(model, params, opt, ids, mask, labels, batches, derive_seed(seed, "dropout", rnd, cid))
    model.eval()
    for p in params:
        p.grad = None
    with open(os.environ[MARKS_ENV], "a") as marks:  # one short line per call: appends do not interleave
        marks.write(f"{time.time()!r} {training} {modules}\n")
    metrics = MetricRecord({"num-examples": n, "train_loss": sum(losses) / max(len(losses), 1)})
    content = RecordDict({"arrays": ArrayRecord(get_state(model, keys)), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _evaluate(job_dir: str, state: dict[str, Any]) -> dict[str, float]:
    """Loss and accuracy of ``state`` on the global test set (chunks of ``runtime.eval_batch_size`` = 64)."""
    import torch
    import torch.nn.functional as F

    from fedsim.model.adapters import set_state

    w = _model_and_data(job_dir)
    model = w["model"]
    set_state(model, state)
    model.eval()
    test = torch.as_tensor(w["arrays"]["test_indices"], dtype=torch.long)
    ids, mask, labels = (x[test] for x in w["tensors"])
    loss, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(test), 64):
            logits = model(input_ids=ids[s : s + 64], attention_mask=mask[s : s + 64]).logits.float()
            loss += float(F.cross_entropy(logits, labels[s : s + 64], reduction="sum"))
            correct += int((logits.argmax(-1) == labels[s : s + 64]).sum())
    return {"eval_loss": loss / len(test), "eval_accuracy": correct / len(test)}


def flower_side(job_dir: Path, result_path: Path) -> int:
    """Run the job in Flower's simulation engine; write {loop_s, final state file, eval} to ``result_path``."""
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from safetensors.torch import save_file

    from fedsim.model.adapters import get_state

    os.environ["VS_FLOWER_JOB"] = str(job_dir)  # inherited by the Ray actor processes
    job = json.loads((job_dir / "job.json").read_text())
    clients, cohort, rounds = job["federation.clients"], job["federation.clients_per_round"], job["federation.rounds"]
    workers, threads = job["runtime.workers"], job["runtime.cpus_per_worker"]
    out: dict[str, Any] = {}

    client_app = ClientApp()
    client_app.train()(flower_train)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        initial = get_state(_model_and_data(str(job_dir))["model"])

        marks: list[float] = []
        out["round_s"] = []

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            """Called before round 1 (round 0) and after every round's aggregation. Evaluates the initial model
            and the last round's on the global test set, as fedsim does (its initial evaluation runs in round 1
            with checkpoint_every 0); a round ends when this returns, as fedsim's with its completed row."""
            ev = _evaluate(str(job_dir), dict(arrays.to_torch_state_dict())) if server_round in (0, rounds) else None
            marks.append(time.perf_counter())
            if len(marks) > 1:
                out["round_s"].append(marks[-1] - marks[-2])
            if ev is not None:
                out["eval" if server_round == rounds else "initial_eval"] = ev
            return MetricRecord(ev) if ev is not None else None

        strategy = FedAvg(
            fraction_train=cohort / clients,
            fraction_evaluate=0.0,
            min_train_nodes=cohort,
            min_evaluate_nodes=0,
            min_available_nodes=clients,
        )
        t0 = time.perf_counter()
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds, evaluate_fn=evaluate_fn
        )
        out["loop_s"] = time.perf_counter() - t0
        final = {k: v.clone() for k, v in result.arrays.to_torch_state_dict().items()}
        save_file(final, str(result_path.with_suffix(".safetensors")))

    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=clients,
            backend_config={
                "client_resources": {"num_cpus": threads, "num_gpus": 0.0},
                "init_args": {"num_cpus": int(workers * threads), "include_dashboard": False},
            },
        )
    except BaseException:  # Flower leaves non-daemon threads behind after a failure: exit hard, do not hang
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if "loop_s" not in out:
        print("Flower's ServerApp did not finish (see its log above)", file=sys.stderr)
        return 1
    result_path.write_text(json.dumps(out, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------- the fedsim side


def fedsim_side(job_dir: Path, result_path: Path) -> int:
    """Run the job with fedsim; write {loop_s, eval} and the final state next to ``result_path``."""
    from safetensors.torch import save_file
    from startup import actor_events

    from fedsim.simulation import run_simulation
    from fedsim.validation import config_from_dict

    job = json.loads((job_dir / "job.json").read_text())
    job.update(json.loads((job_dir / SETS_FILE).read_text()) if (job_dir / SETS_FILE).is_file() else {})
    cfg = config_from_dict(job)
    run_dir = result_path.parent / "fedsim-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a folder reused by --out: this run's tables only
    box: dict[str, Any] = {}
    t0 = float(os.environ[T0_ENV])

    def inspect(backend: Any) -> None:  # measuring, not part of the job: its seconds are reported apart
        started = time.time()
        box["g"] = backend.global_state()
        box["first_client_s"] = actor_events(t0).get("first_client")
        box["measure_s"] = time.time() - started

    run_simulation(cfg, run_dir, label="vs_flower", progress=False, inspect=inspect)
    save_file({k: v.contiguous() for k, v in box["g"].items()}, str(result_path.with_suffix(".safetensors")))
    rounds = read_table(run_dir / "rounds.parquet")
    ev = {"eval_loss": rounds[-1]["eval_loss"], "eval_accuracy": rounds[-1]["eval_accuracy"]}
    out = {
        "base_dropout": cfg.model.base_dropout,
        "loop_s": sum(r["wall_s"] for r in rounds),
        "round_s": [r["wall_s"] for r in rounds],
        "eval": ev,
        "first_client_s": box["first_client_s"],
        "measure_s": box["measure_s"],
    }
    result_path.write_text(json.dumps(out, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------- driver


def steady(round_s: list[float]) -> float | None:
    """Median seconds of rounds 2 .. R-1 (no start-up, no final evaluation), or None with fewer than 3 rounds."""
    inner = round_s[1:-1]
    return statistics.median(inner) if inner else None


def run_side(python: str, side: str, job_dir: Path, work: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """One side (``flower-cached``, ``flower-tutorial`` or ``fedsim``) in a fresh subprocess (own session; killed
    with its Ray processes after ``timeout`` seconds) writing into ``work``; its result JSON plus the subprocess wall
    time, the steady round and, for Flower, the time to its first trained client and the modules its handler found
    in training mode (from the marks it wrote). Raises SystemExit when the side fails or runs past ``timeout``."""
    work.mkdir(parents=True, exist_ok=True)
    result = work / f"{side}.json"
    marks = work / f"{side}.marks"
    marks.unlink(missing_ok=True)
    code = f"import sys, vs_flower; sys.exit(vs_flower.side_main({side!r}, {str(job_dir)!r}, {str(result)!r}))"
    load = os.getloadavg()[0]
    t0 = time.time()
    side_env = {
        **env,
        T0_ENV: repr(t0),
        MARKS_ENV: str(marks),
        "VS_FLOWER_REBUILD": str(int(side == "flower-tutorial")),
    }
    proc = subprocess.Popen([python, "-c", code], env=side_env, cwd=str(HERE), start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds this side's Ray processes too
        proc.wait()
        raise SystemExit(f"the {side} side ran past --timeout {timeout:.0f} s and was stopped") from None
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"the {side} side failed (exit {rc}); see its output above")
    out = json.loads(result.read_text())
    out["load_1min_before"] = load
    out["raw_wall_s"] = wall
    out["wall_s"] = wall - out.get("measure_s", 0.0)  # fedsim: without reading Ray's timeline for the first client
    out["steady_s"] = steady(out["round_s"])
    out["eval_accuracy"] = out["eval"]["eval_accuracy"]
    if side.startswith("flower"):
        lines = [line.split() for line in marks.read_text().splitlines()] if marks.is_file() else []
        out["first_client_s"] = min(float(x[0]) for x in lines) - t0 if lines else None
        out["training_modules"] = sorted({(int(x[1]), int(x[2])) for x in lines})  # one pair if every call agreed
    return out


def side_main(side: str, job_dir: str, result: str) -> int:
    set_run_env()
    run = flower_side if side.startswith("flower") else fedsim_side
    return run(Path(job_dir), Path(result))


def mode_label(base_dropout: bool) -> str:
    """The model mode during local training, in words."""
    return "train (base dropout on)" if base_dropout else "base eval, adapters train"


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per side: median / min / max of every figure over its runs; per Flower side: the ratio of the medians to
    fedsim's and the spread of the ratios within each repeat (runs paired by repeat)."""
    sides = {side: {f: spread([r.get(f) for r in rs]) for f in FIGURES} for side, rs in runs.items()}
    ratios: dict[str, Any] = {}
    fs = runs["fedsim"]
    for side, rs in runs.items():
        if side == "fedsim":
            continue
        ratios[side] = {}
        for f in FIGURES[:4]:
            a, b = sides[side][f]["median"], sides["fedsim"][f]["median"]
            paired = [x[f] / y[f] if x.get(f) is not None and y.get(f) else None for x, y in zip(rs, fs, strict=True)]
            ratios[side][f] = {"of_medians": a / b if a is not None and b else None, "per_repeat": spread(paired)}
    return {"sides": sides, "ratios": ratios}


NAMES = {"flower-cached": "Flower (model cached per actor)", "flower-tutorial": "Flower (as its tutorials)"}


def report(job: dict[str, Any]) -> str:
    """The Markdown table of one job's summary: a row per side (median (min-max) over the repeats), then the
    Flower / fedsim ratios (of the medians, and (min-max) of the ratios within each repeat)."""
    summary, modes = job["summary"], job["modes"]
    rows = []
    for side, fig in summary["sides"].items():
        mode = mode_label(modes[side]["base_dropout"])
        seen = modes[side].get("flower_training_modules")
        mode += f", {'/'.join(map(str, seen[0])) if len(seen or []) == 1 else seen} modules training" if seen else ""
        rows.append(
            [
                NAMES.get(side, side),
                mode,
                *(fmt_spread(fig[f], ".1f") for f in ("wall_s", "first_client_s", "loop_s")),
                fmt_spread(fig["steady_s"], ".2f"),
                fmt_spread(fig["eval_accuracy"], ".3f"),
            ]
        )
    for side, rat in summary["ratios"].items():
        cells = []
        for f in FIGURES[:4]:
            of = rat[f]["of_medians"]
            per = dict(rat[f]["per_repeat"], median=of) if of is not None else rat[f]["per_repeat"]
            cells.append(fmt_spread(per, ".2f", "x") if of is not None else "n/a")
        rows.append([f"{NAMES.get(side, side)} / fedsim", "", *cells, ""])
    headers = [
        "",
        "model mode in local training",
        "process wall s",
        "first client trained s",
        "federated loop s",
        "s / round (2..R-1)",
        "final accuracy",
    ]
    return markdown_table(headers, rows, (2, 3, 4, 5, 6))


def resolve_base_dropout(flag: str | None, sets: dict[str, Any]) -> bool:
    """The model mode of every side: ``--base-dropout on|off`` or a ``--fedsim-set model.base_dropout=`` (removed
    from ``sets``: it goes into the job both sides read), default on. Raises SystemExit when the two disagree or the
    set value is not a boolean."""
    given = sets.pop(BASE_DROPOUT, None)
    if given is not None and not isinstance(given, bool):
        raise SystemExit(f"--fedsim-set {BASE_DROPOUT}: expected true or false, got {given!r}")
    if flag is not None and given is not None and (flag == "on") != given:
        raise SystemExit(f"--base-dropout {flag} contradicts --fedsim-set {BASE_DROPOUT}={str(given).lower()}")
    return given if given is not None else flag != "off"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", nargs="+", default=["minilm", "small"], choices=["minilm", "small"])
    ap.add_argument("--clients", type=int, default=20, help="minilm job: clients")
    ap.add_argument("--cohort", type=int, default=10, help="minilm job: clients per round")
    ap.add_argument("--rounds", type=int, default=5, help="minilm job: rounds")
    ap.add_argument("--local-steps", type=int, default=5, help="minilm job: SGD steps per client")
    ap.add_argument("--batch-size", type=int, default=16, help="minilm job: batch size")
    ap.add_argument("--max-length", type=int, default=64, help="minilm job: tokens per example")
    ap.add_argument("--small-rounds", type=int, default=20, help="small job: rounds (100 clients, 10 per round)")
    ap.add_argument("--workers", type=int, default=2, help="parallel client executors (Ray actors) on each side")
    ap.add_argument("--threads", type=int, default=1, help="CPUs (and torch threads) per executor")
    ap.add_argument(
        "--base-dropout",
        choices=["on", "off"],
        default=None,
        help="model mode of EVERY side in local training: on (default) = model.train(); off = fedsim's "
        "model.base_dropout: false (frozen base in eval mode, adapters in train mode), mirrored in Flower's client",
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs of every side, interleaved in rotating order")
    ap.add_argument("--fedsim-checkpoint-every", type=int, default=0, help="runtime.checkpoint_every of fedsim")
    ap.add_argument(
        "--fedsim-set", action="append", default=[], metavar="KEY=VALUE", help="override a key of fedsim's side"
    )
    ap.add_argument(
        "--flower-variants",
        nargs="+",
        default=["tutorial", "cached"],
        choices=["tutorial", "cached"],
        help="tutorial: the ClientApp builds model and data in every message; cached: once per actor",
    )
    ap.add_argument("--flwr-version", default="1.41.0", help="flwr[simulation] version for the Flower venv")
    ap.add_argument("--venv", type=Path, default=FLOWER_VENV, help="the Flower venv (created if missing)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds each side may run before it is stopped")
    ap.add_argument("--out", type=Path, default=None, help="work and results folder (default: one under .cache/)")
    ap.add_argument("--quick", action="store_true", help="smoke test: minilm job, 2 clients, 2 rounds, 1 step")
    if ap.parse_args(argv).quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(
            jobs=["minilm"], clients=2, cohort=2, rounds=2, local_steps=1, batch_size=4, max_length=32, small_rounds=2
        )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def job_of(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The fedsim config (dotted keys) of job ``name`` and its description."""
    common = {"workers": args.workers, "threads": args.threads, "checkpoint_every": args.fedsim_checkpoint_every}
    if name == "minilm":
        job = minilm_job_of(args, **common)
        return job, (
            f"MiniLM + LoRA r=8 + head, FedAvg, BBC News iid: {args.clients} clients, cohort {args.cohort}, "
            f"{args.rounds} rounds x {args.local_steps} SGD steps of batch {args.batch_size}, {args.max_length} tokens"
        )
    job = small_job(rounds=args.small_rounds, **common)
    return job, (
        f"BERT 2 layers x 64 + LoRA r=8 + head, FedAvg, synthetic iid: {job['federation.clients']} clients x "
        f"64 examples, cohort {job['federation.clients_per_round']}, {args.small_rounds} rounds x "
        f"{job['federation.local_steps']} SGD steps of batch {job['federation.batch_size']}, "
        f"{job['data.max_length']} tokens"
    )


def run_job(
    name: str, args: argparse.Namespace, sets: dict[str, Any], base_dropout: bool, flower_py: Path, work: Path
) -> dict[str, Any]:
    """Export job ``name``, run every side ``--repeats`` times interleaved (the order rotating each repeat), print
    and return its record (description, modes, runs, summary, checks)."""
    from fedsim.validation import config_from_dict

    job, what = job_of(name, args)
    job[BASE_DROPOUT] = base_dropout
    config_from_dict({**job, **sets})  # fedsim's side is valid before anything runs (raises ConfigError)
    export_job(job, work / "job")
    (work / "job" / SETS_FILE).write_text(json.dumps(sets))
    expected = list(expected_training_modules(work / "job", base_dropout))
    print(
        f"\n## {name}: {what}; {args.workers} executor(s) x {args.threads} CPU each side; model mode (every side): "
        f"{mode_label(base_dropout)}; fedsim overrides {sets or 'none'}; {args.repeats} repeat(s).\n",
        flush=True,
    )
    sides = [(f"flower-{v}", str(flower_py)) for v in args.flower_variants] + [("fedsim", sys.executable)]
    runs: dict[str, list[dict[str, Any]]] = {"fedsim": [], **{side: [] for side, _ in sides if side != "fedsim"}}
    diffs: list[float] = []
    rounds = job["federation.rounds"]
    for rep in range(args.repeats):
        order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
        print(f"### {name}, repeat {rep + 1}/{args.repeats}: {', '.join(s for s, _ in order)}", flush=True)
        for pos, (side, py) in enumerate(order):
            out = run_side(py, side, work / "job", work / f"repeat-{rep + 1}", os.environ.copy(), args.timeout)
            runs[side].append({"repeat": rep + 1, "position": pos + 1, **out})
            print(f"    {side}: {out['wall_s']:.1f} s", flush=True)
        if job["federation.clients_per_round"] == job["federation.clients"]:
            from safetensors.torch import load_file

            mine = load_file(str(work / f"repeat-{rep + 1}" / "fedsim.safetensors"))
            for side in (s for s in runs if s != "fedsim"):
                diffs.append(max_abs_diff(load_file(str(work / f"repeat-{rep + 1}" / f"{side}.safetensors")), mine))
    modes = {"fedsim": {"base_dropout": runs["fedsim"][0]["base_dropout"], "expected_training_modules": expected}}
    for side in (s for s in runs if s != "fedsim"):
        seen = sorted({tuple(p) for r in runs[side] for p in r["training_modules"]})
        modes[side] = {"base_dropout": base_dropout, "flower_training_modules": [list(p) for p in seen]}
    checks = {
        "same_mode": all(m["base_dropout"] == base_dropout for m in modes.values())
        and all(m.get("flower_training_modules", [expected]) == [expected] for m in modes.values()),
        "one_time_per_round": all(len(r["round_s"]) == rounds for rs in runs.values() for r in rs),
        "final_adapters_max_abs_diff": max(diffs) if diffs else None,
    }
    record = {"job": name, "description": what, "config": job, "fedsim_set": sets, "modes": modes}
    record.update({"runs": runs, "summary": summarise(runs), "checks": checks})
    print("\n" + report(record))
    print(f"\nchecks: {json.dumps(checks)} (fedsim's expected modules in training mode: {expected[0]}/{expected[1]})")
    if not (checks["same_mode"] and checks["one_time_per_round"]):
        print("WARNING: the sides did not train in the same model mode or did not time every round", file=sys.stderr)
    return record


def write_results(out_dir: Path, conditions: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """``out_dir``/vs_flower.json (everything) and vs_flower.md (conditions and the tables)."""
    (out_dir / "vs_flower.json").write_text(json.dumps({"conditions": conditions, "jobs": records}, indent=2))
    c = conditions
    lines = [
        f"`{c['command']}`",
        "",
        f"{c['date_utc']} UTC to {c['end_utc']} UTC, commit {c['commit']}, flwr {c['flwr']}, nproc {c['nproc']}, "
        f"load average at the start {c['loadavg']} (1/5/15 min), at the end {c['loadavg_end']}.",
    ]
    for r in records:
        chk = r["checks"]
        lines += ["", f"### {r['job']}: {r['description']}", "", report(r), ""]
        lines.append(
            f"Each figure: median (min-max) over {len(r['runs']['fedsim'])} interleaved run(s) per side; ratios Flower "
            f"/ fedsim of the medians (min-max of the ratios within each repeat). Same model mode on every side: "
            f"{chk['same_mode']}; one time per round on every side: {chk['one_time_per_round']}."
        )
        if chk["final_adapters_max_abs_diff"] is not None:
            diff = chk["final_adapters_max_abs_diff"]
            lines.append(f"Final adapters, max abs difference Flower vs fedsim over the repeats: {diff:.2e}.")
    (out_dir / "vs_flower.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    import datetime

    args = parse_args(argv)
    conditions = run_conditions(argv)
    print(
        f"command: {conditions['command']}\ndate: {conditions['date_utc']} UTC, commit {conditions['commit']}, "
        f"nproc {conditions['nproc']} (os.cpu_count {conditions['cpu_count']}), load average "
        f"{conditions['loadavg']} (1/5/15 min)",
        flush=True,
    )
    sets = parse_sets(args.fedsim_set)
    base_dropout = resolve_base_dropout(args.base_dropout, sets)
    env = set_run_env()
    flower_py = ensure_flower_venv(args.venv, args.flwr_version)
    (ROOT / ".cache").mkdir(exist_ok=True)
    work_root = args.out or Path(tempfile.mkdtemp(prefix="fedsim-vs-flower-", dir=ROOT / ".cache"))
    work_root = work_root.resolve()  # the sides run with the script's folder as working directory
    work_root.mkdir(parents=True, exist_ok=True)
    os.environ.update({**env, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])})
    conditions["flwr"] = subprocess.run([str(flower_py), "-c", PROBE], capture_output=True, text=True).stdout.strip()
    records = [run_job(name, args, sets, base_dropout, flower_py, work_root / name) for name in args.jobs]
    conditions["end_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    conditions["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(work_root, conditions, records)
    print(f"\nresults: {work_root / 'vs_flower.md'} and {work_root / 'vs_flower.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
