"""FedSA-LoRA: clients train A and B; only A is shared; B (and a trained head) stay with the client."""

from __future__ import annotations

from fedsim.methods.base import Capabilities, Method, register_method
from fedsim.model.keys import factor_of
from fedsim.types import Role, ServerState


@register_method("fedsa_lora")
class FedSALoRA(Method):
    """A = sum p_k A_k; each client starts a round from (global A, its own B, its own head)."""

    capabilities = Capabilities(keeps_client_state=True)

    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        return Role.SHARED if factor_of(key) == "A" else Role.KEPT
