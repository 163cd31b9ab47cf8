"""FFA-LoRA: A frozen at its shared random init; clients train and upload B only (exact aggregate)."""

from __future__ import annotations

from fedsim.methods.base import Method, register_method
from fedsim.model.keys import factor_of
from fedsim.types import Role, ServerState


@register_method("ffa_lora")
class FFALoRA(Method):
    """B = sum p_k B_k; since A is identical on all clients, sum p_k B_k A = B_bar A exactly."""

    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        return Role.FROZEN if factor_of(key) == "A" else Role.SHARED
