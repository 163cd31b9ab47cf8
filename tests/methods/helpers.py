"""Small hand-made adapter states and client updates (no model)."""

from __future__ import annotations

import torch

from fedsim.types import AdapterState, ClientUpdate

LAYERS = ("enc.0.query", "enc.0.value", "enc.1.query")
D_IN, D_OUT, R = 6, 5, 2


def state(seed: int, head: bool = True) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    s: AdapterState = {}
    for layer in LAYERS:
        s[f"{layer}.lora_A"] = torch.randn(R, D_IN, generator=g)
        s[f"{layer}.lora_B"] = torch.randn(D_OUT, R, generator=g)
    if head:
        s["head.classifier.weight"] = torch.randn(3, D_OUT, generator=g)
        s["head.classifier.bias"] = torch.randn(3, generator=g)
    return s


def delta_w(s: AdapterState, layer: str) -> torch.Tensor:
    return s[f"{layer}.lora_B"].double() @ s[f"{layer}.lora_A"].double()


def updates_from(states: list[AdapterState], keys: list[str], weights: list[float]) -> list[ClientUpdate]:
    return [ClientUpdate(i, w, {k: s[k] for k in keys}) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
