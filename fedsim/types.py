"""Small frozen records passed between the driver, the server, the workers and the methods.

``AdapterState`` keys are owned by :mod:`fedsim.model.adapters`:
``<module path>.lora_A`` / ``<module path>.lora_B`` for LoRA factors and
``head.<param path>`` for a trained classification head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

AdapterState = dict[str, torch.Tensor]
#: a method's server-side state between rounds (JSON-able values; checkpointed with the global state)
ServerState = dict[str, Any]


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Payload size of a state: sum of numel * element_size."""
    return sum(t.numel() * t.element_size() for t in state.values())


class Role(str, Enum):
    """What happens to one adapter tensor in one round."""

    SHARED = "shared"  # trained on clients, uploaded, aggregated by the server
    KEPT = "kept"  # trained on clients, kept by the client (ClientStore), never uploaded
    FROZEN = "frozen"  # not trained; identical on every client; not sent


@dataclass(frozen=True)
class RoundPlan:
    """Per-tensor roles for one round, decided by the method's ``plan``."""

    round: int
    roles: Mapping[str, Role]

    def keys(self, role: Role) -> list[str]:
        return [k for k, r in self.roles.items() if r == role]

    @property
    def trained(self) -> list[str]:
        return [k for k, r in self.roles.items() if r != Role.FROZEN]

    @property
    def uploaded(self) -> list[str]:
        return self.keys(Role.SHARED)

    @property
    def kept(self) -> list[str]:
        return self.keys(Role.KEPT)


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends to the server: its aggregation weight, tensors and signals."""

    client_id: int
    weight: float
    tensors: AdapterState
    signals: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SignalContext:
    """What a method may know when it computes a client's signals from its last (privatised) gradients."""

    round: int
    client_id: int
    lr: float
    batch_size: float  # expected batch size of the last step
    noise_std: float  # per-coordinate std of the DP noise in the averaged gradient (sigma * C / batch); 0 without DP
    #: the trained tensors' gradients of the step BEFORE the last one (privatised under DP); empty if < 2 steps
    prev_grads: Mapping[str, torch.Tensor] = field(default_factory=dict)
    #: parameter displacement between the points where ``prev_grads`` and the last gradients were taken
    #: (theta_{T-1} - theta_{T-2}; for SGD exactly ``-lr * prev_grads``); empty if < 2 steps
    prev_step: Mapping[str, torch.Tensor] = field(default_factory=dict)
    #: ``plain_sgd``: ``prev_step == -lr * prev_grads`` (SGD without momentum or weight decay)
    plain_sgd: bool = True
    #: RAW minibatch loss at (current trainable tensors + offsets), on the client's last non-empty batch. NOT covered
    #: by the DP accountant: given only to methods whose ``needs_raw_loss(round)`` is true (a documented opt-in).
    raw_loss: Callable[[Mapping[str, torch.Tensor]], float] | None = None


@dataclass(frozen=True)
class ClientTask:
    """One client's work in one round."""

    round: int
    client_id: int
    plan: RoundPlan
    noise_multiplier: float | None = None  # sample-level DP: this client's calibrated sigma
    sample_rate: float | None = None  # sample-level DP: this client's Poisson rate batch / N_k


@dataclass(frozen=True)
class ClientResult:
    """Metadata of one client's local training (tensors travel separately)."""

    round: int
    client_id: int
    worker_id: int
    examples: int
    steps: int
    train_loss: float
    seconds: float
    status: str  # "ok" | "failed" | "budget_exhausted"
    bytes_up: int = 0
    bytes_down: int = 0
    error: str = ""
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    epsilon: float | None = None  # the client's cumulative epsilon after this round (sample-level DP)


@dataclass(frozen=True)
class EvalTask:
    """Evaluate one adapter state on a fixed chunk of example indices."""

    name: str  # "global" or f"client:{id}"
    indices: tuple[int, ...]
    client_id: int | None = None  # None = the global state; else that client's personal state


@dataclass(frozen=True)
class EvalResult:
    name: str
    loss_sum: float  # summed per-example loss (causal_lm: each example's mean response-token NLL)
    correct: int  # correct predictions (causal_lm: exact-match greedy answers)
    count: int
    token_loss_sum: float = 0.0  # causal_lm: summed response-token NLL (perplexity = exp(token_loss_sum / tokens))
    tokens: int = 0  # causal_lm: scored response tokens; 0 for classification
