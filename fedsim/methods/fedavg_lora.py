"""FedAvg-LoRA (FedIT): clients train A and B; the server averages each independently (inexact)."""

from __future__ import annotations

from fedsim.methods.base import Method, register_method
from fedsim.types import Role, ServerState


@register_method("fedavg_lora")
class FedAvgLoRA(Method):
    """A = sum p_k A_k, B = sum p_k B_k (and head). sum p_k B_k A_k != B_bar A_bar in general."""

    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        return Role.SHARED
