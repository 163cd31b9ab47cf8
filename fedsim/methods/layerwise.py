"""The shared bases of the SVD family (FlexLoRA, FedSVD, FedEx-LoRA, FLoRA): aggregation one layer at a time.

:class:`LayerwiseMethod` turns :func:`fedsim.methods.aggregation.aggregate_layers` into ``Method.aggregate``, so a
method gives only its per-layer maths (``aggregate_layer``). :class:`FoldingMethod` adds what the methods that
fold a dense residual into the frozen base weight share: such a method adds ``<layer>.base_residual``
(:func:`fedsim.model.keys.residual_key`, shape [d_out, d_in]) to the global state at its first aggregation, and
every worker runs the layer with base weight W0 + R. The maths lives in :mod:`fedsim.methods.aggregation`; this
module registers no method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from fedsim.config.schema import Config
from fedsim.methods.aggregation import LayerCtx, adapter_keys_only, aggregate_layers, residual_broadcast
from fedsim.methods.base import PRODUCT_AGGREGATION, Method
from fedsim.model.scale import lora_scale
from fedsim.types import AdapterState, ClientUpdate, Role, RoundPlan, ServerState


class LayerwiseMethod(Method):
    """A method whose server step is, per uploaded layer, a function of the buffered uploads (an SVD, a product):
    not a weighted mean of the uploads (:data:`~fedsim.methods.base.PRODUCT_AGGREGATION`: not linear, no
    client-level DP, full LoRA matrices). ``aggregate`` is :func:`aggregate_layers` with
    :meth:`aggregate_layer` and :attr:`mean_factors`; the server state is left as it is. Default role: every
    tensor SHARED. Abstract: subclasses give :meth:`aggregate_layer`."""

    capabilities = PRODUCT_AGGREGATION
    #: factors ("A", "B") whose uploaded keys ``aggregate_layers`` replaces by their weighted mean (head: always)
    mean_factors: ClassVar[tuple[str, ...]] = ()

    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        return Role.SHARED

    def aggregate(
        self,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """New global state (see :meth:`aggregate_layer`); ValueError for an empty cohort."""
        return aggregate_layers(global_state, updates, plan, self.aggregate_layer, self.mean_factors), server_state

    def aggregate_layer(self, ctx: LayerCtx) -> dict[str, torch.Tensor]:
        """The new tensors of one uploaded layer (they replace, or add to, the aggregated state)."""
        raise NotImplementedError(f"{type(self).__name__} must define aggregate_layer")


class FoldingMethod(LayerwiseMethod):
    """Shared skeleton of the methods that fold a residual into the base: plans over adapter keys only (residual
    keys never enter a plan), the dense residual broadcast with the shared tensors, LoRA scale ``self.scale`` at
    hand. Abstract: subclasses give ``aggregate_layer``. Raises ValueError at construction for a LoRA variant
    without a scale (:func:`~fedsim.model.scale.lora_scale`)."""

    capabilities = dataclasses.replace(PRODUCT_AGGREGATION, folds_into_base=True, batches=False)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.scale = lora_scale(cfg.lora)

    def plan(self, round: int, keys: Sequence[str], server_state: ServerState) -> RoundPlan:
        return super().plan(round, adapter_keys_only(keys), server_state)

    def broadcast_keys(self, plan: RoundPlan) -> list[str]:
        return residual_broadcast(plan)
