"""Config rules of ``runtime.clients_per_pass`` (a worker training K clients together in one fused pass).

One fused pass runs the frozen base once over the K clients' concatenated batches, so it is exact (each client's
result equals its one-at-a-time training) only when nothing in the base differs per client or draws randomness
per client. :func:`batching_blockers` lists what stands in the way for a config (the method's declared capabilities
among them); :mod:`fedsim.validation` turns each into a problem when ``clients_per_pass`` is a number > 1, and
``auto`` falls back to K = 1 (and says why on stderr).
"""

from __future__ import annotations

from fedsim.config.schema import Config

#: the ``lora.variant`` values a fused pass implements (per-client A and B factors with a scalar scale)
BATCHED_VARIANTS = ("lora", "rslora")


def _method_batches(cfg: Config) -> tuple[bool, str]:
    """(whether the method declares ``Capabilities.batches``, its name); True for a method that cannot be resolved
    (the method checks report that)."""
    from fedsim.errors import ConfigError
    from fedsim.methods.base import get_method

    try:
        caps = get_method(cfg.method.name).capabilities
    except ConfigError:
        return True, cfg.method.name
    return caps.batches and not caps.folds_into_base, cfg.method.name


def batching_blockers(cfg: Config) -> list[str]:
    """Why ``cfg`` cannot train several clients in one pass: one line per reason, each naming the key and the
    value that would allow it. Empty when ``runtime.clients_per_pass > 1`` is possible."""
    out: list[str] = []
    if cfg.model.base_dropout:
        out.append(
            "model.base_dropout: true (the frozen base's own dropout would have to be drawn per client inside one "
            "fused pass); set model.base_dropout: false"
        )
    if cfg.lora.dropout > 0:
        out.append(
            f"lora.dropout: {cfg.lora.dropout:g} (a client's LoRA dropout masks would depend on the other clients of "
            "its pass); set lora.dropout: 0"
        )
    if cfg.lora.variant not in BATCHED_VARIANTS:
        out.append(
            f"lora.variant: {cfg.lora.variant} (a fused pass applies per-client LoRA A and B factors only); use "
            f"lora.variant {' or '.join(BATCHED_VARIANTS)}"
        )
    if cfg.runtime.zero.stage > 0:
        out.append(
            f"runtime.zero.stage: {cfg.runtime.zero.stage} (a ZeRO worker group splits one client's batch over its "
            "ranks); set runtime.zero.stage: 0"
        )
    batches, name = _method_batches(cfg)
    if not batches:
        out.append(
            f"method.name: {name} (its server folds a dense residual into the base weights, which each client "
            "starts from, so clients cannot share one base pass); use a method without residual folding, e.g. "
            "fedavg_lora or ffa_lora"
        )
    return out


def clients_per_pass_problems(cfg: Config) -> list[str]:
    """Problems of a ``runtime.clients_per_pass`` > 1: one per :func:`batching_blockers` reason (each line names both
    keys and the fix). Empty for ``auto``, 1, and values < 1 (the config's own checks report those)."""
    k = cfg.runtime.clients_per_pass
    if k == "auto" or k <= 1:
        return []
    return [
        f"runtime.clients_per_pass: {k} does not work with {why}, or set runtime.clients_per_pass: 1"
        for why in batching_blockers(cfg)
    ]
