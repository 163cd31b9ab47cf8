"""Every use of a torch-side dependency's PRIVATE API, one small function each (bottom layer: imports only torch,
PEFT and Opacus, never the rest of fedsim).

The versions these were written against are the ones in pyproject.toml's tested range; each function says what
breaks when its dependency changes the name or the meaning, so an upgrade is a matter of reading this one file.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def peft_cast_lora_input(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast as PEFT's ``lora.Linear`` casts a LoRA input before ``lora_A`` (PEFT ``_cast_input_dtype``: a
    no-op unless PEFT's autocast-adapter-dtype rules ask for a cast).

    If PEFT renames or removes ``_cast_input_dtype``, the fused multi-client pass
    (:mod:`fedsim.client.multi_adapter`) raises AttributeError on its first forward; if PEFT changes what it casts,
    fused and one-at-a-time training drift apart (tests/client/test_batched_trainer.py catches it)."""
    return layer._cast_input_dtype(x, dtype)


def opacus_module_trains(module: torch.nn.Module) -> bool:
    """Whether ``module`` directly owns a parameter that requires grad (Opacus ``utils.module_utils.requires_grad``,
    the test Opacus' own hooks use).

    If Opacus moves it, importing this function fails at the first DP-SGD run; if its meaning changes, frozen
    modules (FFA-LoRA's lora_A) may get per-example gradients computed or skipped wrongly
    (tests/client/test_client_trainer.py's DP tests catch it)."""
    from opacus.utils.module_utils import requires_grad

    return bool(requires_grad(module))


def opacus_trainable_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of ``module``'s own parameters that require grad (Opacus
    ``utils.module_utils.trainable_parameters``). Breaks as :func:`opacus_module_trains`."""
    from opacus.utils.module_utils import trainable_parameters

    yield from trainable_parameters(module)


def opacus_count_forward(p: torch.nn.Parameter) -> None:
    """Count one more forward of ``p``'s module as Opacus' activation hook does (``p._forward_counter``: Opacus
    checks it against the backward count). If Opacus drops the counter, VeRA per-example gradients under DP raise
    or double count (tests/client/test_client_vera.py catches it)."""
    p._forward_counter += 1


def opacus_clear_param(p: torch.nn.Parameter) -> None:
    """Drop Opacus' per-parameter bookkeeping (``grad_sample``, ``summed_grad``, ``_current_grad_sample``,
    ``_forward_counter``) so nothing of one client's data reaches the next one. If Opacus adds state elsewhere, it
    survives the per-client clean-up (tests/client/test_client_trainer.py's clean-up asserts catch the known ones)."""
    if hasattr(p, "grad_sample"):
        p.grad_sample = None
    if hasattr(p, "summed_grad"):
        p.summed_grad = None
    if hasattr(p, "_current_grad_sample"):
        del p._current_grad_sample
    if hasattr(p, "_forward_counter"):
        p._forward_counter = 0


def opacus_wrapped_module(gsm: torch.nn.Module) -> torch.nn.Module:
    """The model a GradSampleModule wraps (Opacus ``GradSampleModule._module``). If Opacus renames it, building a
    DP worker fails with AttributeError."""
    return gsm._module
