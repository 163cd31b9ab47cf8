"""Exact per-example gradients of VeRA's lambda vectors for Opacus' hooks mode.

PEFT's VeRA layer (``peft.tuners.vera.layer.Linear``) computes, for its one active adapter,

    out = base(x) + lambda_b * ((lambda_d * (dropout(x) @ A^T)) @ B^T)

with ``A = vera_A[:, :d_in]`` (``[r, d_in]``) and ``B = vera_B[:d_out, :]`` (``[d_out, r]``) sliced from frozen
buffers shared by all layers. ``lambda_d`` (``[r]``) and ``lambda_b`` (``[d_out]``) live in ``nn.ParameterDict``
modules whose forward is never called, so Opacus' own hooks (which sit on the modules that hold a trainable
parameter directly) never see them. Instead the WHOLE VeRA layer is hooked (see
``fedsim.privacy.dpsgd._FrozenAwareGradSampleModule``), :func:`compute_vera_grad_sample` is registered as the
layer type's Opacus grad sampler, and the activation it receives is the output of the layer's dropout module
(captured by :func:`install_input_capture`), so the gradients are exact with ``lora.dropout > 0`` too.

With ``x' = dropout(x)``, ``h = x' @ A^T``, ``v = (lambda_d * h) @ B^T`` and the output gradient ``g`` of example i
(summed over every non-batch position t):

    dL_i/dlambda_b = sum_t g * v        dL_i/dlambda_d = sum_t ((g * lambda_b) @ B) * h

The buffers ``vera_A`` / ``vera_B`` are data-independent random projections that are never updated (unlike e.g.
BatchNorm statistics), so they carry no private information; Opacus' strict buffer check inspects the modules
that hold trainable parameters directly (the ParameterDicts, which have no buffers) and stays on.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from opacus.grad_sample import register_grad_sampler
from peft.tuners.vera.layer import Linear as VeraLinear
from torch.utils.hooks import RemovableHandle

__all__ = [
    "VeraLinear",
    "check_vera_layer",
    "compute_vera_grad_sample",
    "install_input_capture",
    "is_vera_layer",
    "pop_captured_input",
    "vera_trains",
]

_CAPTURED = "_fedsim_vera_input"  # attribute of a VeRA layer: its dropout output of the current forward


def is_vera_layer(module: torch.nn.Module) -> bool:
    """True for PEFT's VeRA Linear layer (the module this grad sampler serves)."""
    return isinstance(module, VeraLinear)


def vera_trains(layer: torch.nn.Module) -> bool:
    """True if any lambda vector of ``layer`` requires grad now."""
    return any(p.requires_grad for d in (layer.vera_lambda_d, layer.vera_lambda_b) for p in d.values())


def check_vera_layer(layer: torch.nn.Module) -> None:
    """Raise NotImplementedError if ``layer`` cannot be served by :func:`compute_vera_grad_sample`: a trainable
    base layer (its weight has no per-example gradient here) or a merged adapter."""
    if any(p.requires_grad for p in layer.base_layer.parameters()):
        raise NotImplementedError(
            "per-example gradients of a VeRA layer cover only lambda_d and lambda_b; freeze its base layer"
        )
    if layer.merged:
        raise NotImplementedError("per-example gradients need an unmerged VeRA adapter; call unmerge() first")


def _active(layer: VeraLinear) -> tuple[str, torch.nn.Parameter, torch.nn.Parameter]:
    """(adapter name, lambda_d, lambda_b) of the one active adapter; NotImplementedError for several."""
    names = [a for a in layer.active_adapters if a in layer.vera_lambda_d]
    if len(names) != 1:
        raise NotImplementedError(f"per-example VeRA gradients need exactly one active adapter, got {names}")
    return names[0], layer.vera_lambda_d[names[0]], layer.vera_lambda_b[names[0]]


def _capture(layer: VeraLinear, _module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
    # Forward hook on the layer's dropout module: keep the input the lambdas actually saw (one slot, overwritten,
    # taken by pop_captured_input), only when a per-example gradient can follow.
    if layer.training and torch.is_grad_enabled() and vera_trains(layer):
        setattr(layer, _CAPTURED, output.detach())


def install_input_capture(model: torch.nn.Module) -> list[RemovableHandle]:
    """Hook the dropout module of every VeRA layer in ``model`` that trains now (the layers Opacus hooks) so its
    output (the activation the lambdas see, = the layer input when dropout is 0) is kept for
    :func:`pop_captured_input`. Returns the hook handles."""
    handles: list[RemovableHandle] = []
    for layer in model.modules():
        if is_vera_layer(layer) and vera_trains(layer):
            for dropout in layer.vera_dropout.values():
                handles.append(dropout.register_forward_hook(partial(_capture, layer)))
    return handles


def pop_captured_input(layer: torch.nn.Module) -> torch.Tensor | None:
    """The dropout output captured in ``layer``'s last training forward (None if none), removed from the layer."""
    captured = getattr(layer, _CAPTURED, None)
    if hasattr(layer, _CAPTURED):
        delattr(layer, _CAPTURED)
    return captured


@register_grad_sampler(VeraLinear)
def compute_vera_grad_sample(
    layer: VeraLinear, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-example gradients ``{lambda: [batch, *lambda.shape]}`` of the lambdas of ``layer`` that require grad.

    ``activations[0]``: the dropout output ``[batch, ..., d_in]`` of the forward; ``backprops``: the gradient of
    the layer output ``[batch, ..., d_out]`` (already scaled by Opacus for the loss reduction).
    Raises NotImplementedError for several active adapters.
    """
    name, lambda_d, lambda_b = _active(layer)
    dtype = lambda_d.dtype
    x = activations[0]
    n = x.shape[0]
    x = x.to(dtype).reshape(n, -1, x.shape[-1])
    g = backprops.to(dtype).reshape(n, -1, backprops.shape[-1])
    a = layer.vera_A[name][:, : layer.in_features].to(device=x.device, dtype=dtype)  # [r, d_in]
    b = layer.vera_B[name][: layer.out_features, :].to(device=x.device, dtype=dtype)  # [d_out, r]
    h = x @ a.T  # [n, t, r]
    out: dict[torch.nn.Parameter, torch.Tensor] = {}
    if lambda_b.requires_grad:
        out[lambda_b] = torch.einsum("ntd,ntd->nd", g, (h * lambda_d.detach()) @ b.T)
    if lambda_d.requires_grad:
        out[lambda_d] = torch.einsum("ntr,ntr->nr", (g * lambda_b.detach()) @ b, h)
    return out
