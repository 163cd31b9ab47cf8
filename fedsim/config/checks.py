"""Semantic checks of a :class:`~fedsim.config.schema.Config` that need nothing but the config: value types, declared
choices, ranges and cross-key rules. Checks against what other packages declare (the method registry, model names,
data sources, the fused-pass rules of ``runtime.clients_per_pass``, the form of ``runtime.address``) are
application-level: :mod:`fedsim.validation` adds them (config/ sits below those packages and imports none of them)."""

from __future__ import annotations

import math

from fedsim.config.fields import BadValue, convert, get_value, leaves, show, suggest
from fedsim.config.privacy_ranges import delta_problem
from fedsim.config.schema import Config


def _proportion_problems(rows: list[list[float]] | None, required: bool) -> list[str]:
    key = "data.partition.proportions"
    if not rows:
        if required:
            return [
                f"{key}: required when data.partition.kind is label_proportions; give one label "
                "distribution per client, e.g. [[0.9, 0.1], [0.1, 0.9]]"
            ]
        return []
    out = []
    for i, row in enumerate(rows):
        if not row or any(not math.isfinite(x) or x < 0 for x in row) or sum(row) <= 0:
            out.append(
                f"{key}[{i}]: must be a non-empty list of non-negative numbers with a positive sum "
                f"(got {row}); e.g. [0.9, 0.1]"
            )
    if len({len(r) for r in rows}) > 1:
        out.append(
            f"{key}: rows have different lengths {sorted({len(r) for r in rows})}; "
            "give one share per class in every row"
        )
    return out


def _task_problems(cfg: Config) -> list[str]:
    if cfg.task.max_new_tokens < 1:
        return [f"task.max_new_tokens must be >= 1 (got {show(cfg.task.max_new_tokens)}); e.g. 16"]
    return []


def _privacy_problems(cfg: Config) -> list[str]:
    pr = cfg.privacy
    out: list[str] = []
    if pr.clip <= 0:
        out.append(f"privacy.clip must be > 0 (got {show(pr.clip)}); the per-example clipping norm, e.g. 2.0")
    if pr.client_clip <= 0:
        out.append(f"privacy.client_clip must be > 0 (got {show(pr.client_clip)}); e.g. 1.0")
    delta = delta_problem(pr.delta)
    if delta:
        out.append(delta)
    if pr.epsilon is not None and pr.epsilon <= 0:
        out.append(f"privacy.epsilon must be > 0 (got {show(pr.epsilon)}); e.g. 8, or null for no target")
    if pr.noise_multiplier is not None and pr.noise_multiplier < 0:
        out.append(f"privacy.noise_multiplier must be >= 0 (got {show(pr.noise_multiplier)}); e.g. 1.0")
    if pr.mode != "none":
        if pr.epsilon is not None and pr.noise_multiplier is not None:
            out.append(
                "privacy.epsilon and privacy.noise_multiplier are both set; set only one: a target epsilon "
                "(the noise is calibrated to it) or a fixed noise multiplier (epsilon is then only reported)"
            )
        if pr.epsilon is None and pr.noise_multiplier is None:
            out.append(
                f"privacy.mode is {pr.mode} but neither privacy.epsilon nor privacy.noise_multiplier is set; "
                "set a target, e.g. --set privacy.epsilon=8"
            )
    return out


def type_problems(cfg: Config) -> list[str]:
    """One line per value of ``cfg`` that does not have its field's type (empty: every value fits)."""
    problems: list[str] = []
    for key, _, tp in leaves():
        try:
            convert(get_value(cfg, key), tp, key)
        except BadValue as e:
            problems.append(str(e))
    return problems


def validate(cfg: Config) -> list[str]:
    """Every problem of ``cfg`` the config alone shows (empty list = valid as far as config/ can tell); each line
    names the key and the fix. Checks value types, declared choices, numeric ranges and cross-key constraints; the
    checks against other packages' registries are :func:`fedsim.validation.cross_package_problems`."""
    problems = type_problems(cfg)
    if problems:  # range checks below assume the right types
        return problems
    for key, f, _ in leaves():
        choices = f.metadata.get("choices")
        value = get_value(cfg, key)
        if choices and value not in choices:
            hint = suggest(value, choices) if isinstance(value, str) else ""
            problems.append(f"{key}: {show(value)} is not one of {', '.join(map(str, choices))}{hint}")

    def need(key: str, ok: bool, rule: str, fix: str) -> None:
        if not ok:
            problems.append(f"{key} must be {rule} (got {show(get_value(cfg, key))}); {fix}")

    lo, da, pa, fe, rt = cfg.lora, cfg.data, cfg.data.partition, cfg.federation, cfg.runtime
    need("seed", cfg.seed >= 0, ">= 0", "use any non-negative integer, e.g. 0")
    need("lora.r", lo.r >= 1, ">= 1", "the LoRA rank is a positive integer, e.g. 8")
    need("lora.alpha", lo.alpha > 0, "> 0", "the LoRA scale is alpha / r, e.g. alpha 16 with r 8")
    need("lora.dropout", 0 <= lo.dropout < 1, "in [0, 1)", "use 0 for no dropout")
    need("lora.targets", len(lo.targets) > 0, "non-empty", "use [auto] for the model family's query/value projections")
    need("data.text_field", bool(da.text_field), "non-empty", "name the text column, e.g. text")
    need("data.label_field", bool(da.label_field), "non-empty", "name the label column, e.g. label")
    need("data.max_length", da.max_length >= 8, ">= 8", "e.g. 128 tokens")
    need("data.test_fraction", 0 < da.test_fraction < 1, "in (0, 1)", "e.g. 0.2")
    need("data.personal_fraction", 0 <= da.personal_fraction < 1, "in [0, 1)", "use 0 to skip personalised evaluation")
    need("data.max_examples", da.max_examples is None or da.max_examples >= 1, ">= 1 or null", "null keeps all")
    need("data.synthetic_examples", da.synthetic_examples >= 1, ">= 1", "e.g. 2000")
    need("data.synthetic_classes", da.synthetic_classes >= 2, ">= 2", "e.g. 4")
    need("data.partition.alpha", pa.alpha > 0, "> 0", "smaller values mean more heterogeneous clients, e.g. 0.5")
    need("data.partition.min_examples", pa.min_examples >= 0, ">= 0", "e.g. 2")
    problems.extend(_proportion_problems(pa.proportions, pa.kind == "label_proportions"))
    need("federation.clients", fe.clients >= 1, ">= 1", "e.g. 10")
    if fe.clients >= 1 and not 1 <= fe.clients_per_round <= fe.clients:
        problems.append(
            f"federation.clients_per_round must be between 1 and federation.clients (got clients_per_round="
            f"{fe.clients_per_round}, clients={fe.clients}); set federation.clients_per_round to at most "
            f"{fe.clients} or raise federation.clients"
        )
    for key in ("federation.rounds", "federation.local_steps", "federation.batch_size", "federation.eval_every"):
        need(key, get_value(cfg, key) >= 1, ">= 1", "use a positive integer")
    need("federation.lr", fe.lr > 0, "> 0", "e.g. 0.5 for SGD or 5e-4 for AdamW")
    need("federation.local_eval_clients", fe.local_eval_clients >= 0, ">= 0", "e.g. 100; 0 turns local evaluation off")
    problems.extend(_privacy_problems(cfg))
    problems.extend(_task_problems(cfg))
    need("runtime.workers", rt.workers == "auto" or rt.workers >= 1, ">= 1 or auto", "e.g. 2")
    need(
        "runtime.placement_timeout_s",
        math.isfinite(rt.placement_timeout_s) and rt.placement_timeout_s > 0,
        "> 0",
        "seconds to wait for room for the workers, e.g. 900 (an autoscaler launching GPU nodes takes minutes)",
    )
    need(
        "runtime.accelerator_type",
        rt.accelerator_type is None or (bool(rt.accelerator_type.strip()) and ":" not in rt.accelerator_type),
        "an accelerator name or null",
        "e.g. A100 (the X of the nodes' accelerator_type:X resource); null = any node",
    )
    need("runtime.cpus_per_worker", rt.cpus_per_worker > 0, "> 0", "e.g. 1")
    need(
        "runtime.gpus_per_worker",
        rt.gpus_per_worker == "auto" or rt.gpus_per_worker >= 0,
        ">= 0 or auto",
        "0 for CPU only, 0.25 for a quarter GPU, auto to size the share from a probe client",
    )
    need("runtime.eval_batch_size", rt.eval_batch_size >= 1, ">= 1", "e.g. 64")
    k = rt.clients_per_pass  # its rules against the method and the other keys: fedsim.validation
    need(
        "runtime.clients_per_pass",
        k == "auto" or k >= 1,
        ">= 1 or auto",
        "1 trains one client at a time, e.g. 8 trains eight together",
    )
    need("runtime.checkpoint_every", rt.checkpoint_every >= 0, ">= 0", "e.g. 1; 0 = after the last round only")
    need("runtime.max_failed_fraction", 0.0 <= rt.max_failed_fraction <= 1.0, "in [0, 1]", "e.g. 0.5")
    need(
        "runtime.client_store.memory_mb",
        math.isfinite(rt.client_store.memory_mb) and rt.client_store.memory_mb >= 0,
        ">= 0",
        "the in-memory budget for kept client tensors in MiB, e.g. 512; 0 spills every client to disk",
    )
    zero = rt.zero
    need("runtime.zero.ranks", zero.ranks >= 1, ">= 1", "the ranks per ZeRO worker group, e.g. 2")
    if zero.stage == 0 and zero.ranks > 1:
        problems.append(
            f"runtime.zero.ranks: {zero.ranks} ranks need runtime.zero.stage 1, 2 or 3 (stage 0 is one process per "
            "worker); set runtime.zero.stage: 3 or runtime.zero.ranks: 1"
        )
    if (zero.stage > 0 or zero.ranks > 1) and rt.backend == "local":
        problems.append(
            f"runtime.zero.stage: {zero.stage} (runtime.zero.ranks: {zero.ranks}) needs runtime.backend: ray (a ZeRO "
            "worker group is several Ray actors); set runtime.backend: ray or runtime.zero.stage: 0"
        )
    if zero.stage > 0 and cfg.task.kind != "causal_lm":
        problems.append(
            f"runtime.zero.stage: {zero.stage} is built for task.kind: causal_lm (LLaMA-architecture bases); set "
            "task.kind: causal_lm or runtime.zero.stage: 0"
        )
    if zero.ranks > 1 and cfg.lora.dropout > 0:
        problems.append(
            f"lora.dropout: {cfg.lora.dropout} with runtime.zero.ranks {zero.ranks}: each rank draws the dropout masks "
            "of its slice of the batch, so results would depend on the rank count; set lora.dropout: 0"
        )
    if zero.stage > 0 and rt.workers == "auto":
        problems.append(
            "runtime.workers: auto is not supported with runtime.zero.stage > 0 (a worker is a group of "
            "runtime.zero.ranks actors); give runtime.workers a number, e.g. 1"
        )
    if zero.stage > 0 and rt.gpus_per_worker == "auto":
        problems.append(
            "runtime.gpus_per_worker: auto is not supported with runtime.zero.stage > 0; give each rank a number of "
            "GPUs (e.g. 1) or 0 for CPU"
        )
    return problems
