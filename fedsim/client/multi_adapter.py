"""K clients' adapters on ONE PeftModel: a fused pass over their concatenated batches.

:class:`MultiAdapter` holds, for every adapter key, one leaf tensor per client (a *slot*), and while
:meth:`MultiAdapter.pass_over` is active it replaces the forward of every PEFT ``lora.Linear`` layer by
``base_layer(x) + cat_k(s * B_k (A_k x_k))`` over the row groups of the step (client k's rows are one contiguous
slice ``x_k``; as in mLoRA, the frozen base runs once over all rows, each group gets its own small matmuls), and
the forward of every ``nn.Linear`` inside a trained head (PEFT ``modules_to_save``) by ``cat_k(W_k x_k + b_k)``.
The live PEFT tensors are not used (nor changed) during a pass.

Gradients: a LoRA layer's computation for all groups is ONE autograd Function (batched matmuls over the stacked
factors when the groups are of equal size); a head's Linear is one per group. Without DP the backward returns the
summed gradients of each client's tensors (autograd accumulates them into ``.grad``). With ``per_example`` it
instead records each example's gradient of the client's TRAINABLE tensors (:mod:`fedsim.privacy.multi_grad_sampler`,
Opacus' formulas) for :meth:`take_grad_samples`, which the client's own DPOptimizer clips and noises.

Exactness: a row's activations in the frozen base do not depend on the other rows (per-sequence attention,
per-token normalisation; no batch statistics), so with the base deterministic (``model.base_dropout: false``) and
no LoRA dropout each client's forward and gradients equal its one-at-a-time values up to float rounding. Supported:
plain LoRA / rsLoRA ``Linear`` layers without dropout and a head whose parameters are ``nn.Linear`` weights and
biases; anything else raises ValueError at construction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear

from fedsim.compat import peft_cast_lora_input
from fedsim.model.adapters import ADAPTER, adapter_key, adapter_keys
from fedsim.model.keys import HEAD_PREFIX
from fedsim.privacy.multi_grad_sampler import grouped_linear_grad_samples, linear_grad_samples

#: per-example gradients of one step: slot -> key -> [n_k, *shape]
Samples = dict[int, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Group:
    """Client ``slot``'s rows ``[start, stop)`` of a fused batch (groups are contiguous and in slot order)."""

    slot: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def _record(samples: Samples | None, slot: int, key: str, value: torch.Tensor | None) -> None:
    if samples is None or value is None:
        return
    mine = samples.setdefault(slot, {})
    mine[key] = mine[key] + value if key in mine else value  # a module called twice: the gradients add


@dataclass(frozen=True)
class _LoRARecord:
    """What a fused LoRA layer's backward needs besides tensors: the groups, where per-example gradients go (None
    without DP) and the layer's adapter keys."""

    groups: tuple[Group, ...]
    samples: Samples | None
    key_a: str
    key_b: str

    @property
    def equal(self) -> bool:
        """All groups have the same number of rows (then batched matmuls serve them all at once)."""
        return len({g.rows for g in self.groups}) == 1


def _per_group(x: torch.Tensor, w: torch.Tensor, rec: _LoRARecord) -> torch.Tensor:
    """``x_k @ w[k]`` for each group k (``x`` ``[N, ..., p]`` with the groups' rows in order, ``w`` ``[K, p, q]``),
    as one ``[N, ..., q]`` tensor."""
    if rec.equal:
        out = torch.bmm(x.reshape(len(rec.groups), -1, x.shape[-1]), w)
        return out.reshape(*x.shape[:-1], w.shape[-1])
    return torch.cat([x[g.start : g.stop] @ w[j] for j, g in enumerate(rec.groups)])


def _summed_outer(u: torch.Tensor, v: torch.Tensor, rec: _LoRARecord) -> list[torch.Tensor]:
    """For each group k: ``u_k^T v_k`` summed over its rows and positions (``[q, p]`` from ``u`` ``[N, ..., q]`` and
    ``v`` ``[N, ..., p]``): the gradient of a weight from its output gradient ``u`` and its input ``v``."""
    v = v.to(u.dtype)
    if rec.equal:
        k = len(rec.groups)
        return list(torch.bmm(u.reshape(k, -1, u.shape[-1]).transpose(1, 2), v.reshape(k, -1, v.shape[-1])).unbind(0))
    return [
        u[g.start : g.stop].reshape(-1, u.shape[-1]).t() @ v[g.start : g.stop].reshape(-1, v.shape[-1])
        for g in rec.groups
    ]


class _FusedLoRA(torch.autograd.Function):
    """``s * B_k (A_k x_k)`` for every group k of a fused pass in ONE autograd node (inputs: ``x``, the scaling, the
    record, then the K groups' A factors and the K groups' B factors). Groups of equal size run as batched matmuls
    over the stacked factors; unequal ones one after the other. Backward: see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scaling: float, rec: _LoRARecord, *factors: torch.Tensor) -> torch.Tensor:
        k = len(rec.groups)
        a, b = torch.stack(factors[:k]), torch.stack(factors[k:])  # [K, r, in], [K, out, r]
        h = _per_group(x, a.transpose(1, 2), rec)
        ctx.save_for_backward(x, h, a, b)
        ctx.scaling, ctx.rec = scaling, rec
        return _per_group(h, b.transpose(1, 2), rec) * scaling

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, a, b = ctx.saved_tensors
        rec: _LoRARecord = ctx.rec
        k = len(rec.groups)
        need_a, need_b = ctx.needs_input_grad[3 : 3 + k], ctx.needs_input_grad[3 + k :]
        b_back = grad * ctx.scaling  # at lora_B's output
        h_back = _per_group(b_back, b, rec)  # at lora_A's output
        gx = _per_group(h_back, a, rec) if ctx.needs_input_grad[0] else None
        ga: list[torch.Tensor | None] = [None] * k
        gb: list[torch.Tensor | None] = [None] * k
        if rec.samples is not None:  # DP: per-example gradients of the trainable factors only
            sizes = tuple(g.rows for g in rec.groups)
            per_a = grouped_linear_grad_samples(x, h_back, sizes) if any(need_a) else None
            per_b = grouped_linear_grad_samples(h, b_back, sizes) if any(need_b) else None
            for j, g in enumerate(rec.groups):
                if per_a is not None and need_a[j]:
                    _record(rec.samples, g.slot, rec.key_a, per_a[g.start : g.stop])
                if per_b is not None and need_b[j]:
                    _record(rec.samples, g.slot, rec.key_b, per_b[g.start : g.stop])
        else:
            if any(need_a):
                ga = [v if need_a[j] else None for j, v in enumerate(_summed_outer(h_back, x, rec))]
            if any(need_b):
                gb = [v if need_b[j] else None for j, v in enumerate(_summed_outer(b_back, h, rec))]
        return (gx, None, None, *ga, *gb)


class _GroupDense(torch.autograd.Function):
    """``W x + b`` for one client's rows (a trained head's linear module)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, rec: Any) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.rec, ctx.has_bias = rec, bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        samples, slot, n, key_w, key_b = ctx.rec
        gx = grad @ w if ctx.needs_input_grad[0] else None
        gw = gb = None
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        if samples is not None:
            if ctx.needs_input_grad[1] or want_b:
                d_w, d_b = linear_grad_samples(x, grad, n, bias=want_b)
                if ctx.needs_input_grad[1]:
                    _record(samples, slot, key_w, d_w)
                _record(samples, slot, key_b, d_b)
        else:
            flat = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[1]:
                gw = flat.t() @ x.reshape(-1, x.shape[-1]).to(flat.dtype)
            if want_b:
                gb = flat.sum(0)
        return gx, gw, gb, None


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


class MultiAdapter:
    """Per-client copies of every adapter tensor of ``model`` and the fused-pass forwards (module docstring).

    Raises ValueError when ``model`` has an adapter this pass cannot batch (a LoRA layer with dropout or a variant
    such as DoRA, a non-Linear LoRA layer, VeRA, a head parameter outside an ``nn.Linear``)."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self._layers: list[tuple[LoraLinear, str, str]] = []  # (layer, key of A, key of B)
        self._dense: list[tuple[torch.nn.Linear, str, str | None]] = []  # head Linear (module, weight key, bias key)
        covered: set[str] = set()
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                key_a = adapter_key(f"{name}.lora_A.{ADAPTER}.weight")
                key_b = adapter_key(f"{name}.lora_B.{ADAPTER}.weight")
                if key_a is None or key_b is None or ADAPTER not in module.lora_A:
                    continue
                if ADAPTER in module.lora_variant or not isinstance(module.lora_dropout[ADAPTER], torch.nn.Identity):
                    raise ValueError(
                        f"{name}: a LoRA layer with dropout or a variant (DoRA) cannot train several clients in one "
                        "pass"
                    )
                self._layers.append((module, key_a, key_b))
                covered.update((key_a, key_b))
            elif isinstance(module, torch.nn.Linear):
                key_w = adapter_key(f"{name}.weight")
                if key_w is None or not key_w.startswith(HEAD_PREFIX):
                    continue
                key_b = adapter_key(f"{name}.bias") if module.bias is not None else None
                self._dense.append((module, key_w, key_b))
                covered.update(k for k in (key_w, key_b) if k)
        self.keys = adapter_keys(model)
        other = sorted(set(self.keys) - covered)
        if other:
            raise ValueError(
                f"adapter tensors {other[:4]} are neither LoRA Linear factors nor a head's Linear weights: several "
                "clients cannot be trained in one pass (runtime.clients_per_pass: 1 trains them)"
            )
        live = dict(model.named_parameters())
        self._like = {adapter_key(n): p for n, p in live.items() if adapter_key(n) is not None}
        self.tensors: list[dict[str, torch.nn.Parameter]] = []
        self.groups: list[Group] = []
        self._samples: Samples | None = None

    def load(self, states: Sequence[Mapping[str, torch.Tensor]], trainable: Sequence[str]) -> list[list[torch.Tensor]]:
        """One slot per state (every adapter key; KeyError if one is missing), on the model's device and dtype;
        ``trainable`` keys require grad. Returns each slot's trainable tensors in the order of ``trainable``."""
        chosen = set(trainable)
        self.tensors = []
        for state in states:
            slot = {}
            for key in self.keys:
                like = self._like[key]
                value = state[key].detach().to(device=like.device, dtype=like.dtype).clone()
                slot[key] = torch.nn.Parameter(value, requires_grad=key in chosen)
            self.tensors.append(slot)
        return [[slot[k] for k in trainable] for slot in self.tensors]

    def state(self, slot: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Detached CPU copies of slot ``slot``'s tensors ``keys``."""
        return {k: self.tensors[slot][k].detach().to("cpu", copy=True) for k in keys}

    def take_grad_samples(self, slot: int) -> dict[str, torch.Tensor]:
        """The per-example gradients the last backward recorded for ``slot`` (key -> ``[n_k, *shape]``); removed."""
        return self._samples.pop(slot, {}) if self._samples is not None else {}

    @contextlib.contextmanager
    def pass_over(self, groups: Sequence[Group], per_example: bool) -> Iterator[None]:
        """Within: the model's adapted layers and head apply each group's own slot (rows must be the groups' rows,
        contiguous, in order); ``per_example`` records per-example gradients in backward instead of summing them.
        Raises ValueError for groups that are empty or not contiguous from row 0."""
        pos = 0
        for g in groups:
            if g.start != pos or g.stop <= g.start:
                raise ValueError(f"row groups must be contiguous and non-empty from row 0, got {list(groups)}")
            pos = g.stop
        self.groups, self._samples = list(groups), ({} if per_example else None)
        patched: list[torch.nn.Module] = []
        try:
            for layer, key_a, key_b in self._layers:
                layer.forward = self._lora_forward(layer, key_a, key_b)
                patched.append(layer)
            for module, key_w, key_b in self._dense:
                module.forward = self._dense_forward(key_w, key_b)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward  # the class's forward again
            self.groups = []

    def _rec(self, g: Group, first: str, second: str | None) -> tuple[Any, ...]:
        return (self._samples, g.slot, g.rows, first, second)

    def _check_rows(self, x: torch.Tensor) -> None:
        if not self.groups or x.shape[0] != self.groups[-1].stop:
            raise RuntimeError(
                f"a fused pass over {self.groups[-1].stop if self.groups else 0} rows saw an input of batch "
                f"{x.shape[0]}: this model does not keep the batch dimension first"
            )

    def _lora_forward(self, layer: LoraLinear, key_a: str, key_b: str) -> Any:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_rows(x)
            result = layer.base_layer(x, *args, **kwargs)
            dtype = result.dtype
            x = peft_cast_lora_input(layer, x, layer.lora_A[ADAPTER].weight.dtype)
            scaling = layer.scaling[ADAPTER]
            rec = _LoRARecord(tuple(self.groups), self._samples, key_a, key_b)
            factors = [self.tensors[g.slot][key] for key in (key_a, key_b) for g in self.groups]
            return (result + _FusedLoRA.apply(x, scaling, rec, *factors)).to(dtype)

        return forward

    def _dense_forward(self, key_w: str, key_b: str | None) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            self._check_rows(x)
            parts = [
                _GroupDense.apply(
                    x[g.start : g.stop],
                    self.tensors[g.slot][key_w],
                    self.tensors[g.slot][key_b] if key_b else None,
                    self._rec(g, key_w, key_b),
                )
                for g in self.groups
            ]
            return _cat(parts)

        return forward
