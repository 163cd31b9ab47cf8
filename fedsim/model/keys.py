"""Canonical adapter-state key names (pure string logic; no torch / peft import).

``<module path>.lora_A`` and ``<module path>.lora_B`` for LoRA factors (module path as in the
base model), ``head.<param path>`` for trained classification-head parameters, and
``<module path>.base_residual`` for a dense residual that methods such as FedEx-LoRA fold into the
frozen base weight (it lives in the global state; it is not an adapter parameter).

VeRA (``lora.variant: vera``) trains vectors instead of A/B; they take their factor's place:
``<module path>.vera_lambda_d`` (length r, scales the output of the frozen random A: factor "A") and
``<module path>.vera_lambda_b`` (length d_out, scales the output of the frozen random B: factor "B"), so methods
that only use factor_of / layer_of (fedavg_lora, ffa_lora, fedsa_lora, rolora) work unchanged.
"""

from __future__ import annotations

HEAD_PREFIX = "head."
RESIDUAL_SUFFIX = ".base_residual"  # dense residual folded into a layer's frozen base weight (FedEx-LoRA, FLoRA)
_FACTORS = {"lora_A": "A", "lora_B": "B", "vera_lambda_d": "A", "vera_lambda_b": "B"}
_VERA_SUFFIX = {"A": "vera_lambda_d", "B": "vera_lambda_b"}


def factor_of(key: str) -> str:
    """ "A", "B", "head" or "residual". Raises ValueError for a key that is none of these."""
    if key.startswith(HEAD_PREFIX):
        return "head"
    if key.endswith(RESIDUAL_SUFFIX):
        return "residual"
    suffix = key.rsplit(".", 1)[-1]
    if suffix in _FACTORS:
        return _FACTORS[suffix]
    raise ValueError(f"not an adapter key: {key!r}")


def layer_of(key: str) -> str:
    """The adapted module path for A/B keys; "head" for head keys."""
    return "head" if factor_of(key) == "head" else key.rsplit(".", 1)[0]


def residual_key(layer: str) -> str:
    """``residual_key("enc.0.query") == "enc.0.query.base_residual"``."""
    return f"{layer}{RESIDUAL_SUFFIX}"


def is_residual(key: str) -> bool:
    return key.endswith(RESIDUAL_SUFFIX)


def lora_key(layer: str, factor: str) -> str:
    """``lora_key("enc.0.query", "A") == "enc.0.query.lora_A"``."""
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    return f"{layer}.lora_{factor}"


def vera_key(layer: str, factor: str) -> str:
    """``vera_key("enc.0.query", "A") == "enc.0.query.vera_lambda_d"`` (``"B"`` -> ``vera_lambda_b``)."""
    if factor not in _VERA_SUFFIX:
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    return f"{layer}.{_VERA_SUFFIX[factor]}"


def layers_of(keys: list[str]) -> list[str]:
    """Distinct adapted layers in first-seen order (head excluded)."""
    seen: dict[str, None] = {}
    for k in keys:
        if factor_of(k) in ("A", "B"):
            seen.setdefault(layer_of(k), None)
    return list(seen)
