"""Opacus glue for sample-level DP-SGD: per-example gradient hooks, the DP optimizer, Poisson sampling.

No accounting here (see ``fedsim.privacy.accounting``); the sampling arithmetic lives in
:mod:`fedsim.privacy.sampling` (no Opacus import) and is re-exported here. The model is wrapped ONCE per worker;
which tensors are trained (and clipped) is decided per client by ``requires_grad`` and by the optimizer's
parameter list: clipping is over the optimizer's parameters only.
VeRA layers (``lora.variant: vera``) are served by :mod:`fedsim.privacy.vera_grad_sampler`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedsim.compat import (
    opacus_clear_param,
    opacus_count_forward,
    opacus_module_trains,
    opacus_trainable_parameters,
    opacus_wrapped_module,
)
from fedsim.privacy.sampling import (  # re-exported: they were defined here
    expected_batch_size,
    poisson_indices,
    poisson_rate,
    set_empty_grad_samples,
)
from fedsim.privacy.vera_grad_sampler import (
    check_vera_layer,
    install_input_capture,
    is_vera_layer,
    pop_captured_input,
    vera_trains,
)

__all__ = [
    "clear_dp_buffers",
    "clear_dp_state",
    "dp_hooked_modules",
    "expected_batch_size",
    "make_dp_optimizer",
    "poisson_indices",
    "poisson_rate",
    "set_empty_grad_samples",
    "wrap_for_dp",
]


def _trains(module: torch.nn.Module) -> bool:
    """Whether a hooked module has per-example gradients to compute now (a VeRA layer: any of its lambdas)."""
    return vera_trains(module) if is_vera_layer(module) else opacus_module_trains(module)


class _FrozenAwareGradSampleModule(GradSampleModule):
    """GradSampleModule whose hooks skip modules that are frozen *now*.

    Opacus installs hooks on the modules that were trainable at wrap time. When such a module is later frozen
    (e.g. FFA-LoRA freezes every ``lora_A``), its forward hook stores no activations but its backward hook still
    fires whenever its output needs a gradient (any layer above a trainable one) and would fail. Skipping it
    is exact: a frozen module has no per-example gradients to compute.

    VeRA layers: Opacus hooks only modules that hold a trainable parameter directly, which for VeRA are the
    ParameterDicts of the lambdas (never called). Instead each VeRA layer is hooked as a whole (its children are
    not), its activation is the captured dropout output and its registered grad sampler computes the lambdas'
    per-example gradients (:mod:`fedsim.privacy.vera_grad_sampler`).
    """

    def iterate_submodules(self, module):  # noqa: D102
        if is_vera_layer(module):
            check_vera_layer(module)
            if vera_trains(module):
                yield module
            return
        yield from super().iterate_submodules(module)

    def capture_activations_hook(self, module, forward_input, _forward_output):  # noqa: D102
        if not is_vera_layer(module):
            super().capture_activations_hook(module, forward_input, _forward_output)
            return
        captured = pop_captured_input(module)  # always taken, so no activation outlives its forward
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled() and vera_trains(module)):
            return
        if captured is None:
            raise RuntimeError("VeRA layer ran without its dropout module; per-example gradients need its output")
        if not hasattr(module, "activations"):
            module.activations = []
        module.activations.append([captured])
        for _, p in opacus_trainable_parameters(module):
            opacus_count_forward(p)

    def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):  # noqa: D102
        if not _trains(module):
            return
        super().capture_backprops_hook(module, _forward_input, forward_output, loss_reduction, batch_first)


def wrap_for_dp(model: torch.nn.Module) -> GradSampleModule:
    """Attach Opacus per-example gradient hooks (``hooks`` mode, batch-first, mean loss reduction).

    Call once, while every tensor that may ever be trained requires grad: hooks exist only for those modules.
    Raises NotImplementedError (from Opacus) if a trainable module has buffers, or if a VeRA layer has a trainable
    base layer or a merged adapter.
    """
    gsm = _FrozenAwareGradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    gsm.autograd_grad_sample_hooks.extend(install_input_capture(model))  # removed with Opacus' own hooks
    return gsm


class _GroupDPOptimizer(DPOptimizer):
    """DP-SGD over a torch.distributed group: the per-rank clipped sums are all-reduced before the noise draw (the
    same on every rank: every rank's generator is seeded alike)."""

    def add_noise(self) -> None:  # noqa: D102
        import torch.distributed as dist

        for p in self.params:
            dist.all_reduce(p.summed_grad, op=dist.ReduceOp.SUM)
        super().add_noise()


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    clip: float,
    expected_batch_size: int,
    generator: torch.Generator,
    *,
    across_group: bool = False,
) -> DPOptimizer:
    """DP-SGD around ``optimizer``: per-example clipping to ``clip`` over the optimizer's parameters, Gaussian noise
    of std ``noise_multiplier * clip`` drawn from ``generator``, sum divided by ``expected_batch_size``.
    ``across_group``: the clipped sums of every rank of the current torch.distributed group are added first (a ZeRO
    worker group, whose ranks each hold a slice of the batch).
    """
    return (_GroupDPOptimizer if across_group else DPOptimizer)(
        optimizer,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(clip),
        expected_batch_size=int(expected_batch_size),
        loss_reduction="mean",
        generator=generator,
    )


def dp_hooked_modules(gsm: GradSampleModule) -> list[torch.nn.Module]:
    """The modules of ``gsm``'s model that carry Opacus hooks (and so may hold activations); call right after
    :func:`wrap_for_dp`, while every tensor that may ever be trained still requires grad."""
    return list(gsm.iterate_submodules(opacus_wrapped_module(gsm)))


def clear_dp_state(params: Iterable[torch.nn.Parameter], modules: Iterable[torch.nn.Module]) -> None:
    """:func:`clear_dp_buffers` restricted to ``params`` (every parameter that may have been trained) and
    ``modules`` (every module that may hold activations: :func:`dp_hooked_modules`): the per-client clean-up of a
    worker, which knows both once and does not walk the whole model."""
    for p in params:
        p.grad = None
        opacus_clear_param(p)
    for m in modules:
        if hasattr(m, "activations"):
            m.activations = []
        if hasattr(m, "max_batch_len"):
            del m.max_batch_len
        pop_captured_input(m)


def clear_dp_buffers(model: torch.nn.Module) -> None:
    """Drop every per-example gradient, summed gradient, gradient and stale activation in ``model``.

    Use between clients so nothing of one client's data reaches the next one.
    """
    clear_dp_state(model.parameters(), model.modules())
