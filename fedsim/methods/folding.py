"""The shared base of the methods that fold a dense residual into the frozen base weight (FedEx-LoRA, FLoRA).

Such a method adds ``<layer>.base_residual`` (:func:`fedsim.model.keys.residual_key`, shape [d_out, d_in]) to the
global state at its first aggregation; every worker runs the layer with base weight W0 + R. The maths
(:func:`~fedsim.methods.aggregation.fold_into_residual`) lives in :mod:`fedsim.methods.aggregation`; this module
only holds the plan / broadcast skeleton. It registers no method.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsim.config.schema import Config
from fedsim.methods.aggregation import adapter_keys_only, residual_broadcast
from fedsim.methods.base import Method, ServerState
from fedsim.model.scale import lora_scale
from fedsim.types import RoundPlan


class FoldingMethod(Method):
    """Shared skeleton of the methods that fold a residual into the base: plans over adapter keys only (residual
    keys never enter a plan), the dense residual broadcast with the shared tensors, LoRA scale ``self.scale`` at
    hand. Not a weighted mean of the uploads (``linear = False``). Abstract: subclasses give ``role`` and
    ``aggregate``. Raises ValueError at construction for a LoRA variant without a scale (:func:`lora_scale`)."""

    linear = False

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.scale = lora_scale(cfg.lora)

    def plan(self, round: int, keys: Sequence[str], server_state: ServerState) -> RoundPlan:
        return super().plan(round, adapter_keys_only(keys), server_state)

    def broadcast_keys(self, plan: RoundPlan) -> list[str]:
        return residual_broadcast(plan)
