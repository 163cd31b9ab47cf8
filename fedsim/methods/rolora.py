"""RoLoRA: every layer trains and shares B on odd rounds and A on even rounds (exact aggregate).

The fixed, layer-tied schedule that AS-LoRA generalises (METHODS.md "RoLoRA", arXiv 2409.02346).
"""

from __future__ import annotations

from fedsim.methods.base import Method, register_method
from fedsim.model.keys import factor_of
from fedsim.types import Role, ServerState


def active_factor(round: int) -> str:
    """ "B" on odd rounds (round 1 first: B starts at 0, so A would get no gradient), "A" on even rounds."""
    return "B" if round % 2 == 1 else "A"


@register_method("rolora")
class RoLoRA(Method):
    """Round t: the active factor (:func:`active_factor`) of every layer is SHARED, the other one FROZEN; the
    head (if trained) is always SHARED.

    The frozen factor is bit-identical on every client, so the weighted mean of the active factor is an exact
    aggregate: sum p_k B_k A = B_bar A (odd rounds) and sum p_k B A_k = B A_bar (even rounds). Aggregation is
    the default weighted mean of the shared tensors (``linear``).
    """

    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        factor = factor_of(key)
        if factor == "head" or factor == active_factor(round):
            return Role.SHARED
        return Role.FROZEN
