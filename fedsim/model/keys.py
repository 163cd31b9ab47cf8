"""Canonical adapter-state key names (pure string logic; no torch / peft import).

``<module path>.lora_A`` and ``<module path>.lora_B`` for LoRA factors (module path as in the
base model), ``head.<param path>`` for trained classification-head parameters.
"""

from __future__ import annotations

HEAD_PREFIX = "head."
_FACTORS = {"lora_A": "A", "lora_B": "B"}


def factor_of(key: str) -> str:
    """ "A", "B" or "head". Raises ValueError for a key that is none of these."""
    if key.startswith(HEAD_PREFIX):
        return "head"
    suffix = key.rsplit(".", 1)[-1]
    if suffix in _FACTORS:
        return _FACTORS[suffix]
    raise ValueError(f"not an adapter key: {key!r}")


def layer_of(key: str) -> str:
    """The adapted module path for A/B keys; "head" for head keys."""
    return "head" if factor_of(key) == "head" else key.rsplit(".", 1)[0]


def lora_key(layer: str, factor: str) -> str:
    """``lora_key("enc.0.query", "A") == "enc.0.query.lora_A"``."""
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    return f"{layer}.lora_{factor}"


def layers_of(keys: list[str]) -> list[str]:
    """Distinct adapted layers in first-seen order (head excluded)."""
    seen: dict[str, None] = {}
    for k in keys:
        if factor_of(k) != "head":
            seen.setdefault(layer_of(k), None)
    return list(seen)
