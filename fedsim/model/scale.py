"""The LoRA scale s of an adapted weight W0 + s B A (pure arithmetic; no torch / peft import)."""

from __future__ import annotations

import math

from fedsim.config.schema import LoraConfig


def lora_scale(cfg: LoraConfig) -> float:
    """The LoRA scale s: ``alpha / r`` (variant ``lora``) or ``alpha / sqrt(r)`` (``rslora``), as PEFT applies it
    (``use_rslora`` for ``rslora``).

    Raises ValueError for another variant (VeRA has no alpha) or a non-positive rank."""
    if cfg.r <= 0:
        raise ValueError(f"lora.r must be > 0, got {cfg.r}")
    if cfg.variant == "lora":
        return float(cfg.alpha) / cfg.r
    if cfg.variant == "rslora":
        return float(cfg.alpha) / math.sqrt(cfg.r)
    raise ValueError(f"lora.variant must be 'lora' or 'rslora', got {cfg.variant!r}")
