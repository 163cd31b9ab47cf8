"""Per-example gradients of one client's tensors inside a multi-client pass (:mod:`fedsim.client.multi_adapter`).

The formula is Opacus' linear grad sampler (``opacus.grad_sample.linear``: ``einsum("n...i,n...j->nij", backprops,
activations)``, the bias ``einsum("n...k->nk", backprops)``), with the rescaling Opacus applies for
``loss_reduction="mean"``: the captured backprops are multiplied by the batch size ``n`` first. In a multi-client
pass the loss is the SUM over clients of each client's MEAN loss, so the backprops of client k's rows carry
``1 / n_k`` and ``n`` is ``n_k``: each row's result is the gradient of that example's own loss, what Opacus computes
when the client trains alone. Clipping, noise and scaling stay with Opacus' DPOptimizer (the client's own; the
batched trainer sets ``p.grad_sample`` from these).

A LoRA layer ``out = s * B (A x)`` is two linear maps: with ``h = A x`` and ``g`` the loss gradient at ``out``,
``B``'s activations are ``h`` and its backprops ``s * g``; ``A``'s activations are ``x`` and its backprops
``(s * g) B`` (what Opacus captures at PEFT's ``lora_B`` and ``lora_A`` modules).
"""

from __future__ import annotations

import torch


def linear_grad_samples(
    x: torch.Tensor, backprops: torch.Tensor, n: int, bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example gradients ``(dW [n, out, in], db [n, out] or None)`` of a linear map ``W x (+ b)`` over one
    client's ``n`` rows: ``x`` ``[n, ..., in]`` its input, ``backprops`` ``[n, ..., out]`` the loss gradient at its
    output. ``bias``: also the bias's. Raises ValueError when the leading dimensions are not ``n``."""
    if x.shape[0] != n or backprops.shape[0] != n:
        raise ValueError(f"per-example gradients of {n} rows from inputs of {x.shape[0]} and {backprops.shape[0]}")
    scaled = backprops * n
    d_w = torch.einsum("n...i,n...j->nij", scaled, x.to(scaled.dtype))
    return d_w, (torch.einsum("n...k->nk", scaled) if bias else None)


def grouped_linear_grad_samples(x: torch.Tensor, backprops: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Per-example gradients ``[N, out, in]`` of a linear map applied to every row of a fused pass whose rows are
    consecutive groups of ``sizes`` rows (one per client, each with its OWN weight): row r of group k gets
    :func:`linear_grad_samples`'s value for that group (backprops scaled by ``sizes[k]``). Raises ValueError when
    the leading dimensions are not ``sum(sizes)``."""
    total = sum(sizes)
    if x.shape[0] != total or backprops.shape[0] != total:
        raise ValueError(f"per-example gradients of {total} rows from inputs of {x.shape[0]} and {backprops.shape[0]}")
    if len(set(sizes)) == 1:
        scaled = backprops * sizes[0]
    else:
        counts = torch.tensor(sizes, device=backprops.device)
        per_row = torch.repeat_interleave(counts, counts).to(backprops.dtype)
        scaled = backprops * per_row.view(-1, *([1] * (backprops.dim() - 1)))
    return torch.einsum("n...i,n...j->nij", scaled, x.to(scaled.dtype))
